"""Self-normalised importance weights over candidate endpoints and the posterior (PAFM) velocity.

For an intermediate x_t (diffusers convention, t = 1 is noise) and K candidate data endpoints z_j::

    l_ij   = -||x_t^i - (1 - t_i) z_j||^2 / (2 t_i^2)                      (Gaussian path log-likelihood)
    w_ij   = softmax_j( l_ij / T_i + log p(y_i | z_j) )                      (T = 1: the exact posterior)
    x^_i   = sum_j w_ij z_j                                                  (posterior mean of the endpoint)
    v^_i   = sum_j w_ij (x_t^i - z_j) / t_i = (x_t^i - x^_i) / t_i           (posterior velocity)
    ESS_i  = 1 / sum_j w_ij^2

With all N data points as candidates and T = 1, ``v^`` is the exact marginal (closed-form optimal) velocity.
Nothing here builds a B x K x D tensor: distances use the expansion ||a||^2 - 2 <a, b> + ||b||^2 as one matrix
product (after centring both sides on the candidate mean, which removes most of the cancellation error), and the
weighted endpoint is one more product, both chunked over K, in fp32, under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..paths import sample_to_velocity

__all__ = ["PosteriorVelocity", "posterior_velocity", "path_log_likelihoods", "temperature_for_target_ess"]

VELOCITY_T_FLOOR = 1e-12
"""t below which (x_t - x^) / t divides by this instead (x_t - x^ is then 0 to fp32 precision)"""


@dataclass
class PosteriorVelocity:
    """Output of :func:`posterior_velocity`."""

    velocity: torch.Tensor
    """(x_t - x^) / t, shape and dtype of ``x_t``."""
    weights: torch.Tensor
    """[B, K] fp32, rows sum to 1."""
    ess: torch.Tensor
    """[B] effective sample size 1 / sum_j w_ij^2, in [1, K]."""
    endpoint: torch.Tensor
    """x^ = sum_j w_ij z_j, the posterior mean of the data endpoint, fp32, shape of ``x_t``."""
    spread: torch.Tensor
    """[B] sum_j w_ij ||z_j - x^_i||^2; the weighted sum of per-candidate losses exceeds ||v - v^||^2 by spread/t^2."""
    temperature: torch.Tensor
    """[B] the temperature T used for each row."""


def _chunks(k: int, chunk_size: int):
    for start in range(0, k, chunk_size):
        yield slice(start, min(start + chunk_size, k))


@torch.no_grad()
def path_log_likelihoods(
    x_t: torch.Tensor,
    t: torch.Tensor,
    candidates: torch.Tensor,
    chunk_size: int = 4096,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """l_ij = -||x_t^i - (1 - t_i) z_j||^2 / (2 t_i^2) as a [B, K] fp32 matrix, in O(B K + (B + K) D) memory.

    ``candidates`` is ``[K, ...]`` (shared by the batch) or ``[B, K, ...]`` (one set per query); ``t`` must already
    be clamped away from 0. The log-normaliser -D log t - D/2 log 2 pi is a per-row constant and is left out.
    ``anchor`` ([D] or [B, D]) is the point both sides are centred on; default: the candidate mean.
    """
    batch = x_t.shape[0]
    per_query = candidates.ndim == x_t.ndim + 1
    xf = x_t.reshape(batch, -1).float()
    cf = (
        candidates.reshape(batch, candidates.shape[1], -1)
        if per_query
        else candidates.reshape(candidates.shape[0], -1)
    )
    if cf.shape[-1] != xf.shape[1]:
        raise ValueError(
            f"candidates have {cf.shape[-1]} features per endpoint but x_t has {xf.shape[1]}: "
            f"x_t {tuple(x_t.shape)} vs candidates {tuple(candidates.shape)}"
        )
    k = cf.shape[-2]
    one_minus_t = (1 - t.float()).unsqueeze(1)  # [B, 1]
    # Centre both sides on a: ||x_t - (1-t) z|| = ||(x_t - (1-t) a) - (1-t)(z - a)||.
    anchor = _candidate_mean(cf, chunk_size) if anchor is None else anchor
    xc = xf - one_minus_t * anchor
    logits = torch.empty(batch, k, dtype=torch.float32, device=x_t.device)
    x_sq = xc.pow(2).sum(1, keepdim=True)
    for s in _chunks(k, chunk_size):
        zc = cf[..., s, :].float() - anchor.unsqueeze(-2)
        dots = torch.bmm(zc, xc.unsqueeze(-1)).squeeze(-1) if per_query else xc @ zc.T
        z_sq = zc.pow(2).sum(-1)
        logits[:, s] = (x_sq - 2 * one_minus_t * dots + one_minus_t**2 * z_sq).clamp_min(0)
    return logits.div_(-2 * t.float().unsqueeze(1) ** 2)


def _candidate_mean(flat: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean over K of [K, D] or [B, K, D] candidates, chunked, in fp32."""
    k = flat.shape[-2]
    return sum(flat[..., s, :].float().sum(-2) for s in _chunks(k, chunk_size)) / k


def _ess(logits: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(logits, dim=1)
    return 1.0 / w.pow(2).sum(1)


@torch.no_grad()
def temperature_for_target_ess(
    path_logits: torch.Tensor,
    log_condition: torch.Tensor | None,
    target_ess: float,
    min_temperature: float = 1.0,
    max_temperature: float = 1e8,
    iterations: int = 40,
) -> torch.Tensor:
    """Per-row T in [min, max] with ESS(softmax(l / T + log p(y|z))) = ``target_ess``, by bisection on log T.

    ESS grows with T (flatter weights). Rows already above the target at ``min_temperature`` keep it (the default
    ``min_temperature = 1`` never sharpens the exact posterior); rows that cannot reach it (too few allowed
    candidates) get ``max_temperature``.
    """
    cond = 0.0 if log_condition is None else log_condition
    lo = torch.full(path_logits.shape[:1], float(min_temperature), device=path_logits.device).log()
    hi = torch.full_like(lo, float(max_temperature)).log()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = _ess(path_logits / mid.exp().unsqueeze(1) + cond) < target_ess
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    temperature = hi.exp()
    reached_at_min = _ess(path_logits / min_temperature + cond) >= target_ess
    return torch.where(reached_at_min, torch.full_like(temperature, min_temperature), temperature)


def _raise_non_finite(**tensors: torch.Tensor) -> None:
    """Name the first input holding NaN / inf and its rows (dim 0)."""
    for name, tensor in tensors.items():
        finite = (
            torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(1) if tensor.ndim > 1 else torch.isfinite(tensor)
        )
        if not finite.all():
            rows = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"{name} holds NaN or infinite values (rows {rows[:10]} of dim 0); they would make every weight NaN"
            )
    raise ValueError("the path log-likelihoods are not finite although every input is (overflow at tiny t?)")


@torch.no_grad()
def posterior_velocity(
    x_t: torch.Tensor,
    t: torch.Tensor,
    candidates: torch.Tensor,
    log_condition: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    target_ess: float | None = None,
    t_min: float = 1e-4,
    chunk_size: int = 4096,
) -> PosteriorVelocity:
    """Posterior (SNIS) velocity of ``x_t`` over candidate endpoints.

    Args:
        x_t: ``[B, ...]`` intermediates on the path x_t = (1 - t) x + t eps.
        t: ``[B]`` times (t = 1 is noise); clamped to ``[t_min, 1]`` so that 1/t stays finite.
        candidates: ``[K, ...]`` endpoints shared by the batch, or ``[B, K, ...]`` one set per query.
        log_condition: optional ``[B, K]`` condition log-likelihood log p(y_i | z_j); ``-inf`` masks a candidate.
        temperature: T in ``softmax(l / T + log_condition)``: T > 1 flattens, T < 1 sharpens; float or ``[B]``.
        target_ess: if given, overrides ``temperature`` with the per-row T whose ESS hits this value
            (:func:`temperature_for_target_ess`).
        t_min: lower clamp on t.
        chunk_size: candidates processed at once (bounds the fp32 copy of candidates to ``chunk_size x D``).
    """
    if x_t.ndim < 2 or t.shape != x_t.shape[:1]:
        raise ValueError(f"x_t must be [B, ...] with t of shape [B]; got x_t {tuple(x_t.shape)}, t {tuple(t.shape)}")
    per_query = candidates.ndim == x_t.ndim + 1
    if not per_query and candidates.ndim != x_t.ndim:
        raise ValueError(
            f"candidates must be [K, ...] or [B, K, ...] matching x_t {tuple(x_t.shape)}, "
            f"got {tuple(candidates.shape)}"
        )
    if per_query and candidates.shape[0] != x_t.shape[0]:
        raise ValueError(f"per-query candidates {tuple(candidates.shape)} do not match batch size {x_t.shape[0]}")
    batch, k = x_t.shape[0], candidates.shape[per_query]
    if log_condition is not None:
        if log_condition.shape != (batch, k):
            raise ValueError(f"log_condition must be [B, K] = [{batch}, {k}], got {tuple(log_condition.shape)}")
        log_condition = log_condition.float()
        all_masked = torch.isneginf(log_condition).all(1)
        if all_masked.any():
            rows = all_masked.nonzero().flatten().tolist()
            raise ValueError(f"rows {rows[:10]} have every candidate masked (-inf) by log_condition")

    t32 = t.float().clamp(t_min, 1.0)
    flat = candidates.reshape(batch, k, -1) if per_query else candidates.reshape(k, -1)
    anchor = _candidate_mean(flat, chunk_size)
    path_logits = path_log_likelihoods(x_t, t32, candidates, chunk_size=chunk_size, anchor=anchor)
    if not torch.isfinite(path_logits).all():  # a [B, K] check on the hot path; the inputs only when it fails
        _raise_non_finite(x_t=x_t, t=t, candidates=candidates)
    if target_ess is not None:
        temp = temperature_for_target_ess(path_logits, log_condition, target_ess)
    else:
        temp = torch.as_tensor(temperature, dtype=torch.float32, device=x_t.device).expand(batch)
    logits = path_logits / temp.unsqueeze(1)
    if log_condition is not None:
        logits = logits + log_condition
    weights = torch.softmax(logits, dim=1)
    ess = 1.0 / weights.pow(2).sum(1)

    # x^ = sum_j w_ij z_j (uncentred, so that a one-hot row returns its endpoint exactly); the spread uses the
    # centred identity sum_j w_ij ||z_j - x^_i||^2 = sum_j w_ij ||z_j - a||^2 - ||x^_i - a||^2.
    endpoint = torch.zeros(batch, flat.shape[-1], dtype=torch.float32, device=x_t.device)
    second_moment = torch.zeros(batch, dtype=torch.float32, device=x_t.device)
    for s in _chunks(k, chunk_size):
        w, z = weights[:, s], flat[..., s, :].float()
        endpoint += torch.bmm(w.unsqueeze(1), z).squeeze(1) if per_query else w @ z
        z_sq = (z - anchor.unsqueeze(-2)).pow(2).sum(-1)
        second_moment += (w * z_sq).sum(1) if per_query else w @ z_sq
    spread = (second_moment - (endpoint - anchor).pow(2).sum(1)).clamp_min(0)
    endpoint = endpoint.reshape(x_t.shape)
    # v^ = (x_t - x^) / t with the true t (not the t_min used for the logits): exact as t -> 0 given x_t
    velocity = sample_to_velocity(x_t.float(), t.float().clamp_min(VELOCITY_T_FLOOR), endpoint)
    return PosteriorVelocity(
        velocity=velocity.to(x_t.dtype),
        weights=weights,
        ess=ess,
        endpoint=endpoint,
        spread=spread,
        temperature=temp.clone(),
    )
