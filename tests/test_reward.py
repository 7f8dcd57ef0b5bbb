"""Reward-tilted one-step generation: the VFM objective with a reward as its data term, against closed forms.

Gaussian data x ~ N(m, C) with a rotated C and a quadratic reward R(x, c) = -1/2 (x - a_c)^T P (x - a_c) have the
tilted density p_beta(x | c) ~ N(x; m, C) exp(R(x, c) / beta) in closed form: N(mu_c, S) with
S = (C^-1 + P / beta)^-1, mu_c = S (C^-1 m + P a_c / beta). A linear flow map has an affine one-step map
f(z) = W z + b, so the pushforward of q(z | c) = N(mu, diag s^2) is exactly N(W mu + b, W diag(s^2) W^T).
"""

import math

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusers_pafm import (
    ClassifierReward,
    ContextNoiseAdapterModel,
    FlowMapModel,
    LinearFlowMapModel,
    MeanFlowLoss,
    RewardTerm,
    TwoTimeSampler,
    VFMLoss,
    reward_guided_sample,
    stop_gradient,
)
from diffusers_pafm.evaluation import FeatureClassifier, GaussianImagePrior
from diffusers_pafm.flow_maps import check_reward

ANGLE = math.pi / 5
ROTATION = torch.tensor([[math.cos(ANGLE), -math.sin(ANGLE)], [math.sin(ANGLE), math.cos(ANGLE)]])
MEAN = torch.tensor([0.5, -0.3])
COV = ROTATION @ torch.diag(torch.tensor([1.0, 0.25])) @ ROTATION.T
ROOT = ROTATION @ torch.diag(torch.tensor([1.0, 0.5])) @ ROTATION.T  # C^(1/2): the flow map of this path
TARGETS = torch.tensor([[1.5, 0.5], [-1.0, -1.0]])  # a_c for the two contexts
D = torch.tensor([2.0, 0.5])
PRECISION = torch.linalg.inv(ROOT) @ torch.diag(D) @ torch.linalg.inv(ROOT)  # W P W = diag(D): q can be exact


def quadratic_reward(x, context):
    delta = x - TARGETS[context]
    return -0.5 * torch.einsum("bi,ij,bj->b", delta, PRECISION, delta)


PRIOR = GaussianImagePrior(MEAN, COV, (2,))


def tilted(beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return PRIOR.tilted(TARGETS, PRECISION, beta)


exact_map = PRIOR.average_velocity  # u(z, 1, 0) = z - f(z), f(z) = m + C^(1/2) z
exact_velocity = PRIOR.velocity  # v(x_t, t) = E[eps - x | x_t] (a velocity model)


def pushforward(adapter, weight, bias):
    with torch.no_grad():
        q = adapter(torch.arange(len(TARGETS)))
    return q.mean @ weight.T + bias, weight @ torch.diag_embed(q.logvar.exp()) @ weight.T


def train(beta: float, joint: bool, steps: int, batch: int = 1024, lr: float = 1e-2):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    adapter = ContextNoiseAdapterModel(latent_shape=(2,), num_classes=len(TARGETS))
    loss_fn = VFMLoss(
        alpha=0.0,  # the flow-map term sees fresh noise only: it keeps the map a flow map of the untilted data
        tau=1.0,
        adapter_only=not joint,
        adaptive_power=0.0,
        meanflow=MeanFlowLoss(TwoTimeSampler(scheme="uniform", r_neq_t=0.5), adaptive_power=0.0),
    )
    flow_map = LinearFlowMapModel() if joint else None
    params = list(adapter.parameters()) + (list(flow_map.parameters()) if joint else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        x = MEAN + torch.randn(batch, 2, generator=generator) @ torch.linalg.cholesky(COV).T
        context = torch.randint(len(TARGETS), (batch,), generator=generator)
        out = loss_fn(
            FlowMapModel(flow_map) if joint else exact_map,
            adapter,
            x,
            RewardTerm(quadratic_reward, context, beta),
            context,
            target_model=stop_gradient(flow_map) if joint else exact_map,
            generator=generator,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
    weight, bias = flow_map.one_step_affine() if joint else (ROOT, MEAN)
    return (*pushforward(adapter, weight, bias), weight, bias, out)


def test_tilted_reference_by_completing_the_square():
    """``GaussianImagePrior.tilted``, the closed form, against a grid: the normalised N(m, C) exp(R / beta) has
    that mean and covariance."""
    beta = 0.7
    means, cov = tilted(beta)
    axis = torch.linspace(-6, 6, 601, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    prior = torch.distributions.MultivariateNormal(MEAN.double(), COV.double()).log_prob(grid)
    for c in range(len(TARGETS)):
        delta = grid - TARGETS[c].double()
        log_density = prior - 0.5 * torch.einsum("bi,ij,bj->b", delta, PRECISION.double(), delta) / beta
        w = torch.softmax(log_density, 0)
        mean = w @ grid
        centred = grid - mean
        torch.testing.assert_close(mean, means[c], atol=1e-6, rtol=0)
        torch.testing.assert_close((centred.T * w) @ centred, cov, atol=1e-6, rtol=0)


def test_reward_term_gradient_matches_the_hand_written_one_on_a_linear_map():
    """L = mean_b[-R(f(z_b)) / beta] + mean_b KL, z_b = mu_c + s_c eps_b, f(z) = m + W z, R quadratic: dL/dmu_c and
    dL/dlogvar_c by hand."""
    beta, batch = 0.5, 8
    adapter = ContextNoiseAdapterModel(latent_shape=(2,), num_classes=2)
    with torch.no_grad():
        adapter.table.weight.copy_(torch.tensor([[0.3, -0.2, -0.5, 0.1], [-0.4, 0.6, 0.2, -0.3]]))
    context = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    loss_fn = VFMLoss(adapter_only=True, adaptive_power=0.0)
    out = loss_fn(
        exact_map,
        adapter,
        torch.zeros(batch, 2),
        RewardTerm(quadratic_reward, context, beta),
        context,
        target_model=exact_map,
        generator=torch.Generator().manual_seed(3),
    )
    out.loss.backward()
    eps = randn_tensor((batch, 2), generator=torch.Generator().manual_seed(3))
    table = adapter.table.weight.detach()
    mu, logvar = table[context, :2], table[context, 2:]
    z = mu + torch.exp(0.5 * logvar) * eps
    x = MEAN + z @ ROOT.T
    dr_dz = -((x - TARGETS[context]) @ PRECISION.T) @ ROOT  # dR/dz = W^T dR/dx
    d_mu = (-dr_dz / beta + mu) / batch  # + d KL / d mu = mu
    d_logvar = (-dr_dz / beta * 0.5 * torch.exp(0.5 * logvar) * eps + 0.5 * (logvar.exp() - 1)) / batch
    expected = torch.zeros_like(table)
    expected.index_add_(0, context, torch.cat([d_mu, d_logvar], 1))
    torch.testing.assert_close(adapter.table.weight.grad, expected, atol=1e-5, rtol=1e-5)
    assert out.scalars()["reward"] == pytest.approx(float(quadratic_reward(x, context).mean()), rel=1e-5)


@pytest.mark.parametrize("beta", [0.3, 3.0])
def test_context_adapter_against_the_exact_map_recovers_the_tilted_density(beta):
    means, covariances, *_ = train(beta, joint=False, steps=1500)
    exact_means, exact_cov = tilted(beta)
    assert (means - exact_means).abs().max() <= 5e-2
    assert (covariances - exact_cov).abs().max() <= 5e-2


def test_joint_fine_tuning_recovers_the_tilted_density_and_keeps_the_map_a_flow_map_of_the_data():
    beta = 1.0
    means, covariances, weight, bias, _ = train(beta, joint=True, steps=1500)
    exact_means, exact_cov = tilted(beta)
    assert (bias - MEAN).abs().max() <= 5e-2 and (weight @ weight.T - COV).abs().max() <= 5e-2
    assert (means - exact_means).abs().max() <= 5e-2
    assert (covariances - exact_cov).abs().max() <= 5e-2


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_reward_guided_sampler_is_exact_for_a_linear_reward_on_the_exact_gaussian_velocity(beta):
    # For a Gaussian prior and R(x) = b.x, log E[exp(R / beta) | x_t] = b.x0_hat / beta + const: the guided
    # velocity is the tilted one exactly, so 200 Euler steps draw N(m + C b / beta, C) up to discretisation
    b = torch.tensor([[0.4, -0.3], [-0.2, 0.5]])
    labels = torch.arange(2).repeat_interleave(20000)
    noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(0))
    x = reward_guided_sample(exact_velocity, lambda x, c: (x * b[c]).sum(1), noise, beta, labels, 200)
    for c in range(2):
        draws = x[labels == c].double()
        assert torch.allclose(draws.mean(0), (MEAN + COV @ b[c] / beta).double(), atol=0.03)
        assert torch.allclose(torch.cov(draws.T), COV.double(), atol=0.03)
    unguided = reward_guided_sample(exact_velocity, lambda x, c: (x * b[c]).sum(1), noise, 1e9, labels, 200)
    assert (unguided.mean(0) - MEAN).abs().max() < 0.03  # no tilt: the prior
    with pytest.raises(ValueError, match="beta must be > 0"):
        reward_guided_sample(exact_velocity, lambda x, c: x.sum(1), noise, 0.0)


def test_classifier_reward_is_the_log_probability_of_the_context_class():
    torch.manual_seed(0)
    classifier = FeatureClassifier(1, 8, (10,))
    images = (torch.rand(4, 1, 8, 8) * 2 - 1).requires_grad_()
    labels = torch.tensor([3, 0, 9, 3])
    value = check_reward(ClassifierReward(classifier), images, labels)
    expected = torch.log_softmax(classifier(images)[0], 1)[torch.arange(4), labels]
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in classifier.parameters())  # the reward's classifier stays frozen


@pytest.mark.parametrize(
    ("reward", "error", "match"),
    [
        (lambda x, c: x.detach().flatten(1).sum(1), ValueError, "not differentiable in the images"),
        (lambda x, c: x.flatten(1).sum(1).tolist(), TypeError, "must return a tensor of shape \\[4\\]"),
        (lambda x, c: x.flatten(1), ValueError, "returned shape \\(4, 8\\) for 4 images"),
        (lambda x, c: x.sum(1) * float("nan"), FloatingPointError, "NaN/inf for images \\[0, 1, 2, 3\\]"),
    ],
)
def test_bad_rewards_are_clear_errors(reward, error, match):
    images = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(error, match=match):
        check_reward(reward, images)
    with pytest.raises(ValueError, match="beta .* must be positive"):
        RewardTerm(quadratic_reward, None, beta=0.0)
