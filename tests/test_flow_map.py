"""Two-time flow-map DiT and the MeanFlow objective against closed forms and finite differences."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusers_pafm.flow_maps import (
    FlowMapModel,
    MeanFlowLoss,
    OneStepDistillation,
    TwoTimeSampler,
    meanflow_target,
    one_step_distillation_loss,
    sample_flow_map,
)
from diffusers_pafm.models import FlowMapTransformer2DModel, build_dit

S = 0.5  # data x ~ N(0, S^2 I): sigma_t^2 = (1 - t)^2 S^2 + t^2 and the flow is a scaling


def sigma(t):
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def gaussian_u(x, t, r, class_labels=None):
    """Exact average velocity of N(0, S^2): x_r = sigma_r / sigma_t x_t, u = (x_t - x_r) / (t - r)."""
    t, r = t.view(-1, *[1] * (x.ndim - 1)), r.view(-1, *[1] * (x.ndim - 1))
    return x * (1 - sigma(r) / sigma(t)) / (t - r)


def flow_map(seed=0, prediction_type="velocity"):
    torch.manual_seed(seed)
    fm = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 1, 8, 10), prediction_type=prediction_type)
    torch.nn.init.normal_(fm.interval_embedder.linear_2.weight, std=0.1)  # as after some training
    return fm


def test_flow_map_starts_as_the_flow_matching_dit_and_round_trips(tmp_path):
    torch.manual_seed(0)
    dit = build_dit("test", 1, 8, 10).eval()
    dit.save_pretrained(tmp_path / "dit")
    fm = FlowMapTransformer2DModel.from_pretrained(tmp_path / "dit").eval()  # initialised from the FM checkpoint
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3) * 1000, torch.tensor([1, 2, 10])
    expected = dit(x, timestep=t, class_labels=y, return_dict=False)[0]
    for r in (t, 0.3 * t, torch.zeros(3)):  # same DiT for every r until the interval embedding trains
        torch.testing.assert_close(fm(x, t, r, y, return_dict=False)[0], expected, rtol=0, atol=0)
    trained = flow_map().eval()
    trained.save_pretrained(tmp_path / "fm")
    reloaded = FlowMapTransformer2DModel.from_pretrained(tmp_path / "fm").eval()
    out = trained(x, t, 0.3 * t, y, return_dict=False)[0]
    torch.testing.assert_close(reloaded(x, t, 0.3 * t, y, return_dict=False)[0], out, rtol=0, atol=0)
    assert (out - expected).abs().max() > 1e-3  # r now matters


def test_sample_prediction_steps_towards_the_networks_endpoint_estimate(tmp_path):
    """prediction_type="sample": the raw output is x_hat, x_r = (r/t) x_t + (1 - r/t) x_hat, one step gives x_hat."""
    raw = flow_map().eval()  # velocity type: returns the raw network output
    fm = FlowMapTransformer2DModel.from_flow_matching(raw, prediction_type="sample").eval()  # same weights
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([0, 4, 10])
    t, r = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.0, 0.2, 0.3])
    with torch.no_grad():
        x_hat = raw(x, 1000 * t, 1000 * r, y, return_dict=False)[0]
        u = FlowMapModel(fm)(x, t, r, y)
        w = (r / t).view(-1, 1, 1, 1)
        torch.testing.assert_close(x - (t - r).view(-1, 1, 1, 1) * u, w * x + (1 - w) * x_hat)
        one_step = sample_flow_map(FlowMapModel(fm), x, 1, class_labels=y)
        torch.testing.assert_close(one_step, raw(x, torch.full((3,), 1000.0), torch.zeros(3), y, return_dict=False)[0])
        # t -> 0: the division is clamped at min_sample_time (0.05), so u stays finite
        zero = torch.zeros(3)
        u0 = FlowMapModel(fm)(x, zero, zero, y)
        torch.testing.assert_close(u0, (x - raw(x, zero, zero, y, return_dict=False)[0]) / 0.05)
    fm.save_pretrained(tmp_path / "fm")
    reloaded = FlowMapTransformer2DModel.from_pretrained(tmp_path / "fm").eval()
    assert reloaded.config.prediction_type == "sample"
    with torch.no_grad():
        torch.testing.assert_close(FlowMapModel(reloaded)(x, t, r, y), u, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        FlowMapTransformer2DModel.from_flow_matching(raw, prediction_type="epsilon")


def test_time_embedding_scale_feeds_the_embedders_a_rescaled_time(tmp_path):
    """time_embedding_scale = s: the embedders see s t, so the map equals a default one (1000 t) run at s t / 1000."""
    default = flow_map().eval()
    raw_t = FlowMapTransformer2DModel.from_config({**default.config, "time_embedding_scale": 1.0}).eval()
    raw_t.load_state_dict(default.state_dict())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([0, 4, 10])
    t, r = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.0, 0.2, 0.3])
    with torch.no_grad():  # both take diffusers' timesteps (1000 t); only the embedders' input differs
        torch.testing.assert_close(raw_t(x, 1000 * t, 1000 * r, y).sample, default(x, t, r, y).sample)
        # d u / d t through the embedding shrinks with the scale (the MeanFlow target's (t - r) du/dt term)
        h = 1e-3
        slope = {
            name: (m(x, 1000 * (t + h), 1000 * r, y).sample - m(x, 1000 * (t - h), 1000 * r, y).sample).abs().mean()
            for name, m in (("default", default), ("raw_t", raw_t))
        }
    assert slope["raw_t"] < 0.1 * slope["default"]
    raw_t.save_pretrained(tmp_path / "fm")
    assert FlowMapTransformer2DModel.from_pretrained(tmp_path / "fm").config.time_embedding_scale == 1.0
    built = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 1, 8, 10), time_embedding_scale=1.0)
    assert built.config.time_embedding_scale == 1.0
    with pytest.raises(ValueError, match="time_embedding_scale"):
        FlowMapTransformer2DModel.from_config({**default.config, "time_embedding_scale": 0.0})


def test_meanflow_target_of_the_exact_gaussian_flow_map_is_itself():
    """E[u_tgt | x_t] = v_bar - (t - r) du/dt = u for the true map (the target is linear in the tangent v)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.8 + 0.2
    r = t * torch.rand(6, dtype=torch.float64) * 0.9
    v_bar = x * ((t - (1 - t) * S**2) / sigma(t) ** 2).view(-1, 1)  # marginal velocity of N(0, S^2)
    for mode in ("jvp", "finite_difference"):
        target = meanflow_target(gaussian_u, x, t, r, v_bar, mode=mode, fd_step=1e-4)
        torch.testing.assert_close(target.double(), gaussian_u(x, t, r), atol=1e-5, rtol=0)


def test_meanflow_loss_is_zero_at_the_exact_map_and_one_step_sampling_recovers_the_data():
    """Single data point x0: straight paths, u(x_t, t, r) = (x_t - x0) / t exactly."""
    x0 = torch.tensor([[1.5, -0.5]])
    exact = lambda x, t, r, y=None: (x - x0) / t.view(-1, 1)  # noqa: E731
    wrong = lambda x, t, r, y=None: x - x0  # noqa: E731
    loss = MeanFlowLoss(adaptive_power=0.0)
    x = x0.expand(64, 2)
    gen = torch.Generator().manual_seed(0)
    assert loss(exact, x, generator=gen).loss.item() < 1e-10
    assert loss(wrong, x, generator=gen).loss.item() > 1e-2
    noise = torch.randn(64, 2, generator=gen)
    for steps in (1, 4):
        torch.testing.assert_close(sample_flow_map(exact, noise, steps), x0.expand(64, 2), atol=1e-5, rtol=0)


def test_meanflow_target_skips_the_derivative_on_rows_with_r_equal_t_and_matches_the_full_batch():
    """Rows with r = t have target v exactly; the derivative pass sees only the r != t rows (and their labels), and
    its values equal the whole-batch :func:`meanflow_target` on those rows."""
    seen = []

    def u(z, a, b, y):
        seen.append(len(z))
        return torch.sin(3 * z) * (a - b + 0.5).view(-1, 1) ** 2 + (y * a).view(-1, 1)

    gen = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(8, 2, generator=gen), torch.randn(8, 2, generator=gen)
    t = torch.rand(8, generator=gen)
    r = torch.where(torch.arange(8) % 3 == 0, 0.3 * t, t)  # rows 0, 3, 6 move
    labels = torch.arange(8.0)
    for mode in ("jvp", "double_backward", "finite_difference"):
        loss = MeanFlowLoss(mode=mode, fd_step=1e-3)
        seen.clear()
        target = loss.target(u, x_t, t, r, v, labels)
        assert set(seen) == {3}
        full = meanflow_target(lambda z, a, b: u(z, a, b, labels), x_t, t, r, v, mode=mode, fd_step=1e-3)
        torch.testing.assert_close(target, full, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(target[r == t], v[r == t], atol=0, rtol=0)
        assert (target[r != t] - v[r != t]).abs().min() > 1e-3  # the derivative term really entered
    seen.clear()
    torch.testing.assert_close(MeanFlowLoss().target(u, x_t, t, t, v, labels), v, atol=0, rtol=0)
    assert seen == []  # no r != t row: no derivative pass at all


def test_compiled_jvp_gives_the_eager_target_and_follows_the_weights_after_an_update():
    """mode="compiled_jvp" (torch.compile of the same forward AD) equals the eager JVP target on a DiT flow map, and
    still does after an optimiser step changed the weights (the compiled graph reads them, not a stale copy)."""
    fm = flow_map(seed=3)
    opt = torch.optim.SGD(fm.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    eager, compiled = MeanFlowLoss(mode="jvp"), MeanFlowLoss(mode="compiled_jvp")
    for _ in range(2):
        x_t, v = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
        t = torch.rand(4, generator=gen)
        r, labels = 0.4 * t, torch.randint(0, 10, (4,), generator=gen)
        with torch.no_grad():
            ref = eager.target(FlowMapModel(fm), x_t, t, r, v, labels)
            got = compiled.target(FlowMapModel(fm), x_t, t, r, v, labels)
        assert (ref - v).abs().max() > 1e-2  # the derivative term entered
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        FlowMapModel(fm)(x_t, t, r, labels).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(ValueError, match="compiled_jvp"):
        MeanFlowLoss(mode="jit")


def test_double_backward_gives_the_forward_ad_target_and_leaves_the_weights_alone():
    """mode="double_backward" (the JVP as the gradient of a VJP) equals forward AD on a DiT flow map, with or without
    grad mode, and neither carries a graph nor writes a gradient into the weights (the target is a constant)."""
    fm = flow_map(seed=3)
    gen = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.rand(4, generator=gen)
    r, labels = 0.4 * t, torch.randint(0, 10, (4,), generator=gen)
    with torch.no_grad():
        ref = MeanFlowLoss(mode="jvp").target(FlowMapModel(fm), x_t, t, r, v, labels)
        quiet = MeanFlowLoss(mode="double_backward").target(FlowMapModel(fm), x_t, t, r, v, labels)
    got = MeanFlowLoss(mode="double_backward").target(FlowMapModel(fm), x_t, t, r, v, labels)
    assert (ref - v).abs().max() > 1e-2  # the derivative term entered
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quiet, got, atol=0, rtol=0)
    assert not got.requires_grad and all(p.grad is None for p in fm.parameters())


def test_meanflow_adaptive_weighting_matches_the_per_row_formula():
    """r = t, single data point x0 and u = x - x0: the target is v = n - x0 and u(x_t) = t (n - x0), so row i has
    L_i = (1 - t_i)^2 mean((n_i - x0)^2); the weighted loss is mean(L_i / (L_i + eps)^p) and so is its gradient."""
    x0, eps = torch.tensor([[1.5, -0.5]]), 1e-3
    scale = torch.ones((), requires_grad=True)
    model = lambda x, t, r, y=None: scale * (x - x0)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    noise, t = torch.randn(5, 2, generator=gen), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    rows = (1 - t) ** 2 * (noise - x0).pow(2).mean(1)
    for p in (0.0, 0.5, 1.0):
        scale.grad = None
        out = MeanFlowLoss(adaptive_power=p, adaptive_eps=eps)(model, x0.expand(5, 2), noise=noise, t=t, r=t)
        out.loss.backward()
        torch.testing.assert_close(out.loss, (rows / (rows + eps) ** p).mean())
        # d L_i / d scale at scale = 1: L_i = mean((scale t (n - x0) - (n - x0))^2) -> 2 t (t - 1) mean((n - x0)^2)
        grads = 2 * t * (t - 1) * (noise - x0).pow(2).mean(1)
        torch.testing.assert_close(scale.grad, (grads / (rows + eps) ** p).mean())
        assert out.mse.item() == pytest.approx(rows.mean().item(), rel=1e-6)


def test_one_step_distillation_targets_and_loss_against_closed_forms():
    """Exact Gaussian flow map: K steps compose to the one-step map (loss 0). Linear u = a x: one step gives
    (1 - a) z, K uniform steps (1 - a / K)^K z, so the loss on constant rows c is ((1 - a) - (1 - a / K)^K)^2 c^2."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(10, 3, dtype=torch.float64, generator=gen)
    exact = OneStepDistillation.from_model(gaussian_u, z, num_inference_steps=8, batch_size=3)  # chunks of 3
    torch.testing.assert_close(exact.targets, z * S, atol=1e-12, rtol=0)  # x_0 = sigma_0 / sigma_1 z = S z
    assert exact.loss(gaussian_u, 32, gen).item() < 1e-20
    a, k = 0.7, 4
    linear = lambda x, t, r, y=None: a * x  # noqa: E731
    c = torch.tensor([[0.5, -2.0]], dtype=torch.float64).expand(6, 2)
    pairs = OneStepDistillation.from_model(linear, c, num_inference_steps=k)
    torch.testing.assert_close(pairs.targets, c * (1 - a / k) ** k, atol=1e-12, rtol=0)
    expected = ((1 - a) - (1 - a / k) ** k) ** 2 * (0.5**2 + 2.0**2) / 2
    assert pairs.loss(linear, 5, gen).item() == pytest.approx(expected, rel=1e-6)  # the loss is fp32
    live = one_step_distillation_loss(linear, c, sample_flow_map(linear, c, 2))  # targets from the same map, K = 2
    assert live.item() == pytest.approx(((1 - a) - (1 - a / 2) ** 2) ** 2 * (0.5**2 + 2.0**2) / 2, rel=1e-6)
    labelled = OneStepDistillation.from_model(lambda x, t, r, y: x * y[:, None], c, 2, torch.arange(6.0) / 10)
    torch.testing.assert_close(labelled.targets[:, 0], 0.5 * (1 - torch.arange(6.0, dtype=torch.float64) / 20) ** 2)


@pytest.mark.parametrize("prediction_type", ["velocity", "sample"])
def test_transformer_jvp_matches_central_finite_differences(prediction_type):
    fm = flow_map(prediction_type=prediction_type)
    model = FlowMapModel(fm)
    model64 = FlowMapModel(copy.deepcopy(fm).double())
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t, y = torch.rand(4, generator=gen) * 0.8 + 0.1, torch.arange(4)
    r = 0.5 * t

    def u64(z, a, b):
        return model64(z, a, b, y)

    # spatial direction (tangent (v, 0, 0)): float64 central differences are exact to ~1e-8
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # flash / efficient SDPA have no forward AD
        _, jvp = torch.func.jvp(lambda z: model(z, t, r, y), (x,), (v,))
        h = 1e-5
        fd = (
            u64(x.double() + h * v.double(), t.double(), r.double())
            - u64(x.double() - h * v.double(), t.double(), r.double())
        ) / (2 * h)
    torch.testing.assert_close(jvp.double(), fd, atol=2e-4, rtol=1e-4)
    # full MeanFlow tangent (v, 1, 0): diffusers' sinusoidal time embedding (x1000, computed in float32) limits the
    # finite difference to ~1 % accuracy, so compare at that level
    target = meanflow_target(lambda z, a, b: model(z, a, b, y), x, t, r, v)
    fd_target = meanflow_target(
        u64, x.double(), t.double(), r.double(), v.double(), mode="finite_difference", fd_step=1e-4
    )
    assert (target.double() - fd_target).abs().max() <= 0.02 * target.abs().mean()


def test_two_time_sampler_densities_and_bad_options():
    gen = torch.Generator().manual_seed(0)
    t, r = TwoTimeSampler(scheme="uniform", r_neq_t=0.5)(100_000, gen)
    assert bool((t >= r).all())
    # t = max of two uniforms: P(t > 0.9) = 1 - 0.81; half the pairs keep r = t
    assert abs(float((t > 0.9).float().mean()) - 0.19) < 0.01
    assert abs(float((r < t).float().mean()) - 0.5) < 0.01
    # MeanFlow's logit-normal(-0.4, 1) almost never reaches the one-step corner: P(max of two > 0.9) ~ 1 %
    t_ln, _ = TwoTimeSampler()(100_000, gen)
    assert float((t_ln > 0.9).float().mean()) < 0.02
    # a fixed count per batch, the fraction rounded stochastically: B = 64 at 25 % is always 16 rows; B = 2 at 25 %
    # is 0 or 1 row with mean 0.5 (plain rounding would never move a row)
    assert {int((torch.ne(*TwoTimeSampler(r_neq_t=0.25)(64, gen))).sum()) for _ in range(20)} == {16}
    counts = torch.tensor([float(torch.ne(*TwoTimeSampler(r_neq_t=0.25)(2, gen)).sum()) for _ in range(2000)])
    assert set(counts.tolist()) == {0.0, 1.0}
    assert abs(counts.mean().item() - 0.5) < 3 * counts.std().item() / 2000**0.5
    with pytest.raises(ValueError, match="unknown time sampling"):
        TwoTimeSampler(scheme="logitnormal")
    with pytest.raises(ValueError, match="r_neq_t"):
        TwoTimeSampler(r_neq_t=25)


def test_unconditional_samples_are_the_one_step_map_of_seeded_noise():
    """evaluation.unconditional_samples: x = z - u(z, 1, 0) for z ~ N(0, I) from the seed, null class; K steps use
    the same noise."""
    from diffusers_pafm.evaluation import unconditional_samples

    torch.manual_seed(0)
    model = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 3, 8, 10)).eval()
    z = torch.randn((5, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    null = torch.full((5,), 10)
    with torch.no_grad():
        expected = z - model(z, torch.full((5,), 1000.0), torch.zeros(5), null, return_dict=False)[0]
        two_steps = sample_flow_map(FlowMapModel(model), z, 2, class_labels=null)
    torch.testing.assert_close(unconditional_samples(model, 5, seed=7), expected)
    torch.testing.assert_close(unconditional_samples(model, 5, seed=7, num_inference_steps=2), two_steps)
