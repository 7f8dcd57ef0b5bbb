"""What every pipeline of this package shares with diffusers' pipelines: the call-argument checks, the
``num_timesteps`` / ``interrupt`` properties and ``callback_on_step_end``, and the Hub download."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..utils.hub import HubDownloadMixin

__all__ = ["PipelineConventionsMixin", "OUTPUT_TYPES"]

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
