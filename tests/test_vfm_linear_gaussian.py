"""The paper's Prop 3.1 setting: Gaussian data, a flow map linear in x, a linear observation.

x ~ N(m, S), y = A x + sigma * eta. The exact posterior is N(m + G (y - A m), S - G A S) with
G = S A^T (A S A^T + sigma^2 I)^-1 (Kalman). Both runs start from the same mismatched flow map (u = 0, i.e. the map
of N(0, I) data). Joint VFM (reduction="sum": the per-sample negative ELBO) must recover the exact posterior mean and
covariance; the adapter trained alone against the frozen mismatched map must be measurably biased.

The one-step map f(z) = z - u(z, 1, 0) of a linear flow map is affine, f(z) = W z + b, so the pushforward of
q(z | y) = N(mu, diag(s^2)) is exactly N(W mu + b, W diag(s^2) W^T): no Monte Carlo in the comparison.
"""

import pytest
import torch
from torch import nn

from diffusers_pafm import (
    FlowMapModel,
    LinearFlowMapModel,
    MeanFlowLoss,
    Measurement,
    TwoTimeSampler,
    VFMLoss,
    stop_gradient,
)
from diffusers_pafm.evaluation import GaussianImagePrior
from diffusers_pafm.flow_maps import MatrixOperator
from diffusers_pafm.models import MLPNoiseAdapterModel

MEAN = torch.tensor([0.5, -0.3])
COV = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
A = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
SIGMA = 0.5
MODE = "double_backward"  # exact like forward AD (tests/test_flow_map.py) and faster on a model this small
Y_TEST = torch.tensor([[-1.0, 0.5], [0.5, -0.6], [1.5, -2.0]])


def exact_posterior(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gain = COV @ A.T @ torch.linalg.inv(A @ COV @ A.T + SIGMA**2 * torch.eye(len(A)))
    return MEAN + (y - A @ MEAN) @ gain.T, COV - gain @ A @ COV


def train(joint: bool, steps: int = 6000, batch: int = 2048):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    flow_map = LinearFlowMapModel()
    adapter = MLPNoiseAdapterModel(observation_dim=2, latent_dim=2, num_layers=0)  # q linear-Gaussian in y
    loss_fn = VFMLoss(
        sigma=SIGMA,
        tau=10.0,
        alpha=0.5,
        adapter_only=not joint,
        adaptive_power=0.0,
        reduction="sum",
        meanflow=MeanFlowLoss(TwoTimeSampler(scheme="uniform", r_neq_t=0.5), adaptive_power=0.0, mode=MODE),
    )
    observe = MatrixOperator(A, "linear")
    params = list(adapter.parameters()) + (list(flow_map.parameters()) if joint else [])
    optimizer = torch.optim.Adam(params, lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        x = MEAN + torch.randn(batch, 2, generator=generator) @ torch.linalg.cholesky(COV).T
        measurement = Measurement.simulate(x, torch.zeros(batch, dtype=torch.long), [observe], SIGMA, generator)
        y = measurement.groups[0][2]
        out = loss_fn(
            FlowMapModel(flow_map),
            lambda obs, task: adapter(obs),
            x,
            measurement,
            y,
            target_model=stop_gradient(flow_map),
            generator=generator,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
    weight, bias = flow_map.one_step_affine()
    with torch.no_grad():
        q = adapter(Y_TEST)
    means = q.mean @ weight.T + bias
    covariances = weight @ torch.diag_embed(q.logvar.exp()) @ weight.T
    return means, covariances, weight, bias


def test_exact_posterior_reference_by_bayes_rule():
    """The Kalman closed form equals brute-force conditioning of the joint Gaussian of (x, y)."""
    joint_cov = torch.cat(
        [torch.cat([COV, COV @ A.T], 1), torch.cat([A @ COV, A @ COV @ A.T + SIGMA**2 * torch.eye(2)], 1)]
    )
    precision = torch.linalg.inv(joint_cov)
    cov = torch.linalg.inv(precision[:2, :2])
    mean = MEAN - (Y_TEST - A @ MEAN) @ (cov @ precision[:2, 2:]).T
    ref_mean, ref_cov = exact_posterior(Y_TEST)
    torch.testing.assert_close(ref_mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_cov, cov, atol=1e-5, rtol=0)


def test_joint_training_recovers_the_exact_posterior_and_adapter_only_is_biased():
    exact_mean, exact_cov = exact_posterior(Y_TEST)

    means, covariances, weight, bias = train(joint=True)
    assert (means - exact_mean).abs().max() <= 1e-2
    assert (covariances - exact_cov).abs().max() <= 1e-2
    # and the map stays a generator of the data: f#N(0, I) = N(b, W W^T) ~ N(m, S)
    assert (bias - MEAN).abs().max() <= 3e-2
    assert (weight @ weight.T - COV).abs().max() <= 5e-2

    means, covariances, weight, bias = train(joint=False, steps=2000)
    torch.testing.assert_close(weight, torch.eye(2))  # frozen: still the N(0, I) map
    assert (means - exact_mean).abs().max() >= 0.05  # biased: it conditions the wrong prior


def test_observation_term_reaches_the_flow_map_only_through_the_trained_map_as_target():
    """target_model = the trained map (``--observation_trains_flow_map``) adds exactly the gradient of the observation
    term |y - A f(z)|^2 / (2 sigma^2), f(z) = z - u(z, 1, 0), to the map's gradient; a stop-gradient target adds none.
    Same seeds, so both runs see the same z, the same noise and the same (t, r)."""
    torch.manual_seed(0)
    flow_map = LinearFlowMapModel()
    nn.init.normal_(flow_map.coefficients[-1].weight, std=0.3)  # a non-trivial map (zero-init gives f(z) = z)
    adapter = MLPNoiseAdapterModel(observation_dim=2, latent_dim=2, num_layers=1)
    x = MEAN + torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    measurement = Measurement.simulate(
        x, torch.zeros(16, dtype=torch.long), [MatrixOperator(A, "linear")], SIGMA, torch.Generator().manual_seed(2)
    )
    y = measurement.groups[0][2]
    loss_fn = VFMLoss(sigma=SIGMA, alpha=0.5, adaptive_power=0.0, reduction="sum")

    def map_gradient(target_model):
        flow_map.zero_grad()
        out = loss_fn(
            FlowMapModel(flow_map),
            lambda obs, task: adapter(obs),
            x,
            measurement,
            y,
            target_model=target_model,
            generator=torch.Generator().manual_seed(3),
        )
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in flow_map.parameters()]

    loss_sg, grad_sg = map_gradient(stop_gradient(flow_map))
    loss_learn, grad_learn = map_gradient(FlowMapModel(flow_map))
    assert loss_learn == loss_sg  # the same objective value; only where its gradient goes differs

    flow_map.zero_grad()
    with torch.no_grad():
        z = adapter(y).sample(torch.Generator().manual_seed(3))  # the loss draws z first from its generator
    ones = torch.ones(16)
    f = z - flow_map(z, 1000 * ones, 0 * ones, return_dict=False)[0]
    ((y - f @ A.T).pow(2).sum(1).mean() / (2 * SIGMA**2)).backward()
    for learn, sg, param in zip(grad_learn, grad_sg, flow_map.parameters()):
        torch.testing.assert_close(learn - sg, param.grad, atol=1e-4, rtol=1e-4)
    assert max(float(p.grad.abs().max()) for p in flow_map.parameters()) > 1e-2  # the term is not trivially zero


def test_rotated_prior_adapter_alone_against_the_exact_map_is_biased_in_covariance_as_the_closed_form_predicts():
    """Prop 3.1's mechanism with a rotated prior covariance and a non-diagonal operator. Against the *exact* one-step
    map f(z) = m + C^(1/2) z, the posterior in z is N(mu_z, S_z), S_z = C^(-1/2) S C^(-1/2), not diagonal. The best
    diagonal Gaussian q (the ELBO's reverse KL) has precisions diag(S_z^-1): exact in mean, off in covariance. The
    adapter trained alone must land on that closed form, so its pushforward covariance misses S, which is what joint
    training has to fix (``benchmarks/README.md`` reports how close it gets)."""
    angle = torch.tensor(torch.pi / 5)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    cov = rotation @ torch.diag(torch.tensor([1.2, 0.3])) @ rotation.T
    a = torch.tensor([[1.0, 0.6], [-0.4, 1.5]])
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T  # C^(1/2), the exact map's one-step matrix

    exact_map = GaussianImagePrior(MEAN, cov, (2,)).average_velocity  # u(z, 1, 0) = z - f(z), f(z) = m + root z

    gain = cov @ a.T @ torch.linalg.inv(a @ cov @ a.T + SIGMA**2 * torch.eye(2))
    post_mean, post_cov = MEAN + (Y_TEST - a @ MEAN) @ gain.T, cov - gain @ a @ cov
    s_z = torch.linalg.inv(root) @ post_cov @ torch.linalg.inv(root)
    best_diagonal = root @ torch.diag(1 / torch.linalg.inv(s_z).diagonal()) @ root
    assert (best_diagonal - post_cov).abs().max() > 0.05  # the closed form says: a diagonal q cannot be exact

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    adapter = MLPNoiseAdapterModel(observation_dim=2, latent_dim=2, num_layers=0)
    loss_fn = VFMLoss(sigma=SIGMA, adapter_only=True, adaptive_power=0.0, reduction="sum")
    observe = MatrixOperator(a, "linear")
    optimizer = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 2500)
    for _ in range(2500):
        x = MEAN + torch.randn(1024, 2, generator=generator) @ torch.linalg.cholesky(cov).T
        measurement = Measurement.simulate(x, torch.zeros(1024, dtype=torch.long), [observe], SIGMA, generator)
        y = measurement.groups[0][2]
        out = loss_fn(
            exact_map, lambda o, task: adapter(o), x, measurement, y, target_model=exact_map, generator=generator
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        means = MEAN + adapter(Y_TEST).mean @ root.T
        # the posterior covariance does not depend on y: average q's over observations of the data
        x = MEAN + torch.randn(4096, 2, generator=generator) @ torch.linalg.cholesky(cov).T
        y = Measurement.simulate(x, torch.zeros(4096, dtype=torch.long), [observe], SIGMA, generator).groups[0][2]
        covariance = root @ torch.diag(adapter(y).logvar.exp().mean(0)) @ root
    assert (means - post_mean).abs().max() <= 2e-2  # exact in mean
    assert (covariance - best_diagonal).abs().max() <= 2e-2  # the closed-form best diagonal q ...
    assert (covariance - post_cov).abs().max() >= 0.05  # ... which is biased in covariance


def _train_two_task_adapter(reduction: str, decoder: torch.Tensor | None, steps: int = 2000):
    """A linear two-task adapter against the exact one-step map of its prior (see the test below); returns the
    per-task posterior variances of q in z (averaged over observations: they do not depend on y)."""
    latent_dim = 4 if decoder is None else decoder.shape[1]
    pixel_dim = 4 if decoder is None else decoder.shape[0]
    scale = torch.tensor([1.0, 0.5, 1.5, 0.8])[:latent_dim]  # f(z) = m + diag(scale) z: the prior N(m, diag(scale^2))
    mean = torch.tensor([0.3, -0.2, 0.1, 0.4])[:latent_dim]
    operators = [MatrixOperator(torch.eye(pixel_dim)), MatrixOperator(torch.eye(pixel_dim)[[0, 2]])]  # m = 4 and 2
    decode = None if decoder is None else (lambda x: x @ decoder.T)

    def exact_map(z, t, r, class_labels=None):  # u(z, 1, 0) = z - f(z)
        return z - (mean + z * scale)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    adapter = MLPNoiseAdapterModel(observation_dim=pixel_dim, latent_dim=latent_dim, num_layers=0, num_tasks=2)
    loss_fn = VFMLoss(sigma=SIGMA, adapter_only=True, adaptive_power=0.0, reduction=reduction, decode=decode)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def observe(batch):
        x = mean + torch.randn(batch, latent_dim, generator=generator) * scale
        task_ids = torch.arange(batch) % 2
        pixels = x if decode is None else decode(x)
        measurement = Measurement.simulate(pixels, task_ids, operators, SIGMA, generator)
        return x, task_ids, measurement, measurement.pseudo_inverse(pixels)

    for _ in range(steps):
        x, task_ids, measurement, y_image = observe(1024)
        out = loss_fn(exact_map, adapter, x, measurement, y_image, task_ids=task_ids, target_model=exact_map)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        x, task_ids, measurement, y_image = observe(4096)
        variance = adapter(y_image, task_ids).logvar.exp()
    return [variance[task_ids == task].mean(0) for task in (0, 1)], operators, scale, decoder


def _posterior_variance_in_z(operator, scale, decoder, likelihood_weight: float = 1.0):
    """diag of (I + w J^T J / sigma^2)^-1, J = A D diag(scale): the exact posterior of z (w = 1), or the one of a
    likelihood tempered by w. Every J here has orthogonal columns, so the posterior is diagonal and q can be exact."""
    jacobian = operator.matrix @ (torch.eye(len(scale)) if decoder is None else decoder) @ torch.diag(scale)
    precision = torch.eye(len(scale)) + likelihood_weight * jacobian.T @ jacobian / SIGMA**2
    assert (precision - torch.diag(precision.diagonal())).abs().max() < 1e-6
    return 1 / precision.diagonal()


@pytest.mark.parametrize("space", ["pixels", "latents"])
def test_elbo_weighting_calibrates_a_multi_task_adapter_on_every_task_and_the_per_dimension_mean_tempers_it(space):
    """One adapter, two tasks with different measurement sizes (all 4 coordinates, or 2 of them), in pixel space and
    through a linear decoder from a 2-d latent to 4 pixels. Against the exact map of the prior, the ELBO
    (``reduction="sum"``: the observation term summed over measured dimensions, the KL over latent ones) makes q the
    exact posterior on *both* tasks. The per-dimension mean (the official ImageNet weighting) tempers the likelihood
    of each task by (latent dims / measured dims), exactly as its closed form predicts: over-confident where fewer
    dimensions are measured than there are latent ones, under-confident through a decoder to more pixels."""
    decoder = None if space == "pixels" else torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]) * 0.8
    variances, operators, scale, decoder = _train_two_task_adapter("sum", decoder)
    for variance, operator in zip(variances, operators):
        exact = _posterior_variance_in_z(operator, scale, decoder)
        torch.testing.assert_close(variance, exact, rtol=0.05, atol=2e-3)

    variances, operators, scale, decoder = _train_two_task_adapter("mean", decoder)
    for variance, operator in zip(variances, operators):
        weight = len(scale) / operator.matrix.shape[0]  # the mean divides the KL by d and the observation by m
        tempered = _posterior_variance_in_z(operator, scale, decoder, weight)
        torch.testing.assert_close(variance, tempered, rtol=0.05, atol=2e-3)
        if weight != 1:
            exact = _posterior_variance_in_z(operator, scale, decoder)
            assert ((variance - exact).abs() / exact).max() > 0.2  # measurably miscalibrated
