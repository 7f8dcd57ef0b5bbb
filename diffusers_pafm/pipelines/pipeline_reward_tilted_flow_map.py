"""One-step reward-tilted generation: a context noise adapter q(z | c) and a flow map fine-tuned toward a reward.

class label c -> q_phi(z | c) -> z -> flow map (``num_inference_steps`` uniform steps, 1 by default:
x = z - u(z, 1, 0 | c)) -> VAE decode (if any) -> image, a draw of p_beta(x | c) ~ p(x | c) exp(R(x, c) / beta).
Trained by ``training/train_vfm.py --stage reward`` (:class:`~diffusers_pafm.RewardTrainer`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, FlowMapEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.image_processor import VaeImageProcessor

from ..utils.labels import class_label_tensor
from .conventions import FlowMapSamplingMixin, PipelineConventionsMixin

__all__ = ["RewardTiltedFlowMapPipeline"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_pafm import RewardTiltedFlowMapPipeline

        >>> pipe = RewardTiltedFlowMapPipeline.from_pretrained("reward-digits")
        >>> images = pipe(class_labels=[3, 7], num_images_per_prompt=4).images  # one forward pass per image
        ```
"""


class RewardTiltedFlowMapPipeline(FlowMapSamplingMixin, PipelineConventionsMixin, DiffusionPipeline):
    """``RewardTiltedFlowMapPipeline(noise_adapter, transformer, scheduler, vae=None)``.

    Args:
        noise_adapter: a :class:`~diffusers_pafm.ContextNoiseAdapterModel` over class labels.
        transformer: the two-time :class:`~diffusers_pafm.models.FlowMapTransformer2DModel` (class-conditional).
        scheduler: diffusers' ``FlowMapEulerDiscreteScheduler``.
        vae: optional ``AutoencoderKL`` when the flow map works on latents.
    """

    model_cpu_offload_seq = "noise_adapter->transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        noise_adapter: ModelMixin,
        transformer: ModelMixin,
        scheduler: FlowMapEulerDiscreteScheduler,
        vae: ModelMixin = None,
    ):
        super().__init__()
        self.register_modules(noise_adapter=noise_adapter, transformer=transformer, scheduler=scheduler, vae=vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True, do_resize=False)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        temperature: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """``num_images_per_prompt`` draws of the reward-tilted distribution for each class label, grouped by label.

        Args:
            class_labels: one label or a list (the context the adapter and the flow map are conditioned on).
            num_images_per_prompt: draws per label.
            num_inference_steps: flow-map steps (1: one transformer call).
            generator: a ``torch.Generator`` or one per draw.
            noise: the adapter's standard-normal eps (z = mean + temperature x std x eps), [draws, C, H, W].
            temperature: scales the adapter's std (0: its mean).
            output_type: "pil", "np", "pt" (in [0, 1]) or "latent".
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict`` after each step.
        """
        tensor_inputs = self.check_call_inputs(
            num_images_per_prompt, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )
        if not temperature >= 0:
            raise ValueError(f"temperature scales the adapter's std and must be >= 0, got {temperature}")
        device = self._execution_device
        labels = class_label_tensor(class_labels, self.noise_adapter.config.num_classes)
        labels = labels.repeat_interleave(num_images_per_prompt).to(device)
        if isinstance(generator, list) and len(generator) != labels.numel():
            raise ValueError(f"{len(generator)} generators for {labels.numel()} draws")
        q = self.noise_adapter(labels)
        z = q.sample(generator=generator, temperature=temperature, noise=noise)
        x = self.run_flow_map(z, labels, num_inference_steps, callback_on_step_end, tensor_inputs)
        images = self.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


RewardTiltedFlowMapPipeline.__call__.__doc__ += EXAMPLE_DOC_STRING
