"""Sampling pipeline for flow-matching (FM / PAFM) transformers trained with this package.

Euler integration of dx/dt = v_theta(x, t) from t = 1 (noise) to t = 0 with diffusers'
``FlowMatchEulerDiscreteScheduler`` (explicit ``sigmas``, so no hidden shift), with classifier-free guidance
v = v_uncond + s (v_cond - v_uncond):

* class-conditional transformers (``DiTTransformer2DModel``): ``pipe(class_labels=[...])``, null class =
  ``num_embeds_ada_norm``;
* text-conditioned MMDiT (``SD3Transformer2DModel``) with a ``text_encoder`` (+ ``tokenizer`` for transformers
  encoders): ``pipe(prompt=[...])``, unconditional branch = ``negative_prompt`` (default: the empty prompt, which
  is what caption dropout trains).

With a ``vae`` the transformer works on latents ``(z - shift_factor) * scaling_factor``; without, on pixels in [-1, 1].
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..models.text_encoder import encode_prompt
from ..models.velocity_model import VelocityModel, null_class_id
from ..utils.labels import class_label_tensor
from ..utils.vae import decode_latents
from .conventions import PipelineConventionsMixin

__all__ = ["FlowMatchingPipeline"]


class FlowMatchingPipeline(PipelineConventionsMixin, DiffusionPipeline):
    """``FlowMatchingPipeline(transformer, scheduler, vae=None, text_encoder=None, tokenizer=None)``.

    Load with ``FlowMatchingPipeline.from_pretrained(folder_or_repo_id)`` (``DiffusionPipeline.from_pretrained``
    cannot resolve third-party pipeline classes).

    Args:
        transformer: a diffusers transformer predicting v = eps - x: class-conditional (DiT) or text-conditioned
            (SD3 MMDiT).
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        vae: optional ``AutoencoderKL``; without it the transformer works in pixel space ([-1, 1]).
        text_encoder: for text-conditioned transformers, an :class:`~diffusers_pafm.models.OpenCLIPTextEncoder` or
            a ``transformers`` encoder (then also ``tokenizer``).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: ModelMixin,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: ModelMixin = None,
        text_encoder: torch.nn.Module = None,
        tokenizer=None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    @property
    def is_text_conditioned(self) -> bool:
        return "joint_attention_dim" in self.transformer.config

    def _class_labels(self, class_labels, num_images_per_prompt: int) -> torch.Tensor:
        num_classes = null_class_id(self.transformer)
        if class_labels is None:
            raise ValueError("class_labels is required for a class-conditional transformer")
        labels = class_label_tensor(class_labels, num_classes)
        return labels.repeat_interleave(num_images_per_prompt)

    def encode_prompt(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B * n, L, D], pooled_prompt_embeds [B * n, P]) of ``prompt``: needs only the text encoder.

        The embeddings are what the MMDiT takes as ``encoder_hidden_states`` / ``pooled_projections``; pass them to
        ``__call__`` as ``prompt_embeds`` / ``pooled_prompt_embeds`` to reuse them.
        """
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text_encoder; pass prompt_embeds and pooled_prompt_embeds instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        hidden, pooled = encode_prompt(prompts, self.text_encoder, self.tokenizer)
        if dtype is None:
            dtype = self.transformer.dtype if self.transformer is not None else hidden.dtype
        device = device or hidden.device
        return (
            hidden.to(device, dtype).repeat_interleave(num_images_per_prompt, 0),
            pooled.to(device, dtype).repeat_interleave(num_images_per_prompt, 0),
        )

    def load_lora_weights(self, path: str, adapter_name: str = "default") -> None:
        """Load a LoRA adapter saved by ``train_pafm.py --lora_rank`` (diffusers' un-prefixed adapter format)."""
        self.transformer.load_lora_adapter(path, prefix=None, adapter_name=adapter_name, use_safetensors=True)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    def _text_conditioning(
        self,
        prompt,
        negative_prompt,
        prompt_embeds,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_pooled_prompt_embeds,
        num_images_per_prompt: int,
        do_cfg: bool,
    ) -> dict[str, torch.Tensor]:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt= and prompt_embeds= to a text-conditioned transformer")
        if prompt_embeds is not None:
            if pooled_prompt_embeds is None or pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ValueError("prompt_embeds needs pooled_prompt_embeds with the same batch size")
            dtype = self.transformer.dtype
            hidden = prompt_embeds.to(dtype).repeat_interleave(num_images_per_prompt, 0)
            pooled = pooled_prompt_embeds.to(dtype).repeat_interleave(num_images_per_prompt, 0)
        else:
            hidden, pooled = self.encode_prompt(prompt, num_images_per_prompt)
        if not do_cfg:
            return {"encoder_hidden_states": hidden, "pooled_projections": pooled}
        if negative_prompt_embeds is not None:
            if negative_pooled_prompt_embeds is None:
                raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds")
            neg_hidden = negative_prompt_embeds.to(hidden.dtype).repeat_interleave(num_images_per_prompt, 0)
            neg_pooled = negative_pooled_prompt_embeds.to(hidden.dtype).repeat_interleave(num_images_per_prompt, 0)
        else:
            negative = negative_prompt if negative_prompt is not None else ""
            if isinstance(negative, str):
                negative = [negative] * (hidden.shape[0] // num_images_per_prompt)
            neg_hidden, neg_pooled = self.encode_prompt(negative, num_images_per_prompt)
        if neg_hidden.shape != hidden.shape or neg_pooled.shape != pooled.shape:
            raise ValueError(
                f"negative embeddings {tuple(neg_hidden.shape)} / {tuple(neg_pooled.shape)} do not match the prompt's "
                f"{tuple(hidden.shape)} / {tuple(pooled.shape)}"
            )
        return {
            "encoder_hidden_states": torch.cat([hidden, neg_hidden.to(hidden.device)]),
            "pooled_projections": torch.cat([pooled, neg_pooled.to(pooled.device)]),
        }

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``class_labels`` or ``prompt`` (or ``prompt_embeds``) with Euler steps and CFG.

        Args:
            class_labels: class ids of a class-conditional transformer (one image row per label).
            prompt / negative_prompt: captions of a text-conditioned transformer (negative default: "").
            num_images_per_prompt: images per label or prompt.
            num_inference_steps: Euler steps from t = 1 to 0.
            guidance_scale: CFG scale s in v = v_uncond + s (v_cond - v_uncond); 1 disables guidance.
            generator: a ``torch.Generator`` or one per image.
            latents: the starting noise [images, C, H, W] (drawn from ``generator`` when omitted).
            prompt_embeds / pooled_prompt_embeds: precomputed :meth:`encode_prompt` outputs (one row per prompt);
                ``negative_*`` the same for the unconditional branch.
            output_type: "pil", "np", "pt" (in [0, 1]) or "latent".
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict`` after each step; it may
                replace the tensors of ``callback_on_step_end_tensor_inputs`` (default: latents).

        Examples:
            ```py
            >>> from diffusers_pafm import FlowMatchingPipeline

            >>> pipe = FlowMatchingPipeline.from_pretrained("demo_output/runs/pafm-digits")
            >>> images = pipe(class_labels=[0, 1, 2], num_inference_steps=25, guidance_scale=2.0).images
            ```
        """
        tensor_inputs = self.check_call_inputs(
            num_images_per_prompt, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )
        self._guidance_scale = guidance_scale
        device = self._execution_device
        config = self.transformer.config
        dtype = self.transformer.dtype
        do_cfg = guidance_scale != 1.0
        if self.is_text_conditioned:
            cond = self._text_conditioning(
                prompt,
                negative_prompt,
                prompt_embeds,
                pooled_prompt_embeds,
                negative_prompt_embeds,
                negative_pooled_prompt_embeds,
                num_images_per_prompt,
                do_cfg,
            )
            batch_size = cond["pooled_projections"].shape[0] // (2 if do_cfg else 1)
        else:
            if prompt is not None or prompt_embeds is not None:
                raise ValueError("this transformer is class-conditional: pass class_labels=, not a prompt")
            labels = self._class_labels(class_labels, num_images_per_prompt).to(device)
            batch_size = labels.shape[0]
            if do_cfg:
                labels = torch.cat([labels, torch.full_like(labels, null_class_id(self.transformer))])
            cond = {"class_labels": labels}
        cond = {k: v.to(device) for k, v in cond.items()}
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for {batch_size} images; pass one, or one per image")

        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)}; expected {shape}")
        latents = latents.to(device, dtype)
        model = VelocityModel(self.transformer)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        num_train = self.scheduler.config.num_train_timesteps
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                break
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            t = (timestep / num_train).expand(model_input.shape[0]).to(dtype)
            velocity = model(model_input, t, **cond)
            if do_cfg:
                v_cond, v_uncond = velocity.chunk(2)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(velocity, timestep, latents, return_dict=False)[0]
            latents = self.step_callback(callback_on_step_end, i, timestep, latents, tensor_inputs)

        if output_type == "latent":
            images = latents
        else:
            images = latents
            if self.vae is not None:
                images = decode_latents(self.vae, latents)
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
