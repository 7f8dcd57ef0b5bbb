"""PosteriorEstimator: the posterior-weighted velocity target of a batch, shared by every objective that uses one.

It binds a candidate source (:mod:`.candidates`), a condition likelihood (:mod:`.likelihoods`) and a temperature
policy (fixed T, or per-row ``target_ess``) to :func:`~.posterior.posterior_velocity`::

    v^ = v_fm + (x - x^) / t,   x^ = sum_j w_j z_j,   w = softmax_j( l_j / T + log p(y | z_j) )

Writing v^ as v_fm + (x - x^)/t makes K = 1 (own endpoint only) give exactly the conditional target.
:class:`~.loss.PAFMLoss` regresses a velocity onto it; :class:`~diffusers_pafm.flow_maps.MeanFlowLoss` puts it
into the MeanFlow target (``docs/pafm.md`` derives both and states when their "sum" forms are unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from ..paths import append_dims
from .batch import CandidateSet, FlowBatch
from .candidates import CandidateSource
from .posterior import VELOCITY_T_FLOOR, posterior_velocity

__all__ = ["PosteriorEstimator", "PosteriorTarget"]


@dataclass
class PosteriorTarget:
    """The regression target for one batch and its diagnostics (all detached, fp32 per-row statistics)."""

    velocity: torch.Tensor
    """v^ [B, ...], dtype of x."""
    spread: torch.Tensor
    """[B] sum_j w_j ||z_j - x^||^2 / (t^2 D): what the sum form adds to the mean form, per dimension."""
    ess: torch.Tensor
    self_weight: torch.Tensor
    effective_k: torch.Tensor
    """[B] number of candidates not masked by the condition likelihood."""
    temperature: torch.Tensor
    weights: torch.Tensor | None = None
    drawn_endpoint: torch.Tensor | None = None
    """[B, ...] one candidate z_j per row drawn with probability w_j (when asked for): an unbiased one-sample
    handle on sums over the weighted candidates, fp32."""


@dataclass
class _Posterior:
    """What both candidate layouts hand to :meth:`PosteriorEstimator.posterior_target`."""

    endpoint: torch.Tensor
    weights: torch.Tensor
    ess: torch.Tensor
    spread: torch.Tensor
    temperature: torch.Tensor
    effective_k: torch.Tensor
    self_index: torch.Tensor
    drawn: torch.Tensor | None


def _draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One candidate index per row with probability ``weights`` [B, K] (drawn on the generator's device)."""
    return torch.multinomial(weights.to(generator.device), 1, generator=generator).squeeze(1).to(weights.device)


def _select_rows(batch: FlowBatch, rows: torch.Tensor) -> FlowBatch:
    """The rows ``rows`` of every per-row field of ``batch``."""
    pick = {
        f.name: (getattr(batch, f.name)[rows] if isinstance(getattr(batch, f.name), torch.Tensor) else None)
        for f in fields(FlowBatch)
        if f.name != "conditioning"
    }
    conditioning = None if batch.conditioning is None else {k: v[rows] for k, v in batch.conditioning.items()}
    return FlowBatch(**pick, conditioning=conditioning)


class PosteriorEstimator(nn.Module):
    """Posterior-weighted velocity target over a candidate source (module docstring).

    Args:
        candidates: a candidate source module (``None`` = the conditional target, no posterior computed).
        likelihood: a condition likelihood module (``None`` = path likelihood only).
        temperature: fixed T in softmax(l / T + log p(y|z)); T = 1 is the exact posterior over the candidates.
        target_ess: per-row T chosen so that the ESS reaches this value (overrides ``temperature``).
        t_min: t is clamped to [t_min, 1] inside the posterior.
        chunk_size: candidates processed at once in the posterior.
    """

    def __init__(
        self,
        candidates: CandidateSource | None = None,
        likelihood: nn.Module | None = None,
        temperature: float = 1.0,
        target_ess: float | None = None,
        t_min: float = 1e-4,
        chunk_size: int = 4096,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if candidates is not None and not isinstance(candidates, CandidateSource):
            raise TypeError(
                f"candidates must be a CandidateSource (subclass it: forward(batch) -> CandidateSet, update(batch) "
                f"if it keeps memory), got {type(candidates).__name__}"
            )
        self.candidates = candidates
        self.likelihood = likelihood
        self.temperature = temperature
        self.target_ess = target_ess
        self.t_min = t_min
        self.chunk_size = chunk_size

    @torch.no_grad()
    def posterior_target(
        self,
        batch: FlowBatch,
        x_t: torch.Tensor,
        t: torch.Tensor,
        fm_velocity: torch.Tensor,
        draw_generator: torch.Generator | bool | None = None,
    ) -> PosteriorTarget:
        """v^ = v_fm + (x - x^)/t with x^ the posterior mean over the candidate source's endpoints.

        ``draw_generator`` (a generator, or ``True`` for the global one) also draws one endpoint per row with
        probability w_j (:attr:`PosteriorTarget.drawn_endpoint`).
        """
        ones = torch.ones(batch.x.shape[0], device=batch.x.device)
        if self.candidates is None:
            drawn = batch.x.float() if draw_generator is not None else None
            return PosteriorTarget(fm_velocity, torch.zeros_like(ones), ones, ones, ones, ones, None, drawn)
        cands: CandidateSet = self.candidates(batch)
        generator = None
        if draw_generator is not None:
            generator = draw_generator if isinstance(draw_generator, torch.Generator) else torch.default_generator
        if cands.group_index is not None:
            post = self._grouped(batch, x_t, t, cands, generator)
        else:
            post = self._pooled(batch, x_t, t, cands, generator)
        t_safe = append_dims(t.float().clamp(VELOCITY_T_FLOOR, 1.0), batch.x.ndim)  # the true t: exact as t -> 0
        velocity = fm_velocity.float() + (batch.x.float() - post.endpoint.reshape(batch.x.shape)) / t_safe
        return PosteriorTarget(
            velocity=velocity.to(batch.x.dtype),
            spread=post.spread / (t.float().clamp(self.t_min, 1.0) ** 2 * batch.x[0].numel()),
            ess=post.ess,
            self_weight=post.weights.gather(1, post.self_index.unsqueeze(1)).squeeze(1),
            effective_k=post.effective_k,
            temperature=post.temperature,
            weights=post.weights,
            drawn_endpoint=post.drawn,
        )

    def _log_condition(self, batch: FlowBatch, cands: CandidateSet, rows: int) -> torch.Tensor | None:
        log_condition = None if self.likelihood is None else self.likelihood(batch, cands)
        if cands.valid is not None:
            valid = cands.valid if cands.valid.ndim == 2 else cands.valid.unsqueeze(0).expand(rows, -1)
            base = torch.zeros(valid.shape, device=valid.device) if log_condition is None else log_condition
            log_condition = base.masked_fill(~valid, float("-inf"))
        return log_condition

    def _pooled(self, batch, x_t, t, cands: CandidateSet, generator) -> _Posterior:
        """Shared [K, ...] or per-query [B, K, ...] candidates: one posterior call."""
        log_condition = self._log_condition(batch, cands, t.shape[0])
        post = posterior_velocity(
            x_t, t, cands.endpoints, log_condition, self.temperature, self.target_ess, self.t_min, self.chunk_size
        )
        effective_k = (
            torch.full_like(post.ess, cands.num_candidates)
            if log_condition is None
            else torch.isfinite(log_condition).sum(1).float()
        )
        drawn = None
        if generator is not None:
            index = _draw(post.weights, generator)
            rows = torch.arange(len(index), device=index.device)
            drawn = (cands.endpoints[rows, index] if cands.per_query else cands.endpoints[index]).float()
        return _Posterior(
            post.endpoint, post.weights, post.ess, post.spread, post.temperature, effective_k, cands.self_index, drawn
        )

    def _grouped(self, batch, x_t, t, cands: CandidateSet, generator) -> _Posterior:
        """Grouped candidates (class banks): the rows of each group are scored together against [their own
        endpoints, the group's K endpoints] with every other row's endpoint masked, i.e. exactly their per-query
        sets [own, *group], without gathering a B x (1 + K) x D tensor."""
        b, k = t.shape[0], cands.endpoints.shape[1]
        device = batch.x.device
        endpoint = torch.empty(b, batch.x[0].numel(), dtype=torch.float32, device=device)
        weights = torch.zeros(b, 1 + k, dtype=torch.float32, device=device)
        ess, spread, temperature, effective_k = (torch.empty(b, device=device) for _ in range(4))
        drawn = torch.empty_like(endpoint) if generator is not None else None
        for group in cands.group_index.unique().tolist():
            rows = (cands.group_index == group).nonzero().squeeze(1)
            n = len(rows)
            own_labels = None
            if cands.labels is not None:
                labels = (
                    batch.class_labels[rows] if batch.class_labels is not None else torch.full((n,), -1, device=device)
                )
                own_labels = torch.cat([labels.to(cands.labels.dtype), cands.labels[group]])
            own = torch.eye(n, dtype=torch.bool, device=device)
            valid = torch.cat([own, cands.valid[group].unsqueeze(0).expand(n, -1)], dim=1)
            pool = torch.cat([batch.x[rows].detach(), cands.endpoints[group].to(batch.x.dtype)])
            sub = _select_rows(batch, rows)
            sub_cands = CandidateSet(pool, torch.arange(n, device=device), own_labels, None, valid)
            log_condition = self._log_condition(sub, sub_cands, n)
            post = posterior_velocity(
                x_t[rows], t[rows], pool, log_condition, self.temperature, self.target_ess, self.t_min, self.chunk_size
            )
            endpoint[rows] = post.endpoint.reshape(n, -1)
            weights[rows, 0] = post.weights.diagonal()
            weights[rows, 1:] = post.weights[:, n:]
            ess[rows], spread[rows], temperature[rows] = post.ess, post.spread, post.temperature
            effective_k[rows] = torch.isfinite(log_condition).sum(1).float()
            if drawn is not None:
                drawn[rows] = pool.reshape(len(pool), -1)[_draw(post.weights, generator)].float()
        self_index = torch.zeros(b, dtype=torch.long, device=device)
        return _Posterior(endpoint, weights, ess, spread, temperature, effective_k, self_index, drawn)

    @torch.no_grad()
    def update_candidates(self, batch: FlowBatch) -> None:
        """Push ``batch`` into the candidate source's memory (ring buffers, class banks; a no-op for the others)."""
        if self.candidates is not None:
            self.candidates.update(batch)
