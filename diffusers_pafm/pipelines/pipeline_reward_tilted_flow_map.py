"""One-step reward-tilted generation: a context noise adapter q(z | c) and a flow map fine-tuned toward a reward.

context c -> q_phi(z | c) -> z -> flow map (``num_inference_steps`` uniform steps, 1 by default:
x = z - u(z, 1, 0 | label)) -> VAE decode (if any) -> image, a draw of p_beta(x | c) ~ p(x | c) exp(R(x, c) / beta).
The context is a class label (the flow map is conditioned on it too), or a prompt: its L2-normalised CLIP text
embedding e(c) conditions the adapter, and the flow map samples its unconditional prior (the null label).
Trained by ``training/train_vfm.py --stage reward`` (:class:`~diffusers_pafm.RewardTrainer`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMapEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.image_processor import VaeImageProcessor

from ..models.text_encoder import encode_prompt
from ..utils.labels import class_label_tensor
from .conventions import FlowMapSamplingMixin, PipelineConventionsMixin

__all__ = ["RewardTiltedFlowMapPipeline"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_pafm import RewardTiltedFlowMapPipeline

        >>> pipe = RewardTiltedFlowMapPipeline.from_pretrained("reward-digits")
        >>> images = pipe(class_labels=[3, 7], num_images_per_prompt=4).images  # one forward pass per image
        >>> pipe = RewardTiltedFlowMapPipeline.from_pretrained("reward-shapes")  # trained with --reward_context text
        >>> images = pipe(prompt="a large red circle", num_images_per_prompt=4).images
        ```
"""


class RewardTiltedFlowMapPipeline(FlowMapSamplingMixin, PipelineConventionsMixin, DiffusionPipeline):
    """``RewardTiltedFlowMapPipeline(noise_adapter, transformer, scheduler, vae=None, text_encoder=None)``.

    Args:
        noise_adapter: a :class:`~diffusers_pafm.ContextNoiseAdapterModel` over class labels (``num_classes``) or
            text embeddings (``context_dim``).
        transformer: the two-time :class:`~diffusers_pafm.models.FlowMapTransformer2DModel`.
        scheduler: diffusers' ``FlowMapEulerDiscreteScheduler``.
        vae: optional ``AutoencoderKL`` when the flow map works on latents.
        text_encoder: for a text adapter, the :class:`~diffusers_pafm.models.OpenCLIPTextEncoder` whose normalised
            pooled embedding the adapter was trained on (without it, pass ``prompt_embeds``).
    """

    model_cpu_offload_seq = "text_encoder->noise_adapter->transformer->vae"
    _optional_components = ["vae", "text_encoder"]

    def __init__(
        self,
        noise_adapter: ModelMixin,
        transformer: ModelMixin,
        scheduler: FlowMapEulerDiscreteScheduler,
        vae: ModelMixin = None,
        text_encoder: ModelMixin = None,
    ):
        super().__init__()
        self.register_modules(
            noise_adapter=noise_adapter,
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True, do_resize=False)

    @property
    def conditions_on_text(self) -> bool:
        """True when the adapter takes text embeddings (``prompt``), False for class labels."""
        return self.noise_adapter.config.context_dim is not None

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        """The adapter's context of each prompt: the L2-normalised pooled CLIP text embedding [B, E]."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text_encoder; pass prompt_embeds (normalised CLIP text embeddings)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or a list of them, got {prompt!r}")
        _, pooled = encode_prompt(prompts, self.text_encoder)
        return F.normalize(pooled.float(), dim=-1)

    def _context(self, class_labels, prompt, prompt_embeds, device) -> torch.Tensor:
        """The adapter's context, one per prompt / label: text embeddings [B, E] or class labels [B]."""
        given = [
            name
            for name, v in (("class_labels", class_labels), ("prompt", prompt), ("prompt_embeds", prompt_embeds))
            if v is not None
        ]
        if self.conditions_on_text:
            if given not in (["prompt"], ["prompt_embeds"]):
                raise ValueError(
                    "this pipeline's adapter is conditioned on text: pass prompt or prompt_embeds "
                    f"(got {given or 'none'})"
                )
            embeds = self.encode_prompt(prompt) if prompt is not None else torch.as_tensor(prompt_embeds).float()
            dim = self.noise_adapter.config.context_dim
            if embeds.ndim == 1:
                embeds = embeds[None]
            if embeds.ndim != 2 or embeds.shape[1] != dim:
                raise ValueError(f"prompt_embeds of shape {tuple(embeds.shape)}; expected [B, {dim}]")
            return embeds.to(device)
        if given != ["class_labels"]:
            raise ValueError(
                f"this pipeline's adapter is conditioned on class labels: pass class_labels (got {given or 'none'})"
            )
        return class_label_tensor(class_labels, self.noise_adapter.config.num_classes).to(device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        temperature: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        """``num_images_per_prompt`` draws of the reward-tilted distribution for each context, grouped by context.

        Args:
            class_labels: one label or a list (the context the adapter and the flow map are conditioned on), for an
                adapter over class labels.
            num_images_per_prompt: draws per label / prompt.
            num_inference_steps: flow-map steps (1: one transformer call).
            generator: a ``torch.Generator`` or one per draw.
            noise: the adapter's standard-normal eps (z = mean + temperature x std x eps), [draws, C, H, W].
            temperature: scales the adapter's std (0: its mean).
            output_type: "pil", "np", "pt" (in [0, 1]) or "latent".
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict`` after each step.
            prompt: one prompt or a list, for an adapter over text (encoded by ``text_encoder``).
            prompt_embeds: instead of ``prompt``, their normalised CLIP text embeddings [B, E].
        """
        tensor_inputs = self.check_call_inputs(
            num_images_per_prompt, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )
        if not temperature >= 0:
            raise ValueError(f"temperature scales the adapter's std and must be >= 0, got {temperature}")
        device = self._execution_device
        context = self._context(class_labels, prompt, prompt_embeds, device).repeat_interleave(
            num_images_per_prompt, 0
        )
        draws = context.shape[0]
        if isinstance(generator, list) and len(generator) != draws:
            raise ValueError(f"{len(generator)} generators for {draws} draws")
        labels = self._labels(None, draws, device) if self.conditions_on_text else context  # text: the null label
        q = self.noise_adapter(context)
        z = q.sample(generator=generator, temperature=temperature, noise=noise)
        x = self.run_flow_map(z, labels, num_inference_steps, callback_on_step_end, tensor_inputs)
        images = self.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


RewardTiltedFlowMapPipeline.__call__.__doc__ += EXAMPLE_DOC_STRING
