"""PosteriorEstimator: the posterior-weighted velocity target of a batch, shared by every objective that uses one.

It binds a candidate source (:mod:`.candidates`), a condition likelihood (:mod:`.likelihoods`) and a temperature
policy (fixed T, or per-row ``target_ess``) to :func:`~.posterior.posterior_velocity`::

    v^ = v_fm + (x - x^) / t,   x^ = sum_j w_j z_j,   w = softmax_j( l_j / T + log p(y | z_j) )

Writing v^ as v_fm + (x - x^)/t makes K = 1 (own endpoint only) give exactly the conditional target.
:class:`~.loss.PAFMLoss` regresses a velocity onto it; :class:`~diffusers_pafm.flow_maps.MeanFlowLoss` puts it
into the MeanFlow target (``docs/pafm.md`` derives both and states when their "sum" forms are unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass

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
        log_condition = None if self.likelihood is None else self.likelihood(batch, cands)
        if cands.valid is not None:
            valid = cands.valid if cands.valid.ndim == 2 else cands.valid.unsqueeze(0).expand(t.shape[0], -1)
            base = torch.zeros(valid.shape, device=valid.device) if log_condition is None else log_condition
            log_condition = base.masked_fill(~valid, float("-inf"))
        post = posterior_velocity(
            x_t, t, cands.endpoints, log_condition, self.temperature, self.target_ess, self.t_min, self.chunk_size
        )
        t_safe = append_dims(t.float().clamp(VELOCITY_T_FLOOR, 1.0), batch.x.ndim)  # the true t: exact as t -> 0
        velocity = fm_velocity.float() + (batch.x.float() - post.endpoint) / t_safe
        dim = batch.x[0].numel()
        effective_k = (
            torch.full_like(ones, cands.num_candidates)
            if log_condition is None
            else torch.isfinite(log_condition).sum(1).float()
        )
        drawn = None
        if draw_generator is not None:
            generator = draw_generator if isinstance(draw_generator, torch.Generator) else None
            index = torch.multinomial(
                post.weights.to(generator.device if generator else "cpu"), 1, generator=generator
            )
            index = index.squeeze(1).to(post.weights.device)
            rows = torch.arange(len(index), device=index.device)
            drawn = (cands.endpoints[rows, index] if cands.per_query else cands.endpoints[index]).float()
        return PosteriorTarget(
            velocity=velocity.to(batch.x.dtype),
            spread=post.spread / (t.float().clamp(self.t_min, 1.0) ** 2 * dim),
            ess=post.ess,
            self_weight=post.weights.gather(1, cands.self_index.unsqueeze(1)).squeeze(1),
            effective_k=effective_k,
            temperature=post.temperature,
            weights=post.weights,
            drawn_endpoint=drawn,
        )

    @torch.no_grad()
    def update_candidates(self, batch: FlowBatch) -> None:
        """Push ``batch`` into the candidate source's memory (ring buffers, class banks; a no-op for the others)."""
        if self.candidates is not None:
            self.candidates.update(batch)
