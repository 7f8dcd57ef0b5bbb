"""An exact reference for posterior samplers: a Gaussian image prior N(m, C) and its closed-form posteriors.

For x ~ N(m, C) (full C, e.g. fitted to real patches) and a linear operator y = A x + sigma eta (any of
:data:`~diffusers_pafm.OPERATORS`, written out as a matrix by applying it to the unit images), the posterior is

    p(x | y) = N(mu, S),  G = C A^T (A C A^T + sigma^2 I)^-1,  mu = m + G (y - A m),  S = C - G A C.

:func:`calibration_to_reference` scores J draws per observation against it: the RMS of the z-scores of the draws'
mean, (mean_J - mu) / sqrt(diag S) (about sqrt(1/J) for exact draws), the ratio of the draws' std to sqrt(diag S)
(1 for exact draws) and the coverage of the truth by the draws' central intervals (nominal for exact draws).
Computed in float64. :meth:`GaussianImagePrior.average_velocity` is the prior's exact flow map (and velocity): the
best model a flow-map or reward sampler can have, to test samplers apart from training.

What a *diagonal* noise adapter can reach (the VFM family's ceiling, no training): every map f(z) = m + W z with
W = C^(1/2) R (R a rotation) pushes N(0, I) to the prior; R = I is the probability-flow map that MeanFlow learns
from independent noise. Against it the posterior of z is N(mu_z, P^-1), P = I + W^T A^T A W / sigma^2, and the
ELBO's best diagonal q is mu_z with variances 1 / diag(P) (:meth:`GaussianImagePrior.diagonal_adapter_posterior`),
short of log p(y) by KL(q || p(z | y)) = 1/2 (sum_i log P_ii - log det P). :func:`fit_shared_rotation` finds the
one rotation (one prior-preserving map for every operator) that makes that gap smallest: how far re-coupling the
map, as joint VFM training does, can take a diagonal adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ..flow_maps.operators import DegradationOperator
from .metrics import interval_coverage

__all__ = [
    "GaussianImagePrior",
    "DiagonalAdapterPosterior",
    "operator_matrix",
    "calibration_to_reference",
    "diagonal_adapter_gap",
    "fit_shared_rotation",
]


@dataclass
class DiagonalAdapterPosterior:
    """The best diagonal Gaussian adapter's draws pushed through f(z) = m + W z, per observation (float64)."""

    means: torch.Tensor
    """[B, *shape]: m + W mu_z, the exact posterior mean (the reverse-KL mean field is exact in mean)."""
    covariances: torch.Tensor
    """[B, D, D]: W diag(1 / diag P) W^T."""
    kl_gap: torch.Tensor
    """[B] KL(q || p(z | y)) in nats: the ELBO's shortfall from log p(y)."""


@dataclass
class GaussianImagePrior:
    """N(m, C) over images of ``shape`` (C, H, W), or vectors of ``shape`` (D,); ``mean`` [D], ``covariance``
    [D, D] (stored as float64)."""

    mean: torch.Tensor
    covariance: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self):
        self.mean, self.covariance = self.mean.double(), self.covariance.double()  # the reference is computed in fp64

    @cached_property
    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C = V diag(lambda) V^T, once (every call of :meth:`average_velocity` works in this basis)."""
        return torch.linalg.eigh(self.covariance)

    @classmethod
    def fit(cls, images: torch.Tensor, ridge: float = 1e-4) -> "GaussianImagePrior":
        """The sample mean and covariance of ``images`` [N, C, H, W], plus ``ridge`` x I (keeps C invertible)."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"fit needs images [N >= 2, C, H, W], got shape {tuple(images.shape)}")
        flat = images.flatten(1).double()
        mean = flat.mean(0)
        centred = flat - mean
        covariance = centred.T @ centred / (flat.shape[0] - 1)
        covariance = covariance + ridge * torch.eye(flat.shape[1], dtype=torch.float64)
        return cls(mean, covariance, tuple(images.shape[1:]))

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[num_samples, C, H, W] float32 draws m + L eps (L the Cholesky factor of C)."""
        eps = torch.randn(num_samples, self.mean.numel(), generator=generator, dtype=torch.float64)
        x = self.mean + eps @ torch.linalg.cholesky(self.covariance).T
        return x.float().view(num_samples, *self.shape)

    def one_step_matrix(self, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """W = C^(1/2) R [D, D]: f(z) = m + W z pushes N(0, I) to N(m, C) for every rotation R; R = I (default) is
        the prior's probability-flow map (:meth:`average_velocity`'s u(z, 1, 0) = z - f(z))."""
        eigenvalues, eigenvectors = self._eigh
        root = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
        return root if rotation is None else root @ rotation.double()

    def noise_precision(self, a: torch.Tensor, sigma: float, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """P = I + W^T A^T A W / sigma^2: the precision of p(z | y) under f(z) = m + W z, for the operator matrix
        ``a`` [M, D] (:func:`operator_matrix`); it does not depend on y."""
        jacobian = a.double() @ self.one_step_matrix(rotation)
        return torch.eye(jacobian.shape[1], dtype=torch.float64) + jacobian.T @ jacobian / sigma**2

    def diagonal_adapter_posterior(
        self, operator: DegradationOperator, y: torch.Tensor, sigma: float, rotation: torch.Tensor | None = None
    ) -> DiagonalAdapterPosterior:
        """The best diagonal Gaussian q(z | y) against f(z) = m + W z (module docstring), for each sample of ``y``
        [B, ...] under its row of ``operator``, pushed to image space: exact in mean, wider or narrower than the
        posterior per pixel unless W^T A^T A W is diagonal."""
        exact_means, _ = self.posterior(operator, y, sigma)
        w = self.one_step_matrix(rotation)
        covariances, gaps = [], []
        for i in range(y.shape[0]):
            precision = self.noise_precision(operator_matrix(operator, i, self.shape), sigma, rotation)
            covariances.append(w @ torch.diag(1 / precision.diagonal()) @ w.T)
            gaps.append(diagonal_adapter_gap(precision))
        return DiagonalAdapterPosterior(exact_means.double(), torch.stack(covariances), torch.stack(gaps))

    def average_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None, class_labels=None
    ) -> torch.Tensor:
        """The exact flow map of the prior's path x_t = (1 - t) x + t eps as a model ``(x_t, t, r) -> u``.

        The marginals are N((1 - t) m, S_t), S_t = (1 - t)^2 C + t^2 I, all functions of C, so the probability-flow
        ODE moves x_t = (1 - t) m + S_t^(1/2) z along its noise z and

            u(x_t, t, r) = (x_t - x_r) / (t - r),  x_r = (1 - r) m + S_r^(1/2) S_t^(-1/2) (x_t - (1 - t) m),

        exact for every (t, r); at r = t (or ``r=None``) it is the marginal velocity v = E[eps - x | x_t] =
        -m + (t I - (1 - t) C) S_t^-1 (x_t - (1 - t) m). u(z, 1, 0) = z - (m + C^(1/2) z). ``x_t`` is [B, *shape]
        (or [B, D]); ``t``, ``r`` are [B] or scalars; ``class_labels`` is ignored (the signature of a flow map)."""
        flat = x_t.reshape(x_t.shape[0], -1).double()
        t = _per_row(t, flat.shape[0])
        r = t if r is None else _per_row(r, flat.shape[0])
        mean = self.mean
        eigenvalues, eigenvectors = self._eigh
        centred = (flat - (1 - t) * mean) @ eigenvectors  # in C's eigenbasis every S_t is diagonal
        scale_t = ((1 - t) ** 2 * eigenvalues + t**2).sqrt()
        velocity = -mean + ((t - (1 - t) * eigenvalues) / scale_t**2 * centred) @ eigenvectors.T
        scale_r = ((1 - r) ** 2 * eigenvalues + r**2).sqrt()
        x_r = (1 - r) * mean + (scale_r / scale_t * centred) @ eigenvectors.T
        step = t - r
        safe = torch.where(step.abs() > 1e-12, step, torch.ones_like(step))
        u = torch.where(step.abs() > 1e-12, (flat - x_r) / safe, velocity)
        return u.to(x_t.dtype).reshape(x_t.shape)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, r=None, class_labels=None) -> torch.Tensor:
        """The marginal velocity v(x_t, t) = E[eps - x | x_t] (:meth:`average_velocity` at r = t), as a velocity
        model ``(x_t, t, r, class_labels) -> v`` (``r`` and ``class_labels`` ignored)."""
        return self.average_velocity(x_t, t)

    def tilted(self, targets: torch.Tensor, precision: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward-tilted prior p_beta(x | c) ~ N(x; m, C) exp(R(x, c) / beta) for the quadratic reward
        R(x, c) = -1/2 (x - a_c)^T P (x - a_c): N(mu_c, S) with S = (C^-1 + P / beta)^-1 and
        mu_c = S (C^-1 m + P a_c / beta). ``targets`` a_c [num_contexts, D], ``precision`` P [D, D]; returns the
        means [num_contexts, D] and S [D, D] (float64)."""
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        inverse = torch.linalg.inv(self.covariance)
        cov = torch.linalg.inv(inverse + precision.double() / beta)
        return (inverse @ self.mean + targets.double() @ precision.double().T / beta) @ cov.T, cov

    def posterior(
        self, operator: DegradationOperator, y: torch.Tensor, sigma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact posterior of each sample of ``y`` [B, ...] under its row of ``operator``: means [B, C, H, W] and
        covariances [B, D, D] (module docstring)."""
        means, covariances = [], []
        for i in range(y.shape[0]):
            a = operator_matrix(operator, i, self.shape)
            observed = y[i].flatten().double()
            gram = a @ self.covariance @ a.T + sigma**2 * torch.eye(a.shape[0], dtype=torch.float64)
            gain = torch.linalg.solve(gram, a @ self.covariance).T  # C A^T (A C A^T + sigma^2 I)^-1 (gram symmetric)
            means.append(self.mean + gain @ (observed - a @ self.mean))
            cov = self.covariance - gain @ a @ self.covariance
            covariances.append((cov + cov.T) / 2)
        return torch.stack(means).view(y.shape[0], *self.shape), torch.stack(covariances)


def _per_row(time, rows: int) -> torch.Tensor:
    """A scalar or one time per row (any shape with ``rows`` entries, e.g. [B] or [B, 1, 1, 1]) as [rows, 1] fp64."""
    time = torch.as_tensor(time, dtype=torch.float64).reshape(-1)
    if time.numel() not in (1, rows):
        raise ValueError(f"a time must be a scalar or one value per row ({rows}), got {time.numel()} values")
    return time.expand(rows).reshape(rows, 1)


def operator_matrix(operator: DegradationOperator, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A of sample ``index`` as a [M, D] float64 matrix: the operator applied to the D unit images of ``shape``."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).view(d, *shape)
    rows = operator.select(torch.full((d,), index, dtype=torch.long))
    return rows(basis).reshape(d, -1).T.contiguous()


def calibration_to_reference(
    draws: torch.Tensor, truth: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor
) -> dict[str, float]:
    """Draws [B, J, C, H, W] of each observation against its exact posterior (``mean`` [B, C, H, W], ``covariance``
    [B, D, D]) and the truth [B, C, H, W] that produced it.

    Returns ``mean_z_rms`` (RMS over pixels and images of (mean_J - mu) / sqrt(diag S)), ``std_ratio`` (mean over
    pixels of the draws' std / sqrt(diag S)), ``std_ratio_rms`` (sqrt of the mean draw variance over the mean diag
    S), ``coverage_50`` and ``coverage_90`` (the truth inside the draws' central intervals, randomised rank,
    :func:`~.metrics.interval_coverage`)."""
    b, j = draws.shape[:2]
    draws, mean = draws.double().reshape(b, j, -1), mean.double().reshape(b, -1)
    variance = torch.diagonal(covariance.double(), dim1=-2, dim2=-1).clamp(min=1e-12)
    z = (draws.mean(1) - mean) / variance.sqrt()
    spread = draws.var(1, unbiased=True)
    return {
        "mean_z_rms": float(z.pow(2).mean().sqrt()),
        "std_ratio": float((spread.sqrt() / variance.sqrt()).mean()),
        "std_ratio_rms": float((spread.mean() / variance.mean()).sqrt()),
        "coverage_50": interval_coverage(draws, truth.double().reshape(b, -1), 0.5),
        "coverage_90": interval_coverage(draws, truth.double().reshape(b, -1), 0.9),
    }


def diagonal_adapter_gap(precision: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q || N(mu, P^-1)) of the best diagonal q (variances 1 / diag P) = 1/2 (sum_i log P_ii - log det P), for
    precisions ``precision`` [..., D, D], in the basis turned by ``rotation`` (R^T P R) if given; 0 iff P is diagonal
    there (Hadamard's inequality)."""
    if rotation is not None:
        precision = rotation.transpose(-1, -2) @ precision @ rotation
    log_diagonal = precision.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (log_diagonal - torch.linalg.slogdet(precision)[1])


def fit_shared_rotation(
    precisions: torch.Tensor, steps: int = 1500, lr: float = 1e-2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The rotation R [D, D] that minimises the mean :func:`diagonal_adapter_gap` over ``precisions`` [N, D, D]
    (joint approximate diagonalisation): R = exp(X - X^T), X by Adam from a small random start (``generator``).
    With the :meth:`GaussianImagePrior.noise_precision` of several operators it is the one prior-preserving linear
    map C^(1/2) R that suits a diagonal adapter best on all of them at once."""
    precisions = precisions.double()
    d = precisions.shape[-1]
    log_det = torch.linalg.slogdet(precisions)[1]  # rotation-invariant: computed once
    start = 1e-3 * torch.randn(d, d, generator=generator, dtype=torch.float64)
    skew = start.requires_grad_(True)
    optimizer = torch.optim.Adam([skew], lr=lr)
    for _ in range(steps):
        rotation = torch.linalg.matrix_exp(skew - skew.T)
        turned = rotation.T @ precisions @ rotation
        gap = 0.5 * (turned.diagonal(dim1=-2, dim2=-1).log().sum(-1) - log_det).mean()
        optimizer.zero_grad()
        gap.backward()
        optimizer.step()
    return torch.linalg.matrix_exp(skew - skew.T).detach()
