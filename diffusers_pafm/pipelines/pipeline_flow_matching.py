"""Sampling pipeline for flow-matching (FM / PAFM) transformers trained with this package.

Euler integration of dx/dt = v_theta(x, t) from t = 1 (noise) to t = 0 with diffusers'
``FlowMatchEulerDiscreteScheduler`` (explicit ``sigmas``, so no hidden shift), class-conditional with
classifier-free guidance: v = v_uncond + s (v_cond - v_uncond), the null class being ``num_embeds_ada_norm``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..velocity_model import VelocityModel, null_class_id

__all__ = ["FlowMatchingPipeline"]


class FlowMatchingPipeline(DiffusionPipeline):
    """``FlowMatchingPipeline(transformer, scheduler, vae=None)``; load with ``FlowMatchingPipeline.from_pretrained``.

    Args:
        transformer: a class-conditional diffusers transformer predicting v = eps - x (e.g. ``DiTTransformer2DModel``).
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        vae: optional ``AutoencoderKL``; without it the transformer works in pixel space ([-1, 1]).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: ModelMixin, scheduler: FlowMatchEulerDiscreteScheduler, vae: ModelMixin = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    def _class_labels(self, class_labels, num_images_per_prompt: int) -> torch.Tensor:
        num_classes = null_class_id(self.transformer)
        if class_labels is None:
            raise ValueError("class_labels is required for a class-conditional transformer")
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels).long().flatten()
        if num_classes is not None and ((labels < 0) | (labels >= num_classes)).any():
            raise ValueError(f"class labels must lie in [0, {num_classes}), got {labels.tolist()}")
        return labels.repeat_interleave(num_images_per_prompt)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``class_labels`` with ``num_inference_steps`` Euler steps and CFG ``guidance_scale``."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        device = self._execution_device
        config = self.transformer.config
        labels = self._class_labels(class_labels, num_images_per_prompt).to(device)
        shape = (labels.shape[0], config.in_channels, config.sample_size, config.sample_size)
        dtype = self.transformer.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        do_cfg = guidance_scale != 1.0
        if do_cfg:
            labels = torch.cat([labels, torch.full_like(labels, null_class_id(self.transformer))])
        model = VelocityModel(self.transformer)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        num_train = self.scheduler.config.num_train_timesteps
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            t = (timestep / num_train).expand(model_input.shape[0]).to(dtype)
            velocity = model(model_input, t, class_labels=labels)
            if do_cfg:
                cond, uncond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, timestep, latents, return_dict=False)[0]

        if output_type == "latent":
            images = latents
        else:
            images = latents
            if self.vae is not None:
                vae_cfg = self.vae.config
                images = latents / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
                images = self.vae.decode(images.to(self.vae.dtype), return_dict=False)[0]
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
