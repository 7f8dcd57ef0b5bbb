"""The Gaussian-prior reference of the calibration benchmark against independent forms of the same quantities."""

import math

import numpy as np
import pytest
import torch

from diffusers_pafm import OPERATORS, build_operator
from diffusers_pafm.evaluation import GaussianImagePrior, calibration_to_reference, operator_matrix

SHAPE = (3, 8, 8)
TASKS = ("box_inpaint", "random_inpaint", "super_resolution_2x", "super_resolution_4x", "gaussian_blur")


def rotated_prior(seed: int = 0) -> GaussianImagePrior:
    gen = torch.Generator().manual_seed(seed)
    d = math.prod(SHAPE)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.logspace(-3, 0, d, dtype=torch.float64)
    covariance = basis @ torch.diag(spectrum) @ basis.T
    return GaussianImagePrior(torch.randn(d, generator=gen, dtype=torch.float64) * 0.3, covariance, SHAPE)


def test_fit_is_the_sample_mean_and_covariance():
    images = torch.randn(50, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    prior = GaussianImagePrior.fit(images, ridge=0.0)
    flat = images.flatten(1).numpy().astype(np.float64)
    np.testing.assert_allclose(prior.mean.numpy(), flat.mean(0), atol=1e-12)
    np.testing.assert_allclose(prior.covariance.numpy(), np.cov(flat, rowvar=False), atol=1e-12)
    with pytest.raises(ValueError, match="fit needs images"):
        GaussianImagePrior.fit(images[:1])


@pytest.mark.parametrize("task", sorted(OPERATORS))
def test_operator_matrix_applies_the_operator(task):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, *SHAPE, generator=gen, dtype=torch.float64)
    operator = build_operator(task, x.shape, gen)
    expected = operator(x).flatten(1)
    for i in range(4):
        np.testing.assert_allclose(operator_matrix(operator, i, SHAPE) @ x[i].flatten(), expected[i], atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_posterior_equals_the_information_form(task):
    """Kalman gain form against S = (C^-1 + A^T A / sigma^2)^-1, mu = S (C^-1 m + A^T y / sigma^2)."""
    prior, sigma = rotated_prior(), 0.05
    gen = torch.Generator().manual_seed(2)
    x = prior.sample(3, gen)
    operator = build_operator(task, x.shape, gen)
    y = operator(x) + sigma * torch.randn(operator(x).shape, generator=gen)
    means, covariances = prior.posterior(operator, y, sigma)
    precision = torch.linalg.inv(prior.covariance)
    for i in range(3):
        a = operator_matrix(operator, i, SHAPE)
        cov = torch.linalg.inv(precision + a.T @ a / sigma**2)
        mean = cov @ (precision @ prior.mean + a.T @ y[i].flatten().double() / sigma**2)
        np.testing.assert_allclose(covariances[i].numpy(), cov.numpy(), atol=1e-8)
        np.testing.assert_allclose(means[i].flatten().numpy(), mean.numpy(), atol=1e-7)


def test_scores_of_exact_and_of_over_confident_draws():
    """Exact posterior draws: std ratio 1, z RMS sqrt(1/J), nominal coverage; draws at half the posterior std: std
    ratio 0.5 and coverage 2 Phi(z_level / 2) - 1 (0.26 and 0.59)."""
    prior, sigma, b, j = rotated_prior(3), 0.05, 24, 400
    gen = torch.Generator().manual_seed(4)
    x = prior.sample(b, gen)
    operator = build_operator("box_inpaint", x.shape, gen)
    y = operator(x) + sigma * torch.randn(x.shape, generator=gen)
    means, covariances = prior.posterior(operator, y, sigma)
    eps = torch.randn(b, j, math.prod(SHAPE), generator=gen, dtype=torch.float64)
    factors = torch.linalg.cholesky(covariances + 1e-12 * torch.eye(covariances.shape[-1], dtype=torch.float64))
    spread = torch.einsum("bde,bje->bjd", factors, eps)
    for scale, (c50, c90) in ((1.0, (0.5, 0.9)), (0.5, (0.2611, 0.5887))):
        draws = (means.flatten(1).unsqueeze(1) + scale * spread).view(b, j, *SHAPE)
        scores = calibration_to_reference(draws, x, means, covariances)
        assert scores["std_ratio"] == pytest.approx(scale, rel=0.02)
        assert scores["std_ratio_rms"] == pytest.approx(scale, rel=0.02)
        assert scores["mean_z_rms"] == pytest.approx(scale / math.sqrt(j), rel=0.1)
        assert scores["coverage_50"] == pytest.approx(c50, abs=0.03)
        assert scores["coverage_90"] == pytest.approx(c90, abs=0.03)
