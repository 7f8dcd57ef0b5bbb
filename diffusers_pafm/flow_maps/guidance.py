"""DPS-style guided sampling on a flow(-map) prior: the multi-step baseline that one-step VFM is compared with.

Diffusion posterior sampling (Chung et al., 2023) carried to the flow path x_t = (1 - t) x + t eps. Each of the
``num_inference_steps`` uniform steps from t = 1 to 0 makes one model call with its vector-Jacobian product:

    v = u(x_t, t, t)                                   (instantaneous velocity; r = t)
    x0_hat = x_t - t v                                 (Tweedie: E[x | x_t] = x_t - t E[v | x_t])
    x_{t'} = x_t + (t' - t) v - zeta grad_{x_t} ||y - A x0_hat||     (per sample)

The gradient of the residual norm (not its square) is DPS's step zeta / ||y - A x0_hat|| on the squared loss, up to a
factor 2. Randomness comes from the initial noise only (the ODE is deterministic).

:func:`reward_guided_sample` is the same loop toward a reward-tilted target p(x) exp(R(x) / beta): the tilt adds
grad log E[exp(R / beta) | x_t] ~ grad_{x_t} R(x0_hat) / beta to the score, and on this path a score change ds is a
velocity change -t / (1 - t) ds, so

    x_{t'} = x_t + (t' - t) [v - zeta t / (1 - t) grad_{x_t} R(x0_hat) / beta]      ((1 - t) >= the step size)
"""

from __future__ import annotations

from typing import Callable

import torch

from ..paths import velocity_to_sample
from .operators import DegradationOperator

__all__ = ["dps_sample", "reward_guided_sample"]


def dps_sample(
    model: Callable[..., torch.Tensor],
    operator: DegradationOperator,
    observation: torch.Tensor,
    noise: torch.Tensor,
    num_inference_steps: int = 100,
    guidance_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guided samples [B, ...] for observations y = ``observation`` [B, ...] from ``noise`` (x_1) [B, ...].

    ``model(x_t, t, r, class_labels)`` is a flow map (:class:`~diffusers_pafm.FlowMapModel`); a velocity model
    that ignores ``r`` works too. ``operator`` acts row-wise on the batch.
    """
    if observation.shape[0] != noise.shape[0]:
        raise ValueError(f"observation batch {observation.shape[0]} != noise batch {noise.shape[0]}")

    def step(x0_hat: torch.Tensor, t: float, t_next: float) -> torch.Tensor:  # -zeta ||y - A x0_hat||
        return -guidance_scale * (observation - operator(x0_hat)).flatten(1).norm(dim=1)

    return _guided_euler(model, noise, num_inference_steps, step, class_labels)


def reward_guided_sample(
    model: Callable[..., torch.Tensor],
    reward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    noise: torch.Tensor,
    beta: float,
    context: torch.Tensor | None = None,
    num_inference_steps: int = 100,
    guidance_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reward-guided samples [B, ...] of p(x) exp(R(x, c) / beta) from ``noise`` (x_1) (module docstring).

    ``reward(x, context)`` -> [B] is differentiable (a :mod:`diffusers_pafm.rewards` reward or any callable);
    ``model`` is a flow map or velocity model as for :func:`dps_sample`; ``guidance_scale`` zeta multiplies the
    tilt (1: the approximation as derived).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    def step(x0_hat: torch.Tensor, t: float, t_next: float) -> torch.Tensor:  # (1 - t) held at >= the step size
        weight = guidance_scale * (t - t_next) * t / max(1.0 - t, t - t_next) / beta
        return weight * reward(x0_hat, context)

    return _guided_euler(model, noise, num_inference_steps, step, class_labels)


def _guided_euler(model, noise, num_inference_steps, objective, class_labels) -> torch.Tensor:
    """Euler from t = 1 to 0 on u(x, t, t), each step moved up the gradient (w.r.t. x_t) of the per-row
    ``objective(x0_hat, t, t_next)`` (its scale is the step's)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    times = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64).tolist()
    x = noise.detach()
    batch = x.shape[0]
    for t, t_next in zip(times[:-1], times[1:]):
        x = x.detach().requires_grad_(True)
        t_vec = torch.full((batch,), t, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            v = model(x, t_vec, t_vec, class_labels)
            x0_hat = velocity_to_sample(x, t_vec, v)
            (grad,) = torch.autograd.grad(objective(x0_hat, t, t_next).sum(), x)
        x = x.detach() + (t_next - t) * v.detach() + grad
    return x.detach()
