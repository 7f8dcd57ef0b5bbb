"""Path, conversions and time sampling against hand-computed values (diffusers sigma convention)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_pafm.paths import (
    conditional_velocity,
    from_data_at_one,
    gaussian_path_log_likelihood,
    interpolate,
    noise_to_velocity,
    sample_path,
    sample_to_velocity,
    velocity_to_noise,
    velocity_to_sample,
)
from diffusers_pafm.time_sampling import TimeSampler


def test_hand_computed_point_and_conversions():
    x, eps, t = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    x_t = interpolate(x, eps, t)
    assert x_t.item() == pytest.approx(0.75 * 2 - 0.25)  # 1.25
    v = conditional_velocity(x, eps)
    assert v.item() == -3.0
    assert velocity_to_sample(x_t, t, v).item() == pytest.approx(2.0)  # x = x_t - t v
    assert velocity_to_noise(x_t, t, v).item() == pytest.approx(-1.0)  # eps = x_t + (1 - t) v
    assert sample_to_velocity(x_t, t, x).item() == pytest.approx(-3.0)
    assert noise_to_velocity(x_t, t, eps).item() == pytest.approx(-3.0)


def test_endpoints_of_the_path():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(interpolate(x, eps, torch.zeros(3)), x)  # t = 0 is data
    assert torch.equal(interpolate(x, eps, torch.ones(3)), eps)  # t = 1 is noise
    p = sample_path(x, eps, torch.full((3,), 0.4))
    # the velocity is the time derivative of the path
    dt = 1e-3
    fd = (interpolate(x, eps, torch.full((3,), 0.4 + dt)) - p.x_t) / dt
    torch.testing.assert_close(fd, p.velocity, atol=1e-3, rtol=1e-3)


def test_gaussian_log_likelihood_matches_torch_distributions():
    x, x_t, t = torch.randn(4, 3, 2), torch.randn(4, 3, 2), torch.tensor([0.1, 0.5, 0.9, 1.0])
    expected = torch.stack(
        [torch.distributions.Normal((1 - t[i]) * x[i], t[i]).log_prob(x_t[i]).sum() for i in range(4)]
    )
    torch.testing.assert_close(gaussian_path_log_likelihood(x_t, t, x), expected, rtol=1e-5, atol=1e-4)


def test_conversion_from_data_at_one_convention():
    # torchcfm / flow_matching: psi_s = (1 - s) noise + s x, u = x - noise (data at s = 1)
    x, eps, s = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5)
    psi = (1 - s[:, None]) * eps + s[:, None] * x
    u = x - eps
    t, v = from_data_at_one(s, u)
    torch.testing.assert_close(interpolate(x, eps, t), psi)
    torch.testing.assert_close(v, conditional_velocity(x, eps))


def test_diffusers_flow_match_scheduler_uses_the_same_convention():
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=np.array([1.0]))
    assert scheduler.timesteps[0].item() == pytest.approx(1000.0)  # model timestep = 1000 t
    # one Euler step with the exact conditional velocity eps - x goes from noise to data
    out = scheduler.step(conditional_velocity(x, eps), scheduler.timesteps[0], eps, return_dict=False)[0]
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_time_sampler_range_and_determinism(scheme):
    sampler = TimeSampler(scheme=scheme, t_min=1e-3)
    a = sampler(4096, generator=torch.Generator().manual_seed(0))
    b = sampler(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.min() >= 1e-3 and a.max() <= 1.0
    if scheme == "uniform":
        assert a.mean().item() == pytest.approx(0.5, abs=0.02)
    if scheme == "logit_normal":  # median of sigmoid(N(0, 1)) is 0.5
        assert a.median().item() == pytest.approx(0.5, abs=0.03)


def test_time_sampler_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="unknown time sampling scheme"):
        TimeSampler(scheme="cosine")


def test_logit_normal_density_is_diffusers():
    # logit(t) of the logit-normal scheme must be N(m, s)
    t = TimeSampler(scheme="logit_normal", logit_mean=0.5, logit_std=2.0, t_min=0.0)(
        20000, generator=torch.Generator().manual_seed(1)
    )
    z = torch.log(t) - torch.log1p(-t)
    assert z.mean().item() == pytest.approx(0.5, abs=0.05)
    assert z.std().item() == pytest.approx(2.0, abs=0.05)
    assert math.isfinite(z.max().item())
