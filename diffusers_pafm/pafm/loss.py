"""PAFMLoss: flow matching with a posterior-weighted target over candidate endpoints.

For a batch x with noise eps and times t (x_t = (1 - t) x + t eps, diffusers convention)::

    v_fm = eps - x                                                   (plain FM target)
    v^   = sum_j w_j (x_t - z_j) / t = v_fm + (x - x^) / t           (posterior target, x^ = sum_j w_j z_j)
    mean form:  L_post = ||v_theta - v^||^2
    sum form:   L_post = sum_j w_j ||v_theta - v_j||^2 = ||v_theta - v^||^2 + sum_j w_j ||z_j - x^||^2 / t^2
    loss = fm_mix * ||v_theta - v_fm||^2 + (1 - fm_mix) * L_post        (per-dimension means, batch mean)

Both forms have the same gradient (the weights are detached). The sum form's *value* is an unbiased estimate of the
FM loss, in value and gradient, when the candidates are the row's own endpoint plus draws exchangeable with it
(global batch, EFM ring buffer, class bank with the class-match likelihood), at temperature 1; it is *not* for kNN
candidates (neighbours of the endpoint are not exchangeable with it), the CLIP term cos/tau (its normaliser over z
is dropped), T != 1 or ``target_ess`` (``docs/pafm.md``; the measured biases are in ``benchmarks/README.md``).
The posterior target itself (candidates, likelihood, temperature) is :class:`~.target.PosteriorEstimator`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..paths import sample_path
from ..time_sampling import TimeSampler
from ..utils.outputs import LossOutput
from .batch import FlowBatch
from .candidates import CandidateSource
from .target import PosteriorEstimator

__all__ = ["PAFMLoss", "PAFMLossOutput"]

LOSS_FORMS = ("sum", "mean")


@dataclass
class PAFMLossOutput(LossOutput):
    """What one call of :class:`PAFMLoss` returns; ``loss`` carries the gradient, the rest is for logging."""

    loss: torch.Tensor
    fm_loss: torch.Tensor
    """||v_theta - (eps - x)||^2 (per-dim mean, batch mean), detached."""
    posterior_loss: torch.Tensor
    """mean form ||v_theta - v^||^2, detached."""
    spread: torch.Tensor
    """batch mean of the sum-form constant, detached."""
    ess: torch.Tensor
    self_weight: torch.Tensor
    effective_k: torch.Tensor
    temperature: torch.Tensor
    t: torch.Tensor


class PAFMLoss(PosteriorEstimator):
    """Posterior-augmented flow matching objective (module docstring for the equations).

    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pafm import FlowBatch, VelocityModel, build_dit, make_loss

        >>> model = VelocityModel(build_dit("test", in_channels=1, sample_size=8, num_classes=10))
        >>> loss_fn = make_loss("pafm", num_classes=10)  # global-batch candidates, class-match likelihood
        >>> out = loss_fn(model, FlowBatch(x=torch.randn(8, 1, 8, 8), class_labels=torch.randint(0, 10, (8,))))
        >>> out.loss.backward()
        ```

    Args:
        candidates: a candidate source module (``None`` = plain FM, no posterior computed at all).
        likelihood: a condition likelihood module (``None`` = path likelihood only).
        temperature: fixed T in softmax(l / T + log p(y|z)); T = 1 is the exact posterior over the candidates.
        target_ess: per-row T chosen so that the ESS reaches this value (overrides ``temperature``).
        fm_mix: lambda in lambda * FM + (1 - lambda) * PAFM.
        form: "sum" (weighted sum of per-candidate losses; value estimates the FM loss) or "mean" (weighted-mean
            target); identical gradients.
        time_sampler: draws t when the caller does not pass it (default: logit-normal(0, 1) via diffusers).
        class_dropout: probability of dropping a row's condition (classifier-free guidance): its class label
            becomes ``null_class_id`` and its ``FlowBatch.conditioning`` the ``null_conditioning`` (e.g. the
            empty-prompt encoding); dropped rows use the path likelihood only.
        null_class_id: the unconditional label id (DiT: ``num_embeds_ada_norm``).
        null_conditioning: transformer kwargs of the unconditional input, each with batch size 1.
        t_min: t is clamped to [t_min, 1] inside the posterior.
        chunk_size: candidates processed at once in the posterior.
    """

    def __init__(
        self,
        candidates: CandidateSource | None = None,
        likelihood: nn.Module | None = None,
        temperature: float = 1.0,
        target_ess: float | None = None,
        fm_mix: float = 0.0,
        form: str = "sum",
        time_sampler: TimeSampler | None = None,
        class_dropout: float = 0.0,
        null_class_id: int | None = None,
        null_conditioning: dict[str, torch.Tensor] | None = None,
        t_min: float = 1e-4,
        chunk_size: int = 4096,
    ):
        super().__init__(candidates, likelihood, temperature, target_ess, t_min, chunk_size)
        if form not in LOSS_FORMS:
            raise ValueError(f"unknown loss form {form!r}; choose one of {LOSS_FORMS}")
        if not 0.0 <= fm_mix <= 1.0:
            raise ValueError(f"fm_mix must lie in [0, 1], got {fm_mix}")
        self.fm_mix = fm_mix
        self.form = form
        self.time_sampler = time_sampler or TimeSampler()
        self.class_dropout = class_dropout
        self.null_class_id = null_class_id
        self.null_conditioning = null_conditioning

    def draw_dropout(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[batch_size] bool: which rows lose their condition (probability ``class_dropout``)."""
        device = generator.device if generator is not None else "cpu"
        return torch.rand(batch_size, generator=generator, device=device) < self.class_dropout

    def drop_conditions(self, batch: FlowBatch, drop: torch.Tensor) -> FlowBatch:
        """Replace the condition of the rows in ``drop`` by the null class / null conditioning and mark them."""
        drop = drop.to(batch.x.device)
        labels, conditioning = batch.class_labels, batch.conditioning
        if labels is not None:
            if self.null_class_id is None:
                raise ValueError("class_dropout > 0 needs null_class_id (the label id of the unconditional class)")
            labels = torch.where(drop, torch.full_like(labels, self.null_class_id), labels)
        if conditioning:
            if self.null_conditioning is None:
                raise ValueError("dropping text conditions needs null_conditioning (the empty-prompt encoding)")
            conditioning = {
                k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), self.null_conditioning[k].to(v.device, v.dtype), v)
                for k, v in conditioning.items()
            }
        null = drop if batch.null_mask is None else (drop | batch.null_mask)
        return replace(batch, class_labels=labels, conditioning=conditioning, null_mask=null)

    def forward(
        self,
        model: Callable[..., torch.Tensor],
        batch: FlowBatch,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        drop: torch.Tensor | None = None,
        **model_kwargs,
    ) -> PAFMLossOutput:
        """One loss evaluation; ``model(x_t, t, class_labels=..., **conditioning, **model_kwargs)`` returns v.

        ``t``, ``noise`` and the condition-dropout mask ``drop`` are drawn with ``generator`` unless given.
        """
        x = batch.x
        if t is None:
            t = self.time_sampler(x.shape[0], device=x.device, generator=generator)
        if noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if drop is None and self.class_dropout > 0:
            drop = self.draw_dropout(x.shape[0], generator)
        if drop is not None:
            batch = self.drop_conditions(batch, drop)
        path = sample_path(x, noise, t)
        target = self.posterior_target(batch, path.x_t, t, path.velocity)
        self.update_candidates(batch)  # after the target: a batch never competes with its own earlier copy

        conditioning = {**(batch.conditioning or {}), **model_kwargs}
        pred = model(path.x_t, t, class_labels=batch.class_labels, **conditioning).float()
        fm_rows = (pred - path.velocity.float()).pow(2).flatten(1).mean(1)
        post_rows = (pred - target.velocity.float()).pow(2).flatten(1).mean(1)
        if self.form == "sum":
            post_rows = post_rows + target.spread
        loss = self.fm_mix * fm_rows.mean() + (1 - self.fm_mix) * post_rows.mean()
        return PAFMLossOutput(
            loss=loss,
            fm_loss=fm_rows.mean().detach(),
            posterior_loss=(pred.detach() - target.velocity.float()).pow(2).mean(),
            spread=target.spread.mean(),
            ess=target.ess,
            self_weight=target.self_weight,
            effective_k=target.effective_k,
            temperature=target.temperature,
            t=t.detach(),
        )
