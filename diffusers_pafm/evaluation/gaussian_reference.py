"""An exact reference for posterior samplers: a Gaussian image prior N(m, C) and its closed-form posteriors.

For x ~ N(m, C) (full C, e.g. fitted to real patches) and a linear operator y = A x + sigma eta (any of
:data:`~diffusers_pafm.OPERATORS`, written out as a matrix by applying it to the unit images), the posterior is

    p(x | y) = N(mu, S),  G = C A^T (A C A^T + sigma^2 I)^-1,  mu = m + G (y - A m),  S = C - G A C.

:func:`calibration_to_reference` scores J draws per observation against it: the RMS of the z-scores of the draws'
mean, (mean_J - mu) / sqrt(diag S) (about sqrt(1/J) for exact draws), the ratio of the draws' std to sqrt(diag S)
(1 for exact draws) and the coverage of the truth by the draws' central intervals (nominal for exact draws).
Computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..flow_maps.operators import DegradationOperator
from .metrics import interval_coverage

__all__ = ["GaussianImagePrior", "operator_matrix", "calibration_to_reference"]


@dataclass
class GaussianImagePrior:
    """N(m, C) over images of ``shape`` (C, H, W); ``mean`` [D], ``covariance`` [D, D] (float64)."""

    mean: torch.Tensor
    covariance: torch.Tensor
    shape: tuple[int, ...]

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
