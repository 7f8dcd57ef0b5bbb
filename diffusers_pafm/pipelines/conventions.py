"""What every pipeline of this package shares with diffusers' pipelines: the call-argument checks, the
``num_timesteps`` / ``interrupt`` properties and ``callback_on_step_end``, and the Hub download; and what the
flow-map pipelines share (:class:`FlowMapSamplingMixin`): class labels, the flow-map steps from z, decoding."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..flow_maps.flow_map import FlowMapModel, flow_map_update
from ..utils.hub import HubDownloadMixin
from ..utils.labels import class_label_tensor
from ..utils.vae import decode_latents

__all__ = ["PipelineConventionsMixin", "FlowMapSamplingMixin", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class PipelineConventionsMixin(HubDownloadMixin):
    """Mixed into a ``DiffusionPipeline`` before it: checks, step callbacks and interruption as in diffusers."""

    _callback_tensor_inputs = ["latents"]

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def check_call_inputs(
        self,
        num_images_per_prompt: int,
        num_inference_steps: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> list[str]:
        """Validate the arguments every pipeline takes; returns the callback's tensor inputs (default latents)."""
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        self._interrupt = False
        return tensor_inputs

    def step_callback(
        self,
        callback: Callable[..., dict[str, Any]] | None,
        step: int,
        timestep: torch.Tensor,
        latents: torch.Tensor,
        tensor_inputs: list[str],
    ) -> torch.Tensor:
        """Run ``callback(pipe, step, timestep, {name: tensor})`` and take back the latents it returns."""
        if callback is None:
            return latents
        outputs = callback(self, step, timestep, {"latents": latents} if "latents" in tensor_inputs else {})
        return (outputs or {}).get("latents", latents)


class FlowMapSamplingMixin:
    """For pipelines with ``transformer`` (a two-time flow map), ``scheduler`` (``FlowMapEulerDiscreteScheduler``),
    optional ``vae`` and an ``image_processor``: from noise z to images."""

    def _labels(self, class_labels, batch: int, device) -> torch.Tensor:
        """One flow-map label per draw (``None``: the null class)."""
        null = self.transformer.config.num_embeds_ada_norm
        if class_labels is None:
            return torch.full((batch,), null, device=device)
        labels = class_label_tensor(class_labels, null, null_class=True)
        if batch % labels.shape[0]:
            raise ValueError(f"class_labels {labels.tolist()}: one label, or one per draw ({batch} draws)")
        return labels.repeat_interleave(batch // labels.shape[0]).to(device)

    def run_flow_map(
        self,
        z: torch.Tensor,
        labels: torch.Tensor,
        num_inference_steps: int,
        callback: Callable[..., dict[str, Any]] | None = None,
        tensor_inputs: list[str] | None = None,
    ) -> torch.Tensor:
        """``num_inference_steps`` uniform flow-map steps from z at t = 1 to t = 0 (1: x = z - u(z, 1, 0))."""
        x = z.to(self.transformer.dtype)
        model = FlowMapModel(self.transformer)
        self.scheduler.set_timesteps(num_inference_steps, device=x.device)
        self._num_timesteps = len(self.scheduler.timesteps)
        with self.progress_bar(total=self._num_timesteps) as bar:
            for i, timestep in enumerate(self.scheduler.timesteps):
                if self.interrupt:
                    break
                x = flow_map_update(model, self.scheduler, x, i, labels)
                x = self.step_callback(callback, i, timestep, x, tensor_inputs or ["latents"])
                bar.update()
        return x

    def postprocess(self, x: torch.Tensor, output_type: str):
        """The flow map's output as ``output_type`` ("latent": as it is; else VAE-decoded if there is a VAE)."""
        if output_type == "latent":
            return x
        if self.vae is not None:
            x = decode_latents(self.vae, x)
        return self.image_processor.postprocess(x.float(), output_type=output_type)
