"""Flow maps u(x_t, t, r): the average velocity from time t to r, and sampling with them.

Diffusers' sigma convention (:mod:`diffusers_pafm.paths`): x_t = (1 - t) x + t eps, t = 1 is noise, and

    x_r = x_t - (t - r) u(x_t, t, r)          (flow-map step; one step: x_0 = z - u(z, 1, 0))
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import FlowMapEulerDiscreteScheduler
from torch import nn

from ..models.velocity_model import disable_label_dropout
from ..paths import TIMESTEP_SCALE, flow_map_step, to_timestep

__all__ = ["AverageVelocity", "FlowMapModel", "one_step", "flow_map_update", "sample_flow_map"]

AverageVelocity = Callable[..., torch.Tensor]
"""``u(x_t, t, r, class_labels=None)`` with t, r of shape [B] in [0, 1]."""


class FlowMapModel:
    """Callable ``u = model(x_t, t, r, class_labels=None)`` around a two-time transformer (timestep = 1000 t)."""

    def __init__(self, transformer: nn.Module, timestep_scale: float = TIMESTEP_SCALE):
        self.transformer = transformer
        self.timestep_scale = timestep_scale
        disable_label_dropout(transformer)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, class_labels=None) -> torch.Tensor:
        s = self.timestep_scale
        return self.transformer(x_t, to_timestep(t, s), to_timestep(r, s), class_labels, return_dict=False)[0]


def one_step(model: AverageVelocity, noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The one-step map x_0 = z - u(z, 1, 0)."""
    one = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    zero = torch.zeros_like(one)
    return flow_map_step(noise, one, zero, model(noise, one, zero, class_labels))


def flow_map_update(
    model: AverageVelocity,
    scheduler: FlowMapEulerDiscreteScheduler,
    x: torch.Tensor,
    step_index: int,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step ``step_index`` of the scheduler's grid: x_r = x_t - (t - r) u(x_t, t, r) with t, r its sigmas."""
    sigmas = scheduler.sigmas.to(x.device, x.dtype)
    t, r = sigmas[step_index].expand(x.shape[0]), sigmas[step_index + 1].expand(x.shape[0])
    return scheduler.step(model(x, t, r, class_labels), scheduler.timesteps[step_index], x, return_dict=False)[0]


@torch.no_grad()
def sample_flow_map(
    model: AverageVelocity,
    noise: torch.Tensor,
    num_inference_steps: int = 1,
    class_labels: torch.Tensor | None = None,
    scheduler: FlowMapEulerDiscreteScheduler | None = None,
) -> torch.Tensor:
    """x_0 from noise with K uniform flow-map steps x_r = x_t - (t - r) u(x_t, t, r) (K = 1: one model call).

    Uses diffusers' ``FlowMapEulerDiscreteScheduler`` (grid 1 = t_0 > ... > t_K = 0).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    scheduler = scheduler or FlowMapEulerDiscreteScheduler()
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    x = noise
    for i in range(len(scheduler.timesteps)):
        x = flow_map_update(model, scheduler, x, i, class_labels)
    return x
