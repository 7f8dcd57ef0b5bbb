"""The DPS-style guided sampler against the closed-form flow of a Gaussian prior."""

import torch

from diffusers_pafm.flow_maps import dps_sample
from diffusers_pafm.flow_maps.operators import MaskOperator

MEAN, STD = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.5, 1.5, 0.2])


def gaussian_velocity(x_t, t, r, class_labels=None):
    """Exact marginal velocity of x ~ N(MEAN, diag(STD^2)) on x_t = (1 - t) x + t eps (ignores r)."""
    t = t[:, None]
    var = STD**2
    gain = (1 - t) * var / ((1 - t) ** 2 * var + t**2)
    x_hat = MEAN + gain * (x_t - (1 - t) * MEAN)  # E[x | x_t]
    return (x_t - x_hat) / t


def test_unguided_dps_follows_the_exact_flow_of_a_gaussian():
    # with zeta = 0 the sampler is Euler on the probability-flow ODE, whose map is x = MEAN + STD * z per coordinate
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    observe_nothing = MaskOperator(torch.zeros(256, 3, dtype=torch.float64), "box_inpaint")
    errors = [
        float(
            (dps_sample(gaussian_velocity, observe_nothing, torch.zeros(256, 3), z, n, 0.0) - MEAN - STD * z)
            .abs()
            .max()
        )
        for n in (200, 800)
    ]
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 3.5  # Euler: first-order convergence to the closed form


def test_guidance_pulls_observed_coordinates_to_the_observation_and_leaves_the_rest():
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(256, 3)
    y = torch.full((256, 3), 1.25, dtype=torch.float64) * mask
    op = MaskOperator(mask, "random_inpaint")
    free = dps_sample(gaussian_velocity, op, y, z, 100, guidance_scale=0.0)
    guided = dps_sample(gaussian_velocity, op, y, z, 100, guidance_scale=0.05)
    assert (free[:, 0] - 1.25).abs().mean() > 0.3
    assert (guided[:, 0] - 1.25).abs().mean() < 0.1
    # independent coordinates of a diagonal prior: the Tweedie estimate of x_2, x_3 does not depend on x_1
    torch.testing.assert_close(guided[:, 1:], free[:, 1:])
