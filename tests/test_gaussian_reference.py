"""The Gaussian-prior reference of the calibration benchmark against independent forms of the same quantities."""

import math

import numpy as np
import pytest
import torch

from diffusers_pafm import OPERATORS, build_operator
from diffusers_pafm.evaluation import (
    GaussianImagePrior,
    calibration_to_reference,
    diagonal_adapter_gap,
    fit_shared_rotation,
    operator_matrix,
)

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


def test_velocity_is_the_conditional_expectation_by_gaussian_conditioning():
    """v(x_t, t) = E[eps - x | x_t] from the joint Gaussian of (x, eps, x_t): Cov(x, x_t) = (1 - t) C,
    Cov(eps, x_t) = t I, Cov(x_t) = (1 - t)^2 C + t^2 I (solved directly, not in C's eigenbasis)."""
    prior = rotated_prior()
    d = prior.mean.numel()
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t = torch.randn(5, *SHAPE, generator=gen, dtype=torch.float64)
    expected = []
    for ti, xi in zip(t, x_t.reshape(5, d)):
        gram = (1 - ti) ** 2 * prior.covariance + ti**2 * torch.eye(d, dtype=torch.float64)
        solved = torch.linalg.solve(gram, xi - (1 - ti) * prior.mean)
        expected.append(ti * solved - (prior.mean + (1 - ti) * prior.covariance @ solved))
    torch.testing.assert_close(prior.velocity(x_t, t).reshape(5, d), torch.stack(expected), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(prior.average_velocity(x_t, t, t), prior.velocity(x_t, t))


def test_average_velocity_is_the_solved_flow_and_its_one_step_map_pushes_noise_to_the_prior():
    angle = math.pi / 5
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]).double()
    covariance = rotation @ torch.diag(torch.tensor([1.2, 0.3], dtype=torch.float64)) @ rotation.T
    prior = GaussianImagePrior(torch.tensor([0.5, -0.3], dtype=torch.float64), covariance, (2,))
    x = torch.tensor([[1.0, -0.5], [-0.3, 0.8], [2.0, 1.0]], dtype=torch.float64)
    t, r = torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64), torch.tensor([0.0, 0.2, 0.9], dtype=torch.float64)
    # an independent solver: RK4 on the velocity from t to r
    steps, y = 400, x.clone()
    h = (r - t) / steps
    for i in range(steps):
        s = t + i * h
        k1 = prior.velocity(y, s)
        k2 = prior.velocity(y + h[:, None] / 2 * k1, s + h / 2)
        k3 = prior.velocity(y + h[:, None] / 2 * k2, s + h / 2)
        k4 = prior.velocity(y + h[:, None] * k3, s + h)
        y = y + h[:, None] / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(x - (t - r)[:, None] * prior.average_velocity(x, t, r), y, rtol=1e-8, atol=1e-8)
    # the one-step map f(z) = z - u(z, 1, 0) is m + W z with W symmetric and W W^T = C: it draws N(m, C)
    basis = torch.cat([torch.zeros(1, 2), torch.eye(2)]).double()
    f = basis - prior.average_velocity(basis, torch.ones(3), torch.zeros(3))
    weight = (f[1:] - f[0]).T
    torch.testing.assert_close(f[0], prior.mean)
    torch.testing.assert_close(weight, weight.T)
    torch.testing.assert_close(weight @ weight.T, covariance)


def test_diagonal_adapter_posterior_is_the_mean_field_optimum_of_the_noise_posterior():
    """Against f(z) = m + C^(1/2) z: the mean is the exact posterior mean, the variances 1 / diag(P) minimise
    KL(q || p(z | y)) over diagonal q (every perturbation raises torch.distributions' KL), the gap is that KL, and
    the pushforward covariance is W diag(1 / diag P) W^T, not the exact S for a rotated prior."""
    prior, sigma = rotated_prior(3), 0.1
    gen = torch.Generator().manual_seed(4)
    x = prior.sample(2, gen)
    operator = build_operator("box_inpaint", x.shape, gen)
    y = operator(x) + sigma * torch.randn(operator(x).shape, generator=gen)
    best = prior.diagonal_adapter_posterior(operator, y, sigma)
    exact_means, exact_covariances = prior.posterior(operator, y, sigma)
    np.testing.assert_allclose(best.means.numpy(), exact_means.numpy(), atol=1e-9)
    w = prior.one_step_matrix()
    np.testing.assert_allclose((w @ w.T).numpy(), prior.covariance.numpy(), atol=1e-10)
    for i in range(2):
        precision = prior.noise_precision(operator_matrix(operator, i, SHAPE), sigma)
        exact = torch.distributions.MultivariateNormal(
            torch.zeros(len(precision), dtype=torch.float64), precision_matrix=precision
        )

        def kl(variances):
            q = torch.distributions.MultivariateNormal(exact.loc, torch.diag(variances))
            return float(torch.distributions.kl_divergence(q, exact))

        variances = 1 / precision.diagonal()
        assert kl(variances) == pytest.approx(float(best.kl_gap[i]), rel=1e-8)
        for j in (0, 50, 150):
            for factor in (0.9, 1.1):
                assert kl(variances.index_put((torch.tensor(j),), variances[j] * factor)) > kl(variances)
        np.testing.assert_allclose(best.covariances[i].numpy(), (w @ torch.diag(variances) @ w.T).numpy(), atol=1e-12)
        assert (best.covariances[i] - exact_covariances[i]).abs().max() > 1e-3  # a diagonal q misses S here


def test_a_diagonal_adapter_is_exact_when_the_map_decouples_the_operator():
    """Diagonal C and a mask: W^T A^T A W is diagonal, so the best diagonal q is the exact posterior (gap 0)."""
    d = math.prod(SHAPE)
    spectrum = torch.linspace(0.05, 1.0, d, dtype=torch.float64)
    prior = GaussianImagePrior(torch.zeros(d, dtype=torch.float64), torch.diag(spectrum), SHAPE)
    gen = torch.Generator().manual_seed(5)
    x = prior.sample(2, gen)
    operator = build_operator("random_inpaint", x.shape, gen)
    y = operator(x) + 0.05 * torch.randn(operator(x).shape, generator=gen)
    best = prior.diagonal_adapter_posterior(operator, y, 0.05)
    _, exact_covariances = prior.posterior(operator, y, 0.05)
    np.testing.assert_allclose(best.covariances.numpy(), exact_covariances.numpy(), atol=1e-10)
    np.testing.assert_allclose(best.kl_gap.numpy(), 0.0, atol=1e-9)


def test_fit_shared_rotation_diagonalises_one_precision_and_lowers_the_gap_of_several():
    """One precision: its eigenvectors make the gap 0 (Hadamard), and the fit gets there. Several (the noise
    precisions of five tasks under a rotated prior): the fitted rotation lowers the mean gap below R = I's and keeps
    the map prior-preserving (W W^T = C)."""
    gen = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0]
    precision = basis @ torch.diag(torch.logspace(0, 2, 6, dtype=torch.float64)) @ basis.T
    assert float(diagonal_adapter_gap(precision)) > 0.5
    assert float(diagonal_adapter_gap(precision, torch.linalg.eigh(precision)[1])) == pytest.approx(0, abs=1e-10)
    rotation = fit_shared_rotation(precision[None], steps=800, lr=3e-2, generator=gen)
    assert float(diagonal_adapter_gap(precision, rotation)) < 1e-3

    shape = (1, 4, 4)
    d = math.prod(shape)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    prior = GaussianImagePrior(
        torch.zeros(d, dtype=torch.float64),
        basis @ torch.diag(torch.logspace(-2, 0, d, dtype=torch.float64)) @ basis.T,
        shape,
    )
    precisions = torch.stack(
        [
            prior.noise_precision(operator_matrix(build_operator(task, (1, *shape), gen), 0, shape), 0.05)
            for task in ("box_inpaint", "random_inpaint", "super_resolution_2x", "gaussian_blur")
        ]
    )
    rotation = fit_shared_rotation(precisions, steps=600, lr=3e-2, generator=gen)
    assert float(diagonal_adapter_gap(precisions, rotation).mean()) < 0.5 * float(
        diagonal_adapter_gap(precisions).mean()
    )
    np.testing.assert_allclose((rotation @ rotation.T).numpy(), np.eye(d), atol=1e-10)
    w = prior.one_step_matrix(rotation)
    np.testing.assert_allclose((w @ w.T).numpy(), prior.covariance.numpy(), atol=1e-10)
