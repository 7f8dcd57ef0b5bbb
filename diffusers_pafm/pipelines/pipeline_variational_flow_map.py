"""One-step conditional generation / inverse problems with a Variational Flow Map.

observation (measurement space) -> A^+ y (image space) -> noise adapter q(z | y, task) -> z -> flow map
(``num_inference_steps`` uniform steps, 1 by default: x = z - u(z, 1, 0)) -> VAE decode (if any) -> image.

``observation`` is what the sensor gives: the low-resolution image for super-resolution, the masked image (plus
``mask``, 1 = observed) for inpainting, the blurred / noisy image for deblurring / denoising; images in [0, 1]
(PIL, numpy or torch) or tensors in [-1, 1] with ``observation_range=(-1, 1)``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMapEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.image_processor import VaeImageProcessor

from ..flow_map import FlowMapModel, sample_flow_map
from ..operators import build_operator
from .hub import HubDownloadMixin

__all__ = ["VariationalFlowMapPipeline"]


class VariationalFlowMapPipeline(HubDownloadMixin, DiffusionPipeline):
    """``VariationalFlowMapPipeline(noise_adapter, transformer, scheduler, vae=None, tasks=[...])``.

    Args:
        noise_adapter: a :class:`~diffusers_pafm.models.NoiseAdapterModel`.
        transformer: a two-time :class:`~diffusers_pafm.models.FlowMapTransformer2DModel`.
        scheduler: diffusers' ``FlowMapEulerDiscreteScheduler``.
        vae: optional ``AutoencoderKL`` when the flow map works on latents.
        tasks: the degradation names the adapter was trained on, in task-id order.
    """

    model_cpu_offload_seq = "noise_adapter->transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        noise_adapter: ModelMixin,
        transformer: ModelMixin,
        scheduler: FlowMapEulerDiscreteScheduler,
        vae: ModelMixin = None,
        tasks: list[str] | None = None,
    ):
        super().__init__()
        self.register_modules(noise_adapter=noise_adapter, transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(tasks=list(tasks or []))
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    def _to_tensor(self, images, observation_range) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.ndim == 3:
                x = x.unsqueeze(0)
            return x if tuple(observation_range) == (-1, 1) else x * 2 - 1
        if not isinstance(images, list):
            images = [images]
        arrays = [
            np.asarray(im, dtype=np.float32) / (255.0 if not isinstance(im, np.ndarray) else 1.0) for im in images
        ]
        x = torch.from_numpy(np.stack([a if a.ndim == 3 else a[..., None] for a in arrays])).permute(0, 3, 1, 2)
        return x * 2 - 1

    def operator_for(self, task: str, observation: torch.Tensor, mask: torch.Tensor | None):
        """The degradation of ``task`` for this observation (inpainting uses the given ``mask``)."""
        if task not in self.config.tasks:
            raise ValueError(f"unknown task {task!r}; this pipeline was trained for {self.config.tasks}")
        size = self.noise_adapter.config.sample_size
        shape = (observation.shape[0], observation.shape[1], size, size)
        op = build_operator(task, shape)
        if hasattr(op, "mask"):
            if mask is None:
                raise ValueError(f"task {task!r} needs mask= (1 = observed pixel) with the masked observation")
            mask = torch.as_tensor(mask, dtype=torch.float32)
            op.mask = mask.reshape(-1, 1, size, size).expand(shape[0], 1, size, size)
        return op

    @torch.no_grad()
    def __call__(
        self,
        observation,
        task: str,
        mask=None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 1,
        generator: torch.Generator | None = None,
        class_labels: int | list[int] | None = None,
        temperature: float = 1.0,
        observation_range: tuple[float, float] = (0.0, 1.0),
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Posterior samples for each observation: ``num_images_per_prompt`` draws each, grouped by observation."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        device = self._execution_device
        y = self._to_tensor(observation, observation_range).to(device)
        op = self.operator_for(task, y, mask).to(device)
        adapter_input = op.pseudo_inverse(y).repeat_interleave(num_images_per_prompt, 0)
        task_ids = torch.full((adapter_input.shape[0],), self.config.tasks.index(task), device=device)
        q = self.noise_adapter(adapter_input.to(self.noise_adapter.dtype), task_ids)
        z = q.sample(generator=generator, temperature=temperature).to(self.transformer.dtype)
        null = self.transformer.config.num_embeds_ada_norm
        labels = torch.full((z.shape[0],), null) if class_labels is None else torch.as_tensor(class_labels).flatten()
        labels = labels.repeat_interleave(z.shape[0] // labels.shape[0]).to(device)
        x = sample_flow_map(FlowMapModel(self.transformer), z, num_inference_steps, labels, self.scheduler)
        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                cfg = self.vae.config
                x = self.vae.decode((x / cfg.scaling_factor + (cfg.shift_factor or 0.0)).to(self.vae.dtype)).sample
            images = self.image_processor.postprocess(x.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
