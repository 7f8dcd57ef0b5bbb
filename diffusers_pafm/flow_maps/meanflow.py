"""The MeanFlow objective that trains a flow map u_theta(x_t, t, r) from data alone.

    u(x_t, t, r) = v - (t - r) d/dt u(x_t, t, r)             (MeanFlow identity, d/dt = d_t + v . grad_x)

The loss regresses u_theta(x_t, t, r) onto sg[v - (t - r) du_theta/dt], with du/dt a forward-mode JVP of u_theta
along the tangent (v, 1, 0) of (x_t, t, r), computed in fp32 with the MATH attention kernel (flash /
memory-efficient SDPA have no forward AD). The JVP runs under ``no_grad`` and a separate forward carries the
gradient, so memory stays near a plain training step; a central finite difference replaces the JVP for models
whose kernels lack forward AD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..paths import append_dims, sample_path
from ..utils.outputs import LossOutput
from .flow_map import AverageVelocity

__all__ = ["TwoTimeSampler", "MeanFlowLoss", "MeanFlowLossOutput", "meanflow_target"]


@dataclass
class TwoTimeSampler:
    """Draws (t, r) with t >= r: two diffusers-density draws sorted, and r = t for a fraction ``1 - r_neq_t``.

    Defaults follow MeanFlow (logit-normal(-0.4, 1), 25 % of pairs with r != t).
    """

    scheme: str = "logit_normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    mode_scale: float = 1.29
    r_neq_t: float = 0.25

    def __post_init__(self):
        if self.scheme not in ("logit_normal", "mode", "uniform"):  # diffusers would fall back to uniform silently
            raise ValueError(f"unknown time sampling {self.scheme!r}; choose logit_normal, mode or uniform")
        if not 0.0 <= self.r_neq_t <= 1.0:
            raise ValueError(f"r_neq_t is a fraction in [0, 1], got {self.r_neq_t}")

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = "cpu" if generator is None else generator.device
        draw = [
            compute_density_for_timestep_sampling(
                self.scheme, batch_size, self.logit_mean, self.logit_std, self.mode_scale, device, generator
            )
            for _ in range(2)
        ]
        t, r = torch.maximum(*draw), torch.minimum(*draw)
        keep = torch.rand(batch_size, generator=generator, device=device) < self.r_neq_t
        return t, torch.where(keep, r, t)


def _total_derivative_jvp(u: AverageVelocity, x_t, t, r, v) -> tuple[torch.Tensor, torch.Tensor]:
    with sdpa_kernel(SDPBackend.MATH), torch.autocast(x_t.device.type, enabled=False):
        return torch.func.jvp(
            u, (x_t.float(), t.float(), r.float()), (v.float(), torch.ones_like(t), torch.zeros_like(r))
        )


def _total_derivative_fd(u: AverageVelocity, x_t, t, r, v, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = append_dims(torch.full_like(t, step), x_t.ndim)
    plus = u(x_t + h * v, t + step, r)
    minus = u(x_t - h * v, t - step, r)
    return u(x_t, t, r), (plus - minus) / (2 * step)


@torch.no_grad()
def meanflow_target(
    u: AverageVelocity,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    v: torch.Tensor,
    mode: str = "jvp",
    fd_step: float = 1e-3,
) -> torch.Tensor:
    """sg[v - (t - r) du/dt] with du/dt = d_t u + v . grad_x u (``mode`` "jvp" or "finite_difference")."""
    if mode == "jvp":
        _, dudt = _total_derivative_jvp(u, x_t, t, r, v)
    elif mode == "finite_difference":
        _, dudt = _total_derivative_fd(u, x_t, t, r, v, fd_step)
    else:
        raise ValueError(f"unknown MeanFlow derivative mode {mode!r}; choose 'jvp' or 'finite_difference'")
    return (v.float() - append_dims(t - r, x_t.ndim).float() * dudt.float()).detach()


@dataclass
class MeanFlowLossOutput(LossOutput):
    loss: torch.Tensor
    """adaptively weighted loss (carries the gradient)."""
    mse: torch.Tensor
    """unweighted ||u_theta - u_tgt||^2 (per-dim mean, batch mean), detached."""
    t: torch.Tensor
    r: torch.Tensor


class MeanFlowLoss(nn.Module):
    """MeanFlow objective with adaptive weighting w = 1 / sg(L_row + eps)^p (p = 0 disables it).

    ``forward(model, x, noise=None, t=None, r=None, class_labels=None, jvp_model=None)``: ``model(x_t, t, r,
    class_labels)`` is the average velocity; ``jvp_model`` (default ``model``) is used for the derivative - pass the
    unwrapped module under DDP so that the JVP pass does not touch the gradient-synchronising wrapper.

    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pafm import FlowMapModel, FlowMapTransformer2DModel, MeanFlowLoss, build_dit

        >>> flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 1, 8, 1))
        >>> out = MeanFlowLoss()(FlowMapModel(flow_map), torch.randn(4, 1, 8, 8), class_labels=torch.ones(4).long())
        >>> out.loss.backward()
        ```
    """

    def __init__(
        self,
        time_sampler: TwoTimeSampler | None = None,
        adaptive_power: float = 1.0,
        adaptive_eps: float = 1e-3,
        mode: str = "jvp",
        fd_step: float = 1e-3,
    ):
        super().__init__()
        self.time_sampler = time_sampler or TwoTimeSampler()
        self.adaptive_power, self.adaptive_eps = adaptive_power, adaptive_eps
        self.mode, self.fd_step = mode, fd_step

    def weight(self, rows: torch.Tensor) -> torch.Tensor:
        """L_row / sg(L_row + eps)^p as per-row weights."""
        return 1.0 / (rows.detach() + self.adaptive_eps).pow(self.adaptive_power)

    def target(self, u: Callable[..., torch.Tensor], x_t, t, r, v, class_labels=None) -> torch.Tensor:
        """:func:`meanflow_target` on the rows with r != t only; the others are exactly v (the (t - r) factor is 0),
        so a batch with a fraction ``r_neq_t`` of such rows pays that fraction of the derivative pass."""
        target = v.detach().float().clone()
        rows = (t != r).nonzero().squeeze(1)
        if len(rows):
            labels = None if class_labels is None else class_labels[rows]
            target[rows] = meanflow_target(
                lambda z, a, b: u(z, a, b, labels), x_t[rows], t[rows], r[rows], v[rows], self.mode, self.fd_step
            )
        return target

    def forward(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        jvp_model: Callable[..., torch.Tensor] | None = None,
    ) -> MeanFlowLossOutput:
        if t is None or r is None:
            t, r = (v.to(x.device) for v in self.time_sampler(x.shape[0], generator))
        if noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        path = sample_path(x, noise, t)
        target = self.target(jvp_model or model, path.x_t, t, r, path.velocity, class_labels)
        pred = model(path.x_t, t, r, class_labels).float()
        rows = (pred - target).pow(2).flatten(1).mean(1)
        loss = (self.weight(rows) * rows).mean() if self.adaptive_power else rows.mean()
        return MeanFlowLossOutput(loss=loss, mse=rows.mean().detach(), t=t.detach(), r=r.detach())
