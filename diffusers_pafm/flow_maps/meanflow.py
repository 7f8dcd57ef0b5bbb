"""The MeanFlow objective that trains a flow map u_theta(x_t, t, r) from data alone.

    u(x_t, t, r) = v - (t - r) d/dt u(x_t, t, r)             (MeanFlow identity, d/dt = d_t + v . grad_x)

The loss regresses u_theta(x_t, t, r) onto sg[v - (t - r) du_theta/dt], with du/dt a forward-mode JVP of u_theta
along the tangent (v, 1, 0) of (x_t, t, r), computed in fp32 with the MATH attention kernel (flash /
memory-efficient SDPA have no forward AD). The JVP runs under ``no_grad`` and a separate forward carries the
gradient, so memory stays near a plain training step. ``mode="compiled_jvp"`` runs the same JVP through
``torch.compile`` (its elementwise tangent ops fused); a central finite difference replaces the JVP for models whose
kernels lack forward AD.

Posterior MeanFlow (``posterior=``, a :class:`~diffusers_pafm.pafm.PosteriorEstimator`): the target is affine in v,

    u_tgt(v) = A v + b,   A = I - (t - r) grad_x u,   b = -(t - r) d_t u,

so replacing v by the PAFM posterior velocity v^ = sum_j w_j v_j (in the first term and as the JVP tangent) gives
u_tgt(v^) = sum_j w_j u_tgt(v_j): the weighted mean of the per-candidate MeanFlow targets, at the cost of the
posterior's two matrix products (the JVP is the same JVP with another tangent). The "sum" form adds the theta-free
sum_j w_j ||A (v_j - v^)||^2, so that its value is the weighted sum of per-candidate MeanFlow losses (which
estimates the MeanFlow loss without bias under the same conditions as PAFM's; ``docs/pafm.md``); for r = t rows it
is PAFM's spread, for r != t rows it is estimated from one candidate drawn with probability w_j (one more
directional derivative on those rows). Rows marked ``own_endpoint`` keep v (the VFM adapter-noise rows, whose noise
depends on their own endpoint, so the Gaussian path likelihood does not hold there).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..pafm.batch import FlowBatch
from ..pafm.posterior import VELOCITY_T_FLOOR
from ..pafm.target import PosteriorEstimator
from ..paths import append_dims, sample_path
from ..utils.outputs import LossOutput
from .flow_map import AverageVelocity

__all__ = [
    "DERIVATIVE_MODES",
    "TwoTimeSampler",
    "MeanFlowLoss",
    "MeanFlowLossOutput",
    "MeanFlowTarget",
    "meanflow_target",
]


DERIVATIVE_MODES = ("jvp", "compiled_jvp", "double_backward", "finite_difference")
"""How du/dt is computed: forward AD, the same compiled with ``torch.compile``, reverse mode twice, or a central
difference."""


@dataclass
class TwoTimeSampler:
    """Draws (t, r) with t >= r: two diffusers-density draws sorted, and r = t except on ``r_neq_t * B`` rows.

    The count of r != t rows is fixed per batch, as in MeanFlow's code (a random subset of that size), with the
    fractional part rounded stochastically so that the expected fraction is ``r_neq_t`` for any batch size. A fixed
    count keeps the derivative pass one shape (what ``MeanFlowLoss(mode="compiled_jvp")`` compiles once).
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
        expected = self.r_neq_t * batch_size
        count = int(expected) + int(torch.rand((), generator=generator, device=device).item() < expected % 1)
        keep = torch.zeros(batch_size, dtype=torch.bool, device=device)
        keep[torch.randperm(batch_size, generator=generator, device=device)[:count]] = True
        return t, torch.where(keep, r, t)


def _total_derivative(engine: Callable, u: AverageVelocity, x_t, t, r, v, dt: float = 1.0):
    """(u, v . grad_x u + dt * d_t u): ``engine`` (``torch.func.jvp`` or ``torch.autograd.functional.jvp``) along
    the tangent (v, dt, 0) of (x_t, t, r), in fp32 with the MATH attention kernel."""
    with sdpa_kernel(SDPBackend.MATH), torch.autocast(x_t.device.type, enabled=False):
        return engine(u, (x_t.float(), t.float(), r.float()), (v.float(), torch.full_like(t, dt), torch.zeros_like(r)))


def _total_derivative_jvp(u: AverageVelocity, x_t, t, r, v, dt: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v . grad_x u + dt * d_t u) by forward AD."""
    return _total_derivative(torch.func.jvp, u, x_t, t, r, v, dt)


def _total_derivative_double_backward(u: AverageVelocity, x_t, t, r, v, dt: float = 1.0):
    """(u, v . grad_x u + dt * d_t u) by reverse mode twice (``torch.autograd.functional.jvp``: the JVP as the
    gradient of a vector-Jacobian product with respect to its cotangent). Exact like forward AD; in eager PyTorch it
    skips forward AD's per-operation cost, which dominates small models (benchmarks/README.md section 5)."""
    return _total_derivative(torch.autograd.functional.jvp, u, x_t, t, r, v, dt)


@functools.cache
def _compiled_total_derivative_jvp() -> Callable:
    """:func:`_total_derivative_jvp` through ``torch.compile`` (fixed shapes: one graph per batch shape and model).

    Fusing the tangent's elementwise ops roughly halves the JVP on CPU (benchmarks/README.md section 5); the first
    call of each shape compiles (tens of seconds)."""
    return torch.compile(_total_derivative_jvp, dynamic=False)


def _total_derivative_fd(u: AverageVelocity, x_t, t, r, v, step: float, dt: float = 1.0):
    """(u, v . grad_x u + dt * d_t u) by a central difference."""
    h = append_dims(torch.full_like(t, step), x_t.ndim)
    plus = u(x_t + h * v, t + dt * step, r)
    minus = u(x_t - h * v, t - dt * step, r)
    return u(x_t, t, r), (plus - minus) / (2 * step)


def _derivative(u, x_t, t, r, v, mode: str, fd_step: float, dt: float = 1.0) -> torch.Tensor:
    if mode == "jvp":
        return _total_derivative_jvp(u, x_t, t, r, v, dt)[1]
    if mode == "compiled_jvp":
        return _compiled_total_derivative_jvp()(u, x_t, t, r, v, dt)[1]
    if mode == "double_backward":
        return _total_derivative_double_backward(u, x_t, t, r, v, dt)[1]
    if mode == "finite_difference":
        return _total_derivative_fd(u, x_t, t, r, v, fd_step, dt)[1]
    raise _unknown_mode(mode)


def _unknown_mode(mode: str) -> ValueError:
    return ValueError(f"unknown MeanFlow derivative mode {mode!r}; choose one of {', '.join(DERIVATIVE_MODES)}")


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
    """sg[v - (t - r) du/dt] with du/dt = d_t u + v . grad_x u (``mode``: one of :data:`DERIVATIVE_MODES`)."""
    dudt = _derivative(u, x_t, t, r, v, mode, fd_step)
    return (v.float() - append_dims(t - r, x_t.ndim).float() * dudt.float()).detach()


@dataclass
class MeanFlowLossOutput(LossOutput):
    loss: torch.Tensor
    """adaptively weighted loss (carries the gradient)."""
    mse: torch.Tensor
    """unweighted ||u_theta - u_tgt||^2 (per-dim mean, batch mean; mean form), detached."""
    t: torch.Tensor
    r: torch.Tensor
    ess: torch.Tensor | None = None
    """[B] effective number of candidates of the posterior target (1 without one)."""
    self_weight: torch.Tensor | None = None
    """[B] weight of each row's own endpoint."""
    spread: torch.Tensor | None = None
    """[B] the theta-free sum-form constant per dimension (0 in the mean form's loss, logged either way)."""


@dataclass
class MeanFlowTarget:
    """What :meth:`MeanFlowLoss.regression_target` returns (all detached)."""

    target: torch.Tensor
    """sg[v - (t - r) du/dt], fp32."""
    velocity: torch.Tensor
    """the velocity in it: conditional, or the posterior v^ (own-endpoint rows keep the conditional one)."""
    ess: torch.Tensor
    self_weight: torch.Tensor
    spread: torch.Tensor
    """[B] the sum form's theta-free constant per dimension."""


class MeanFlowLoss(nn.Module):
    """MeanFlow objective with adaptive weighting w = 1 / sg(L_row + eps)^p (p = 0 disables it).

    ``forward(model, x, noise=None, t=None, r=None, class_labels=None, jvp_model=None)``: ``model(x_t, t, r,
    class_labels)`` is the average velocity; ``jvp_model`` (default ``model``) is used for the derivative - pass the
    unwrapped module under DDP so that the JVP pass does not touch the gradient-synchronising wrapper.

    ``posterior`` (a :class:`~diffusers_pafm.pafm.PosteriorEstimator`, e.g. from
    :func:`~diffusers_pafm.pafm.make_posterior`) replaces the conditional velocity by the PAFM posterior velocity
    (module docstring); ``form`` "mean" (default: no extra cost) or "sum" (value = weighted sum of per-candidate
    MeanFlow losses) - identical gradients without adaptive weighting.

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
        posterior: PosteriorEstimator | None = None,
        form: str = "mean",
    ):
        super().__init__()
        if form not in ("mean", "sum"):
            raise ValueError(f"unknown loss form {form!r}; choose 'mean' or 'sum'")
        if mode not in DERIVATIVE_MODES:
            raise _unknown_mode(mode)
        if posterior is not None and not isinstance(posterior, PosteriorEstimator):
            raise TypeError(f"posterior must be a PosteriorEstimator (make_posterior), got {type(posterior).__name__}")
        self.time_sampler = time_sampler or TwoTimeSampler()
        self.adaptive_power, self.adaptive_eps = adaptive_power, adaptive_eps
        self.mode, self.fd_step = mode, fd_step
        self.posterior = posterior
        self.form = form

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

    @torch.no_grad()
    def sum_form_spread(self, u, x_t, t, r, delta, spread, class_labels=None) -> torch.Tensor:
        """[B] per-dim sum_j w_j ||A (v_j - v^)||^2: ``spread`` (exact) where r = t, else ||A delta||^2 / D with
        delta = v_j - v^ for one j drawn with probability w_j (unbiased), A delta = delta - (t - r) grad_x u delta."""
        spread = spread.float().clone()
        rows = (t != r).nonzero().squeeze(1)
        if len(rows):
            labels = None if class_labels is None else class_labels[rows]
            d = delta[rows].float()
            jd = _derivative(
                lambda z, a, b: u(z, a, b, labels), x_t[rows], t[rows], r[rows], d, self.mode, self.fd_step, dt=0.0
            )
            a_delta = d - append_dims(t[rows] - r[rows], d.ndim).float() * jd.float()
            spread[rows] = a_delta.pow(2).flatten(1).mean(1)
        return spread

    @torch.no_grad()
    def regression_target(
        self,
        u: Callable[..., torch.Tensor],
        batch: FlowBatch,
        x_t: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor,
        velocity: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        own_endpoint: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MeanFlowTarget:
        """sg[v - (t - r) dv u/dt] with v the conditional ``velocity`` or, with a posterior, v^ (module docstring),
        and the sum form's per-row constant."""
        x, ones = batch.x, torch.ones(t.shape[0], device=t.device)
        ess, self_weight, spread = ones, ones, torch.zeros_like(ones)
        if self.posterior is not None:
            draw = (generator if generator is not None else True) if self.form == "sum" else None
            post = self.posterior.posterior_target(batch, x_t, t, velocity, draw_generator=draw)
            self.posterior.update_candidates(batch)  # after the target, as in PAFMLoss
            keep = torch.zeros_like(ones, dtype=torch.bool) if own_endpoint is None else own_endpoint.to(t.device)
            keep_x = append_dims(keep, x.ndim)
            velocity = torch.where(keep_x, velocity, post.velocity)
            ess, self_weight = post.ess.masked_fill(keep, 1.0), post.self_weight.masked_fill(keep, 1.0)
            spread = post.spread.masked_fill(keep, 0.0)
            if self.form == "sum":
                t_safe = append_dims(t.float().clamp_min(VELOCITY_T_FLOOR), x.ndim)
                drawn_velocity = (x_t.float() - post.drawn_endpoint.reshape(x.shape)) / t_safe
                delta = torch.where(keep_x, 0.0, drawn_velocity - velocity.float())
                spread = self.sum_form_spread(u, x_t, t, r, delta, spread, class_labels)
        target = self.target(u, x_t, t, r, velocity, class_labels)
        return MeanFlowTarget(target=target, velocity=velocity, ess=ess, self_weight=self_weight, spread=spread)

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
        batch: FlowBatch | None = None,
        own_endpoint: torch.Tensor | None = None,
    ) -> MeanFlowLossOutput:
        """``batch`` carries what the posterior's candidates and likelihood need (default: ``x`` and
        ``class_labels``); ``own_endpoint`` [B] bool marks rows that keep the conditional velocity."""
        if t is None or r is None:
            t, r = (v.to(x.device) for v in self.time_sampler(x.shape[0], generator))
        if noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        path = sample_path(x, noise, t)
        flow_batch = batch if batch is not None else FlowBatch(x=x, class_labels=class_labels)
        target = self.regression_target(
            jvp_model or model, flow_batch, path.x_t, t, r, path.velocity, class_labels, own_endpoint, generator
        )
        pred = model(path.x_t, t, r, class_labels).float()
        mse = (pred - target.target).pow(2).flatten(1).mean(1)
        rows = mse + target.spread if self.form == "sum" else mse
        loss = (self.weight(rows) * rows).mean() if self.adaptive_power else rows.mean()
        return MeanFlowLossOutput(
            loss=loss,
            mse=mse.mean().detach(),
            t=t.detach(),
            r=r.detach(),
            ess=target.ess,
            self_weight=target.self_weight,
            spread=target.spread,
        )
