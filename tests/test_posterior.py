"""posterior_velocity against an independent float64 closed form, and its invariants."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_pafm import posterior_velocity, temperature_for_target_ess


def closed_form(x_t, t, data, log_condition=None, temperature=1.0):
    """Straightforward float64 softmax over all data points: the exact marginal velocity."""
    xd, dd, td = x_t.double().flatten(1), data.double().flatten(1), t.double()
    logits = -((xd[:, None, :] - (1 - td[:, None, None]) * dd[None]) ** 2).sum(-1) / (2 * td[:, None] ** 2)
    logits = logits / temperature
    if log_condition is not None:
        logits = logits + log_condition.double()
    w = torch.softmax(logits, 1)
    return ((xd - w @ dd) / td[:, None]).reshape(x_t.shape), w


def make_problem(n=300, b=64, shape=(4, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, *shape, generator=g) * 1.5 + 3.0  # offset mean: exercises the centring
    x = data[torch.randint(0, n, (b,), generator=g)]
    eps = torch.randn(b, *shape, generator=g)
    t = torch.rand(b, generator=g) * 0.95 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    return data, x, eps, t, x_t


def test_exact_marginal_velocity_matches_float64_closed_form():
    data, _, _, t, x_t = make_problem()
    out = posterior_velocity(x_t, t, data)
    v, w = closed_form(x_t, t, data)
    assert (out.velocity.double() - v).abs().max().item() <= 1e-5
    assert (out.weights.double() - w).abs().max().item() <= 1e-5
    torch.testing.assert_close(out.weights.sum(1), torch.ones(64))
    torch.testing.assert_close(out.ess.double(), 1 / (w**2).sum(1), rtol=1e-4, atol=1e-4)
    assert out.velocity.shape == x_t.shape and out.weights.shape == (64, 300) and out.ess.shape == (64,)


def test_chunking_does_not_change_the_result():
    data, _, _, t, x_t = make_problem()
    a = posterior_velocity(x_t, t, data, chunk_size=4096)
    b = posterior_velocity(x_t, t, data, chunk_size=7)
    torch.testing.assert_close(a.velocity, b.velocity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.weights, b.weights, atol=1e-6, rtol=1e-5)


def test_temperature_and_condition_match_closed_form():
    data, _, _, t, x_t = make_problem()
    g = torch.Generator().manual_seed(3)
    log_condition = torch.randn(64, 300, generator=g)
    log_condition[torch.rand(64, 300, generator=g) < 0.5] = float("-inf")
    log_condition[:, 0] = 0.0
    out = posterior_velocity(x_t, t, data, log_condition=log_condition, temperature=3.0)
    v, w = closed_form(x_t, t, data, log_condition, temperature=3.0)
    # flat weights mix many endpoints, so fp32 rounding of x^ is divided by t >= 0.05: compare relatively
    assert (out.velocity.double() - v).abs().max().item() <= 1e-5 * v.abs().max().item()
    assert (out.weights.double() - w).abs().max().item() <= 1e-5
    assert (out.weights[torch.isinf(log_condition)] == 0).all()


def test_per_query_candidates_equal_shared_candidates():
    data, _, _, t, x_t = make_problem(n=50)
    shared = posterior_velocity(x_t, t, data)
    per_query = posterior_velocity(x_t, t, data.unsqueeze(0).expand(64, *data.shape))
    torch.testing.assert_close(shared.velocity, per_query.velocity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.weights, per_query.weights, atol=1e-6, rtol=1e-5)
    # and each row against its own closed form when the sets differ per row
    rows = torch.stack([data[torch.randperm(50, generator=torch.Generator().manual_seed(i))[:20]] for i in range(64)])
    out = posterior_velocity(x_t, t, rows)
    for i in (0, 17, 63):
        v, _ = closed_form(x_t[i : i + 1], t[i : i + 1], rows[i])
        assert (out.velocity[i].double() - v[0]).abs().max() <= 1e-5


def test_permuting_candidates_changes_nothing():
    data, _, _, t, x_t = make_problem()
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(5))
    a = posterior_velocity(x_t, t, data)
    b = posterior_velocity(x_t, t, data[perm])
    torch.testing.assert_close(a.velocity, b.velocity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.weights[:, perm], b.weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.ess, b.ess)


def test_single_candidate_is_the_conditional_velocity():
    _, x, eps, t, x_t = make_problem()
    out = posterior_velocity(x_t, t, x.unsqueeze(1))
    assert torch.equal(out.weights, torch.ones(64, 1))
    assert torch.equal(out.endpoint, x)  # one-hot rows return their endpoint exactly
    torch.testing.assert_close(out.velocity, eps - x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t_value", [0.0, 1e-8, 1e-4, 0.5, 1.0 - 1e-7, 1.0])
def test_t_limits_stay_finite(t_value):
    data, x, eps, _, _ = make_problem()
    t = torch.full((64,), t_value)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    out = posterior_velocity(x_t, t, data)
    for tensor in (out.velocity, out.weights, out.ess, out.endpoint, out.spread):
        assert torch.isfinite(tensor).all()
    if t_value == 1.0:  # pure noise: the posterior is the prior, uniform over candidates
        torch.testing.assert_close(out.weights, torch.full((64, 300), 1 / 300))


def test_all_masked_row_is_a_clear_error():
    data, _, _, t, x_t = make_problem(n=10)
    log_condition = torch.zeros(64, 10)
    log_condition[3] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[3\] have every candidate masked"):
        posterior_velocity(x_t, t, data, log_condition=log_condition)


def test_shape_errors_name_the_problem():
    data, _, _, t, x_t = make_problem(n=10)
    with pytest.raises(ValueError, match="features per endpoint"):
        posterior_velocity(x_t, t, torch.randn(10, 3, 2, 2))
    with pytest.raises(ValueError, match="log_condition must be"):
        posterior_velocity(x_t, t, data, log_condition=torch.zeros(64, 9))


def test_target_ess_is_reached_and_temperature_flattens():
    data, _, _, t, x_t = make_problem()
    t = torch.full((64,), 0.5)
    low = posterior_velocity(x_t, t, data, temperature=1.0)
    high = posterior_velocity(x_t, t, data, temperature=50.0)
    assert (high.ess >= low.ess - 1e-4).all() and high.ess.mean() > low.ess.mean()
    out = posterior_velocity(x_t, t, data, target_ess=8.0)
    reachable = low.ess < 8.0
    torch.testing.assert_close(out.ess[reachable], torch.full_like(out.ess[reachable], 8.0), rtol=1e-3, atol=1e-3)
    assert (out.temperature >= 1.0).all()


def test_target_ess_never_sharpens_and_caps_unreachable_rows():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -50.0, float("-inf"), float("-inf")]])
    temp = temperature_for_target_ess(logits, None, target_ess=3.0, max_temperature=1e4)
    assert temp[0].item() == 1.0  # ESS 4 already at T = 1
    assert temp[1].item() == pytest.approx(1e4, rel=1e-3)  # only 2 candidates: target unreachable


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_never_builds_a_b_by_k_by_d_tensor():
    b, k, d = 64, 128, 512
    x_t, t, cands = torch.randn(b, d), torch.rand(b), torch.randn(k, d)
    with _MaxNumel() as mode:
        posterior_velocity(x_t, t, cands, log_condition=torch.zeros(b, k), target_ess=4.0, chunk_size=32)
    assert mode.max_numel <= max(b * k, (b + k) * d), mode.max_numel


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_acceptance_size_runs_in_well_under_2gb_extra_memory():
    """B = K = 1024, D = 16384: inputs are 2 x 64 MB; the extra peak (RSS high-water mark) must stay far below 2 GB."""
    code = textwrap.dedent(
        """
        import torch
        from diffusers_pafm import posterior_velocity
        torch.set_num_threads(2)
        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        x_t, t, cands = torch.randn(1024, 16384), torch.rand(1024), torch.randn(1024, 16384)
        posterior_velocity(x_t[:4], t[:4], cands[:8])  # warm up kernels
        base = rss("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")
        out = posterior_velocity(x_t, t, cands)
        print((rss("VmHWM:") - base) / 2**20)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    extra_mb = float(result.stdout.strip().splitlines()[-1])
    assert extra_mb < 1024, f"posterior_velocity used {extra_mb:.0f} MB extra"


def test_velocity_stays_exact_as_t_goes_to_zero():
    """At t = 1e-6 the posterior velocity is (x_t - z) / t with the true t (the t_min clamp used to shrink it ~100x);
    through PAFMLoss the own-endpoint row gives exactly eps - x."""
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    t = torch.full((4,), 1e-6)
    x_t = ((1 - t.double()[:, None]) * x.double() + t.double()[:, None] * eps.double()).float()
    out = posterior_velocity(x_t, t, x.unsqueeze(1))
    reference = (x_t.double() - x.double()) / 1e-6  # exact given the fp32 x_t
    torch.testing.assert_close(out.velocity.double(), reference, rtol=1e-5, atol=1e-3)
    assert (out.velocity - (eps - x)).abs().max() < 0.5 and out.velocity.abs().max() > 1  # not shrunk to ~0.05


def test_non_finite_inputs_are_errors_that_name_the_tensor():
    data, _, _, t, x_t = make_problem(n=10)
    bad = data.clone()
    bad[7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"candidates holds NaN or infinite values \(rows \[7\]"):
        posterior_velocity(x_t, t, bad)
    x_bad = x_t.clone()
    x_bad[2] = float("inf")
    with pytest.raises(ValueError, match=r"x_t holds NaN or infinite values \(rows \[2\]"):
        posterior_velocity(x_bad, t, data)
