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

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..models.text_encoder import encode_prompt
from ..velocity_model import VelocityModel, null_class_id
from .hub import HubDownloadMixin

__all__ = ["FlowMatchingPipeline"]


class FlowMatchingPipeline(HubDownloadMixin, DiffusionPipeline):
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
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels).long().flatten()
        if num_classes is not None and ((labels < 0) | (labels >= num_classes)).any():
            raise ValueError(f"class labels must lie in [0, {num_classes}), got {labels.tolist()}")
        return labels.repeat_interleave(num_images_per_prompt)

    def encode_prompt(self, prompt: str | list[str], num_images_per_prompt: int = 1) -> dict[str, torch.Tensor]:
        """Transformer kwargs (``encoder_hidden_states``, ``pooled_projections``) for ``prompt``, repeated."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text_encoder; pass prompt embeddings via prompt_embeds instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        hidden, pooled = encode_prompt(prompts, self.text_encoder, self.tokenizer)
        dtype = self.transformer.dtype
        return {
            "encoder_hidden_states": hidden.to(dtype).repeat_interleave(num_images_per_prompt, 0),
            "pooled_projections": pooled.to(dtype).repeat_interleave(num_images_per_prompt, 0),
        }

    def load_lora_weights(self, path: str, adapter_name: str = "default") -> None:
        """Load a LoRA adapter saved by ``train_pafm.py --lora_rank`` (diffusers' un-prefixed adapter format)."""
        self.transformer.load_lora_adapter(path, prefix=None, adapter_name=adapter_name, use_safetensors=True)

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
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``class_labels`` or ``prompt`` with Euler steps and CFG ``guidance_scale``."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        device = self._execution_device
        config = self.transformer.config
        dtype = self.transformer.dtype
        do_cfg = guidance_scale != 1.0
        cond: dict[str, torch.Tensor] = {}
        if self.is_text_conditioned:
            if prompt is None:
                raise ValueError("prompt is required for a text-conditioned transformer")
            cond = self.encode_prompt(prompt, num_images_per_prompt)
            batch_size = cond["pooled_projections"].shape[0]
            if do_cfg:
                negative = negative_prompt if negative_prompt is not None else ""
                if isinstance(negative, str):
                    negative = [negative] * (batch_size // num_images_per_prompt)
                uncond = self.encode_prompt(negative, num_images_per_prompt)
                cond = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        else:
            labels = self._class_labels(class_labels, num_images_per_prompt).to(device)
            batch_size = labels.shape[0]
            if do_cfg:
                labels = torch.cat([labels, torch.full_like(labels, null_class_id(self.transformer))])
            cond = {"class_labels": labels}
        cond = {k: v.to(device) for k, v in cond.items()}

        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        model = VelocityModel(self.transformer)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        num_train = self.scheduler.config.num_train_timesteps
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            t = (timestep / num_train).expand(model_input.shape[0]).to(dtype)
            velocity = model(model_input, t, **cond)
            if do_cfg:
                v_cond, v_uncond = velocity.chunk(2)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
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
