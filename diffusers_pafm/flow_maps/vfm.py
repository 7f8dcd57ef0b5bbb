"""Variational Flow Maps: the joint objective of a noise adapter q_phi(z | y) and a flow map f_theta.

    z ~ q_phi(z | y)                                   (reparameterised)
    L = L_MF(theta; phi) / (2 tau^2) + D(f_theta-(z)) + KL(q_phi(z | y) || N(0, I))
    L <- L / sg(L + c)^p                                (adaptive normalisation of the sum)

D is the **data term**, -log p(evidence | x) per sample (nats, up to a constant):

* :class:`ObservationTerm` (inverse problems, the paper): D(x) = ||y - A x||^2 / (2 sigma^2); the target is the
  posterior p(x | y).
* :class:`RewardTerm` (reward-tilted generation, the paper's Fig. 5): D(x) = -R(x, c) / beta with the adapter
  conditioned on the context c; the target is p_beta(x | c) ~ p(x | c) exp(R(x, c) / beta). A Gaussian prior with a
  quadratic reward has it in closed form (tests/test_reward.py).

* f_theta-(z) = z - u_theta-(z, 1, 0) is the one-step map of a **stop-gradient** (or EMA) copy theta-: the
  data term trains phi only (through z, and through a frozen VAE decoder in latent space).
* L_MF is the MeanFlow loss on pairs (x, n): n = z (adapter noise, gradient reaches phi through x_t) with
  probability ``alpha``, fresh N(0, I) otherwise; it is what keeps f_theta a flow map of the data while joint
  training re-couples noise and data so that a Gaussian q can express a multimodal posterior.
* With ``meanflow=MeanFlowLoss(posterior=...)`` the fresh-noise rows of L_MF use the PAFM posterior velocity; the
  adapter rows keep their own endpoint: their noise z ~ q_phi(z | y(x)) depends on x, so N(x_t; (1 - t) z_j, t^2 I)
  is not their path likelihood and the weights would not be a posterior.
* ``adapter_only=True`` drops L_MF (and the adaptive normalisation): amortised VI against a frozen map, the
  paper's baseline, biased when the map's coupling does not suit a diagonal Gaussian.
``reduction="sum"`` (default) sums every term over its dimensions (the observation over measured ones, the KL and
L_MF over latent ones), so that L is the per-sample negative ELBO and sigma is the observation noise std for every
task and space: a multi-task adapter is calibrated on each task (tests/test_vfm_linear_gaussian.py).
``reduction="mean"`` (the official ImageNet code) takes every term as a per-dimension mean, which tempers each
task's likelihood by (latent dims / measured dims) relative to the ELBO: x4 for 2x super-resolution in pixels, 1/48
on SD-VAE latents, 1 for masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..models.noise_adapter import NoiseAdapterOutput
from ..pafm.batch import FlowBatch
from ..paths import TIMESTEP_SCALE, to_timestep
from ..utils.outputs import LossOutput
from .flow_map import one_step
from .meanflow import MeanFlowLoss, TwoTimeSampler
from .operators import Measurement

__all__ = ["VFMLoss", "VFMLossOutput", "DataTerm", "ObservationTerm", "RewardTerm", "check_reward", "stop_gradient"]


def stop_gradient(transformer: nn.Module, timestep_scale: float = TIMESTEP_SCALE) -> Callable[..., torch.Tensor]:
    """u_theta-(x, t, r, labels): the two-time ``transformer`` called with detached parameters (theta-)."""
    params = {k: v.detach() for k, v in transformer.named_parameters()}
    params.update(dict(transformer.named_buffers()))

    def u(x, t, r, class_labels=None):
        args = (x, to_timestep(t, timestep_scale), to_timestep(r, timestep_scale), class_labels)
        return torch.func.functional_call(transformer, params, args, {"return_dict": False})[0]

    return u


class DataTerm:
    """D(x) = -log p(evidence | x) per sample: ``term(images) -> (D [B], {name: [B] tensor to log})``."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


@dataclass
class ObservationTerm(DataTerm):
    """D(x) = ||y - A x||^2 / (2 sigma^2), summed over measured dimensions (``reduction="sum"``, the ELBO) or their
    mean (``"mean"``, a tempered likelihood: module docstring of :class:`VFMLoss`); logs the squared residual."""

    measurement: Measurement
    sigma: float
    reduction: str = "sum"

    def __call__(self, images):
        residual = self.measurement.residual(images, self.reduction)
        return residual / (2 * self.sigma**2), {"observation": residual}


def check_reward(reward: Callable[..., torch.Tensor], images: torch.Tensor, context: Any = None) -> torch.Tensor:
    """R(images, context) as [B] float32, or a clear error: not a tensor, wrong shape, NaN/inf, or (when the images
    carry gradients) not differentiable in them."""
    name = getattr(reward, "__name__", type(reward).__name__)
    value = reward(images, context)
    batch = images.shape[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"reward {name} returned {type(value).__name__}; it must return a tensor of shape [{batch}]")
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if tuple(value.shape) != (batch,):
        raise ValueError(
            f"reward {name} returned shape {tuple(value.shape)} for {batch} images; it must return one value per "
            f"image, shape [{batch}]"
        )
    bad = ~torch.isfinite(value.detach())
    if bad.any():
        rows = torch.nonzero(bad).flatten().tolist()
        raise FloatingPointError(f"reward {name} is NaN/inf for images {rows[:10]} ({len(rows)} of {batch})")
    if images.requires_grad and not value.requires_grad:
        raise ValueError(
            f"reward {name} is not differentiable in the images (its output carries no gradient): it must be built "
            "from torch operations on them, without .detach(), .item(), numpy or torch.no_grad()"
        )
    return value.float()


@dataclass
class RewardTerm(DataTerm):
    """D(x) = -R(x, c) / beta for a differentiable reward R(images in [-1, 1], context) -> [B]; logs R."""

    reward: Callable[..., torch.Tensor]
    context: Any = None
    beta: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta (the reward temperature) must be positive, got {self.beta}")

    def __call__(self, images):
        value = check_reward(self.reward, images, self.context)
        return -value / self.beta, {"reward": value}


@dataclass
class VFMLossOutput(LossOutput):
    loss: torch.Tensor
    """the (adaptively normalised) total; carries the gradients of theta and phi."""
    total: torch.Tensor
    """L before normalisation, detached."""
    meanflow: torch.Tensor
    data: torch.Tensor
    """the data term D(f(z)) in nats."""
    kl: torch.Tensor
    adapter_std: torch.Tensor
    """mean predicted std of q."""
    logged: dict[str, torch.Tensor] = field(default_factory=dict)
    """what the data term logs: "observation" (||y - A f(z)||^2 over measured dimensions, summed or their mean with
    ``reduction="mean"``) for an :class:`ObservationTerm`, "reward" (R(f(z), c)) for a :class:`RewardTerm`."""

    def scalars(self) -> dict[str, float]:
        return {**super().scalars(), **{k: float(v.detach().float().mean()) for k, v in self.logged.items()}}


class VFMLoss(nn.Module):
    """The VFM objective (module docstring). ``decode`` maps flow-map space to image space (VAE decoder) before the
    data term.

    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pafm import FlowMapModel, FlowMapTransformer2DModel, Measurement, NoiseAdapterModel, VFMLoss
        >>> from diffusers_pafm import build_dit, stop_gradient

        >>> flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 3, 16, 1, patch_size=4))
        >>> adapter = NoiseAdapterModel(sample_size=16, latent_size=16, num_tasks=1)
        >>> x = torch.rand(4, 3, 16, 16) * 2 - 1
        >>> y = Measurement.simulate(x, torch.zeros(4, dtype=torch.long), ["super_resolution_2x"], sigma=0.05)
        >>> out = VFMLoss()(FlowMapModel(flow_map), adapter, x, y, y.pseudo_inverse(x), task_ids=torch.zeros(4).long(),
        ...                 class_labels=torch.ones(4).long(), target_model=stop_gradient(flow_map))
        >>> out.loss.backward()
        ```
    """

    def __init__(
        self,
        sigma: float = 0.05,
        tau: float = 1.0,
        alpha: float = 0.5,
        meanflow: MeanFlowLoss | None = None,
        adaptive_power: float = 1.0,
        adaptive_eps: float = 0.01,
        adapter_only: bool = False,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        reduction: str = "sum",
    ):
        super().__init__()
        if sigma <= 0 or tau <= 0:
            raise ValueError(f"sigma and tau must be positive, got sigma={sigma}, tau={tau}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' (per dimension) or 'sum' (ELBO), got {reduction!r}")
        self.sigma, self.tau, self.alpha = sigma, tau, alpha
        self.meanflow = meanflow or MeanFlowLoss(TwoTimeSampler(), adaptive_power=0.0)
        self.adaptive_power, self.adaptive_eps = adaptive_power, adaptive_eps
        self.adapter_only = adapter_only
        self.decode = decode
        self.reduction = reduction

    def one_step(self, u: Callable[..., torch.Tensor], z: torch.Tensor, class_labels=None) -> torch.Tensor:
        """f(z) = z - u(z, 1, 0)."""
        return one_step(u, z, class_labels)

    def forward(
        self,
        model: Callable[..., torch.Tensor],
        adapter: Callable[..., NoiseAdapterOutput],
        x: torch.Tensor,
        data: Measurement | DataTerm,
        adapter_input: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        target_model: Callable[..., torch.Tensor] | None = None,
        jvp_model: Callable[..., torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        flow_batch: FlowBatch | None = None,
    ) -> VFMLossOutput:
        """``model``/``target_model``/``jvp_model``: u(x_t, t, r, labels) with gradients / as theta- / for the JVP.

        ``data``: a :class:`~.operators.Measurement` (an :class:`ObservationTerm` with this loss's sigma and
        reduction) or any :class:`DataTerm`. ``adapter(adapter_input, task_ids)`` gives q: the observation's view
        A^+ y and its task, or a context (class labels) for a context adapter.
        ``target_model`` decodes z for the data term: a stop-gradient or EMA copy (the paper), or the trained
        map itself so that the data term's gradient reaches theta (the official code's ``--data-loss-learn-fm learn``).
        ``flow_batch`` is what a posterior MeanFlow term's candidates need (default: ``x`` and ``class_labels``).
        """
        if isinstance(data, Measurement):
            data = ObservationTerm(data, self.sigma, self.reduction)
        q = adapter(adapter_input, task_ids)
        z = q.sample(generator)
        kl = q.kl(self.reduction)
        if target_model is None:
            raise ValueError(
                "VFMLoss needs target_model: a stop-gradient or EMA copy of the flow map (theta-), or the map itself"
            )
        x_hat = self.one_step(target_model, z, class_labels)
        data_term, logged = data(self.decode(x_hat) if self.decode is not None else x_hat)
        total = data_term.mean() + kl.mean()
        meanflow = torch.zeros((), device=x.device)
        if not self.adapter_only:
            device = generator.device if generator is not None else "cpu"
            use_adapter = torch.rand(x.shape[0], generator=generator, device=device) < self.alpha
            fresh = torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
            mask = use_adapter.to(x.device).view(-1, *[1] * (x.ndim - 1))
            noise = torch.where(mask, z.to(x.dtype), fresh)
            meanflow = self.meanflow(  # adapter-noise rows keep their own endpoint (a posterior sees fresh rows only)
                model,
                x,
                noise=noise,
                class_labels=class_labels,
                generator=generator,
                jvp_model=jvp_model,
                batch=flow_batch,
                own_endpoint=use_adapter.to(x.device),
            ).loss
            if self.reduction == "sum":
                meanflow = meanflow * x[0].numel()
            total = total + meanflow / (2 * self.tau**2)
        loss = total
        if self.adaptive_power and not self.adapter_only:
            loss = total / (total.detach() + self.adaptive_eps).pow(self.adaptive_power)
        return VFMLossOutput(
            loss=loss,
            total=total.detach(),
            meanflow=meanflow.detach(),
            data=data_term.mean().detach(),
            kl=kl.mean().detach(),
            adapter_std=torch.exp(0.5 * q.logvar).mean().detach(),
            logged={name: value.mean().detach() for name, value in logged.items()},
        )
