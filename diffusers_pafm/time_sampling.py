"""Training-time sampling of t in [t_min, 1], delegating the densities to diffusers.

``diffusers.training_utils.compute_density_for_timestep_sampling`` provides the schemes used by diffusers' SD3/Flux
scripts ("uniform", "logit_normal" = sigmoid(N(m, s)), "mode" with ``mode_scale``); this module only fixes the
defaults, the generator/device plumbing and the clamp that keeps 1/t finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

__all__ = ["TimeSampler"]

TIME_SCHEMES = ("uniform", "logit_normal", "mode")


@dataclass
class TimeSampler:
    """Draws ``t`` ``[B]`` with diffusers' density, clamped to ``[t_min, 1]`` (t = 1 is noise)."""

    scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    t_min: float = 1e-4

    def __post_init__(self) -> None:
        if self.scheme not in TIME_SCHEMES:
            raise ValueError(f"unknown time sampling scheme {self.scheme!r}; choose one of {TIME_SCHEMES}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min must lie in [0, 1), got {self.t_min}")

    def __call__(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        t = compute_density_for_timestep_sampling(
            weighting_scheme=self.scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device="cpu" if generator is None else generator.device,
            generator=generator,
        )
        return t.clamp(self.t_min, 1.0).to(device)
