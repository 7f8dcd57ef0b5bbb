"""DPS-style guided sampling on a flow(-map) prior: the multi-step baseline that one-step VFM is compared with.

Diffusion posterior sampling (Chung et al., 2023) carried to the flow path x_t = (1 - t) x + t eps. Each of the
``num_inference_steps`` uniform steps from t = 1 to 0 makes one model call with its vector-Jacobian product:

    v = u(x_t, t, t)                                   (instantaneous velocity; r = t)
    x0_hat = x_t - t v                                 (Tweedie: E[x | x_t] = x_t - t E[v | x_t])
    x_{t'} = x_t + (t' - t) v - zeta grad_{x_t} ||y - A x0_hat||     (per sample)

The gradient of the residual norm (not its square) is DPS's step zeta / ||y - A x0_hat|| on the squared loss, up to a
factor 2. Randomness comes from the initial noise only (the ODE is deterministic).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..paths import velocity_to_sample
from .operators import DegradationOperator

__all__ = ["dps_sample"]


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
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if observation.shape[0] != noise.shape[0]:
        raise ValueError(f"observation batch {observation.shape[0]} != noise batch {noise.shape[0]}")
    times = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64).tolist()
    x = noise.detach()
    batch = x.shape[0]
    for t, t_next in zip(times[:-1], times[1:]):
        x = x.detach().requires_grad_(True)
        t_vec = torch.full((batch,), t, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            v = model(x, t_vec, t_vec, class_labels)
            x0_hat = velocity_to_sample(x, t_vec, v)
            residual = (observation - operator(x0_hat)).flatten(1).norm(dim=1)
            (grad,) = torch.autograd.grad(residual.sum(), x)
        x = x.detach() + (t_next - t) * v.detach() - guidance_scale * grad
    return x.detach()
