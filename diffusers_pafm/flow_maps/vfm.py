"""Variational Flow Maps: the joint objective of a noise adapter q_phi(z | y) and a flow map f_theta.

    z ~ q_phi(z | y)                                   (reparameterised)
    L = L_MF(theta; phi) / (2 tau^2) + ||y - A f_theta-(z)||^2 / (2 sigma^2) + KL(q_phi(z | y) || N(0, I))
    L <- L / sg(L + c)^p                                (adaptive normalisation of the sum)

* f_theta-(z) = z - u_theta-(z, 1, 0) is the one-step map of a **stop-gradient** (or EMA) copy theta-: the
  observation term trains phi only (through z, and through a frozen VAE decoder in latent space).
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

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.noise_adapter import NoiseAdapterOutput
from ..pafm.batch import FlowBatch
from ..paths import TIMESTEP_SCALE, to_timestep
from ..utils.outputs import LossOutput
from .flow_map import one_step
from .meanflow import MeanFlowLoss, TwoTimeSampler
from .operators import Measurement

__all__ = ["VFMLoss", "VFMLossOutput", "stop_gradient"]


def stop_gradient(transformer: nn.Module, timestep_scale: float = TIMESTEP_SCALE) -> Callable[..., torch.Tensor]:
    """u_theta-(x, t, r, labels): the two-time ``transformer`` called with detached parameters (theta-)."""
    params = {k: v.detach() for k, v in transformer.named_parameters()}
    params.update(dict(transformer.named_buffers()))

    def u(x, t, r, class_labels=None):
        args = (x, to_timestep(t, timestep_scale), to_timestep(r, timestep_scale), class_labels)
        return torch.func.functional_call(transformer, params, args, {"return_dict": False})[0]

    return u


@dataclass
class VFMLossOutput(LossOutput):
    loss: torch.Tensor
    """the (adaptively normalised) total; carries the gradients of theta and phi."""
    total: torch.Tensor
    """L before normalisation, detached."""
    meanflow: torch.Tensor
    observation: torch.Tensor
    """||y - A f(z)||^2 summed over measured dimensions, or their mean with ``reduction="mean"`` (not / 2 sigma^2)."""
    kl: torch.Tensor
    adapter_std: torch.Tensor
    """mean predicted std of q."""


class VFMLoss(nn.Module):
    """The VFM objective (module docstring). ``decode`` maps flow-map space to observation space (VAE decoder).

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
        measurement: Measurement,
        adapter_input: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        target_model: Callable[..., torch.Tensor] | None = None,
        jvp_model: Callable[..., torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        flow_batch: FlowBatch | None = None,
    ) -> VFMLossOutput:
        """``model``/``target_model``/``jvp_model``: u(x_t, t, r, labels) with gradients / as theta- / for the JVP.

        ``target_model`` decodes z for the observation term: a stop-gradient or EMA copy (the paper), or the trained
        map itself so that the observation gradient reaches theta (the official code's ``--data-loss-learn-fm learn``).
        ``flow_batch`` is what a posterior MeanFlow term's candidates need (default: ``x`` and ``class_labels``).
        """
        q = adapter(adapter_input, task_ids)
        z = q.sample(generator)
        kl = q.kl(self.reduction)
        if target_model is None:
            raise ValueError(
                "VFMLoss needs target_model: a stop-gradient or EMA copy of the flow map (theta-), or the map itself"
            )
        x_hat = self.one_step(target_model, z, class_labels)
        observation = measurement.residual(self.decode(x_hat) if self.decode is not None else x_hat, self.reduction)
        total = observation.mean() / (2 * self.sigma**2) + kl.mean()
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
            observation=observation.mean().detach(),
            kl=kl.mean().detach(),
            adapter_std=torch.exp(0.5 * q.logvar).mean().detach(),
        )
