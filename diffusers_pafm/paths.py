"""The linear Gaussian probability path in diffusers' sigma convention, and conversions between parameterisations.

One convention everywhere in this package (the one of ``FlowMatchEulerDiscreteScheduler`` and diffusers' SD3/Flux
training scripts)::

    x_t = (1 - t) * x + t * eps,    t = 1 is noise,    v = dx_t/dt = eps - x,    model timestep = 1000 * t

Sources with data at t = 1 (torchcfm, facebookresearch/flow_matching, SiT, the VFM ImageNet code) convert with
``t = 1 - s`` and ``v = -u`` (:func:`from_data_at_one`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "TIMESTEP_SCALE",
    "to_timestep",
    "PathSample",
    "append_dims",
    "sample_path",
    "interpolate",
    "conditional_velocity",
    "gaussian_path_log_likelihood",
    "velocity_to_sample",
    "velocity_to_noise",
    "sample_to_velocity",
    "noise_to_velocity",
    "flow_map_step",
    "from_data_at_one",
]

TIMESTEP_SCALE = 1000.0
"""diffusers transformers and schedulers take ``timestep = TIMESTEP_SCALE * t``."""


@dataclass
class PathSample:
    """A point on the conditional path: ``x_t = (1 - t) x + t noise`` with its conditional velocity ``noise - x``."""

    x: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    velocity: torch.Tensor


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample ``[B]`` tensor to ``[B, 1, ..., 1]`` so it broadcasts against a ``ndim`` tensor."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def to_timestep(t: torch.Tensor, scale: float = TIMESTEP_SCALE) -> torch.Tensor:
    """The model timestep ``1000 * t`` of a path time ``t`` in [0, 1]."""
    return t * scale


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * x + t * noise, with ``t`` of shape ``[B]``."""
    t = append_dims(t.to(x.dtype), x.ndim)
    return (1 - t) * x + t * noise


def conditional_velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = d x_t / dt = noise - x (independent of t on the linear path)."""
    return noise - x


def sample_path(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> PathSample:
    """Draw the point ``x_t`` and its conditional velocity for endpoints ``(x, noise)`` at times ``t`` ``[B]``."""
    return PathSample(x=x, noise=noise, t=t, x_t=interpolate(x, noise, t), velocity=conditional_velocity(x, noise))


def gaussian_path_log_likelihood(x_t: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x_t; (1 - t) x, t^2 I), summed over all non-batch dimensions; returns ``[B]``.

    This is the path likelihood p_t(x_t | x) whose softmax over candidate endpoints gives PAFM's posterior weights.
    """
    t = t.to(torch.float32)
    diff = (x_t.float() - append_dims(1 - t, x_t.ndim) * x.float()).flatten(1)
    dim = diff.shape[1]
    return -diff.pow(2).sum(1) / (2 * t**2) - dim * torch.log(t) - 0.5 * dim * math.log(2 * math.pi)


def velocity_to_sample(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x-prediction from a velocity: x = x_t - t * v."""
    return x_t - append_dims(t, x_t.ndim) * velocity


def velocity_to_noise(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """epsilon-prediction from a velocity: eps = x_t + (1 - t) * v."""
    return x_t + append_dims(1 - t, x_t.ndim) * velocity


def sample_to_velocity(x_t: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Velocity from an x-prediction: v = (x_t - x) / t (undefined at t = 0)."""
    return (x_t - x) / append_dims(t, x_t.ndim)


def noise_to_velocity(x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity from an epsilon-prediction: v = (noise - x_t) / (1 - t) (undefined at t = 1)."""
    return (noise - x_t) / append_dims(1 - t, x_t.ndim)


def flow_map_step(x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x_r = x_t - (t - r) * u from an average velocity u(x_t, t, r) (r = 0, t = 1: the one-step map z - u)."""
    return x_t - append_dims(t - r, x_t.ndim) * u


def from_data_at_one(s: torch.Tensor, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert time and velocity from a data-at-1 convention (torchcfm, flow_matching, SiT): t = 1 - s, v = -u."""
    return 1 - s, (None if u is None else -u)
