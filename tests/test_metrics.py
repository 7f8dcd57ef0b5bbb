"""Metrics against hand-computed values, and the checkerboard example as a smoke run."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import ROOT, run

from diffusers_pafm.evaluation import (
    checkerboard_support,
    crps,
    mmd,
    nlpd,
    prior_drift,
    psnr,
    sample_checkerboard,
    ssim,
)


def test_nlpd_crps_mmd_support_by_hand():
    # one observation, two identical predictions at the observation: -log N(0; 0, 1) = log(2 pi) / 2
    assert float(nlpd(torch.zeros(1, 1), torch.zeros(1, 2, 1), 1.0)) == math.log(2 * math.pi) / 2
    # N(1; 0, 0.5^2) and N(1; 2, 0.5^2) average to the same density: -log(exp(-2) / (0.5 sqrt(2 pi)))
    expected = 2 + math.log(0.5 * math.sqrt(2 * math.pi))
    assert abs(float(nlpd(torch.ones(1, 1), torch.tensor([[[0.0], [2.0]]]), 0.5)) - expected) < 1e-12
    # samples {0, 2}, truth 0: E|X - x| = 1, E|X - X'| = 2  ->  0;  samples {1, 1}, truth 0  ->  1
    assert float(crps(torch.tensor([[[0.0], [2.0]]]), torch.zeros(1, 1))) == 0.0
    assert float(crps(torch.tensor([[[1.0], [1.0]]]), torch.zeros(1, 1))) == 1.0
    # {0, 0} vs {3, 3}, h = 1: MMD^2 = 1 + 1 - 2 exp(-9/2)
    value = float(mmd(torch.zeros(2, 1), torch.full((2, 1), 3.0), bandwidth=1.0))
    assert abs(value - math.sqrt(2 - 2 * math.exp(-4.5))) < 1e-12
    gen = torch.Generator().manual_seed(0)  # unseeded draws exceeded the bound once (2026-11-23)
    assert float(mmd(torch.randn(200, 2, generator=gen), torch.randn(200, 2, generator=gen))) < 0.1
    points = torch.tensor([[-1.5, -1.5], [-0.5, -1.5], [3.0, 0.0], [0.5, 0.5], [1.5, -0.5]])
    assert abs(float(checkerboard_support(points)) - 3 / 5) < 1e-7  # (1,0) empty, (3,0) outside
    assert float(checkerboard_support(sample_checkerboard(1000, torch.Generator().manual_seed(0)))) == 1.0
    # every pixel off by 0.2 in [-1, 1] (range 2): 10 log10(4 / 0.04) = 20 dB; range 1 gives 10 log10(25) dB
    estimate, truth = torch.full((2, 3, 4, 4), 0.2, dtype=torch.float64), torch.zeros(2, 3, 4, 4)
    torch.testing.assert_close(psnr(estimate, truth), torch.full((2,), 20.0, dtype=torch.float64))
    assert abs(float(psnr(estimate, truth, data_range=1.0)[0]) - 10 * math.log10(25)) < 1e-9


def test_checkerboard_example_smoke(tmp_path):
    out = tmp_path / "cb"
    args = [
        str(ROOT / "benchmarks" / "checkerboard_vfm.py"),
        "--output_dir",
        str(out),
        "--meanflow_steps",
        "20",
        "--vfm_steps",
        "10",
        "--batch_size",
        "128",
        "--num_test",
        "20",
        "--num_draws",
        "10",
        "--num_prior",
        "300",
        "--dps_steps",
        "5",
        "--dps_scales",
        "0.3,1",
        "--dps_num_test",
        "8",
        "--distill_steps",
        "5",
        "--distill_pairs",
        "64",
        "--consistency_weight",
        "1",
        "--consistency_steps",
        "2",
        "--consistency_batch",
        "32",
        "--vfm_r_neq_t",
        "0.1",
        "--post_distill_steps",
        "5",
        "--joint_posterior",
    ]
    run(args)
    for name in ("samples.npz", "samples_vfm_posterior.npz", "samples_adapter_only.npz"):
        arrays = np.load(out / name)
        assert arrays["y"].shape == (20, 1) and arrays["x_true"].shape == (20, 2)
        assert arrays["samples"].shape == (20, 10, 2) and arrays["prior"].shape == (300, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["consistency_batch"] == 32 and metrics["config"]["vfm_r_neq_t"] == 0.1
    # the joint map was scored before its post-joint one-step distillation too (same test observations)
    assert metrics["vfm_before_post_distillation"]["num_test"] == 20
    assert metrics["vfm_before_post_distillation"]["nlpd"] != metrics["vfm"]["one_step"]["nlpd"]
    # the posterior-MeanFlow joint stage ran from the same map on the same draws, and trained a different map
    assert metrics["vfm_posterior"]["one_step"]["nlpd"] != metrics["vfm"]["one_step"]["nlpd"]
    assert (out / "flow_map_vfm_posterior" / "config.json").is_file()
    for model in ("vfm", "vfm_posterior", "adapter_only"):
        assert metrics[model]["one_step"]["support_exact_posterior"] == 1.0  # the reference sampler is exact
        assert set(metrics[model]["one_step"]) >= {
            "nlpd",
            "crps",
            "support_posterior",
            "support_prior",
            "mmd_posterior",
        }
    assert set(metrics["dps"]) == {"zeta=0.3", "zeta=1"} and metrics["dps"]["zeta=1"]["num_test"] == 8
    assert np.load(out / "samples_dps.npz")["samples"].shape == (8, 10, 2)
    # both flow maps reload; joint VFM changed the MeanFlow map it started from
    from diffusers_pafm.models import MLPFlowMapModel

    before, after = (MLPFlowMapModel.from_pretrained(out / name) for name in ("flow_map_meanflow", "flow_map_vfm"))
    assert after.config.num_layers == 6 and before.config.hidden_dim == after.config.hidden_dim == 512
    changed = [not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values())]
    assert any(changed)
    assert (out / "checkerboard.png").is_file()
    # --pretrained_flow_map skips MeanFlow (another seed would train another map): the baseline uses the loaded map
    reused = tmp_path / "reused"
    map_folder = str(out / "flow_map_meanflow")
    run([*args[:1], "--output_dir", str(reused), *args[3:], "--seed", "1", "--pretrained_flow_map", map_folder])
    again = MLPFlowMapModel.from_pretrained(reused / "flow_map_meanflow")
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), again.state_dict().values()))


def test_ssim_matches_scikit_image_and_is_one_on_identical_images():
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 3, 16, 20, generator=gen, dtype=torch.float64) * 2 - 1
    noisy = (truth + 0.3 * torch.randn(truth.shape, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    reference = [
        structural_similarity(
            noisy[i].numpy(),
            truth[i].numpy(),
            data_range=2.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(2)
    ]
    torch.testing.assert_close(ssim(noisy, truth), torch.tensor(reference, dtype=torch.float64))
    torch.testing.assert_close(ssim(truth, truth), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_inverse_problem_protocol_scores_a_known_sampler():
    """A sampler returning truth + c for every draw has PSNR 10 log10(4 / c^2) and CRPS = ||c||."""
    from diffusers_pafm.evaluation import evaluate_inverse_problem

    truth = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen = {}

    def offset_sampler(y, operator, num_draws, generator):
        seen["y"], seen["operator"] = y, operator
        return (truth + 0.1).unsqueeze(1).expand(-1, num_draws, -1, -1, -1)

    result = evaluate_inverse_problem(offset_sampler, truth, "box_inpaint", 0.05, num_draws=4, seed=3)
    scores = result.metrics()
    assert abs(scores["psnr_posterior_mean"] - 10 * math.log10(4 / 0.01)) < 1e-4
    assert abs(scores["crps"] - 0.1 * math.sqrt(3 * 16 * 16)) < 1e-4  # identical draws: E||X - X'|| = 0
    assert 0 < scores["ssim_posterior_mean"] <= 1
    # observed entries: A(truth + c) - y = c - sigma n, so RMS / sigma = sqrt(c^2 + sigma^2) / sigma = sqrt(5)
    assert scores["observation_residual_over_sigma"] == pytest.approx(math.sqrt(5), abs=0.05)
    exact = evaluate_inverse_problem(
        lambda y, op, j, g: truth.unsqueeze(1).expand(-1, j, -1, -1, -1), truth, "super_resolution_2x", num_draws=2
    )
    assert exact.observation_residual().shape == (3, 2)
    assert exact.metrics()["observation_residual_over_sigma"] == pytest.approx(1.0, abs=0.1)  # the noise alone
    # pooled draws vs truths: metrics.mmd on the flattened sets; grey images score worse than near-copies
    grey = evaluate_inverse_problem(
        lambda y, op, j, g: torch.zeros(3, j, 3, 16, 16), truth, "box_inpaint", num_draws=4
    )
    grey_mmd = grey.metrics()["mmd_draws_to_truths"]
    assert grey_mmd == pytest.approx(float(mmd(torch.zeros(12, 3 * 16 * 16), truth.flatten(1))))
    assert grey_mmd > scores["mmd_draws_to_truths"] + 0.1
    # the observation is the masked truth plus noise of the stated level, and the grid has one row per image
    residual = seen["y"] - seen["operator"](truth)
    assert abs(float(residual[seen["operator"].mask.expand_as(residual) > 0].std()) - 0.05) < 0.005
    assert result.grid(scale=1).size == ((4 + 3) * 16, 3 * 16)
    with pytest.raises(ValueError, match="expected"):
        evaluate_inverse_problem(lambda y, op, j, g: truth, truth, "denoise", num_draws=2)


def test_frechet_distance_closed_forms_and_scipy():
    from scipy.linalg import sqrtm

    from diffusers_pafm.evaluation import frechet_distance, nearest_neighbor_distance

    # the empirical moments of {0, 2} and {1, 5}: means 1 and 3, variances 2 and 8 -> (1 - 3)^2 + (sqrt2 - sqrt8)^2
    a, b = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [5.0]])
    assert abs(float(frechet_distance(a, b)) - (4 + (math.sqrt(2) - math.sqrt(8)) ** 2)) < 1e-9
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(400, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    ca, cb = np.cov(x.numpy().T), np.cov(y.numpy().T)
    reference = ((x.mean(0) - y.mean(0)) ** 2).sum().item() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert abs(float(frechet_distance(x, y)) - reference) < 1e-6
    assert abs(float(frechet_distance(x, x))) < 1e-8
    with pytest.raises(ValueError, match="feature rows"):
        frechet_distance(x[:, :3], y)
    # nearest training neighbour: a copy is at distance 0, a shifted point at its shift
    train = torch.randn(10, 1, 4, 4, generator=gen)
    far = train[3:4] + 0.5
    torch.testing.assert_close(
        nearest_neighbor_distance(torch.cat([train[:2], far]), train)[:2], torch.zeros(2, dtype=torch.float64)
    )
    assert float(nearest_neighbor_distance(far, train)[0]) <= 0.5 * 4 + 1e-6  # ||0.5 * ones(16)|| = 2


def test_summarize_runs_mean_and_standard_error():
    from diffusers_pafm.evaluation import summarize_runs

    # values 1, 3, 8: mean 4, sample std sqrt(13), s.e. sqrt(13 / 3)
    summary = summarize_runs([{"a": 1, "b": 0}, {"a": 3, "b": 0}, {"a": 8, "b": 0}], ["a"])
    assert set(summary) == {"a"} and summary["a"]["mean"] == 4
    assert summary["a"]["se"] == pytest.approx(math.sqrt(13 / 3))
    assert math.isnan(summarize_runs([{"a": 2.0}], ["a"])["a"]["se"])


@pytest.mark.parametrize("std", [1.0, 0.5])
def test_spread_over_error_and_coverage_of_a_calibrated_and_an_over_confident_sampler(std):
    """Truth x ~ N(0, 1) per pixel and J = 8 draws ~ N(0, std^2), independent of x. With std = 1 the draws are the
    exact posterior (here, the prior): spread/error ratio 1 and nominal coverages. In general the ratio is
    std / sqrt((1 + std^2 / J) / (1 + 1 / J)) and the rank R = #{draws < x} has
    P(R = k) = E_x Binom(k; J, Phi(x / std)), integrated here by quadrature; the coverage is
    sum_k P(R = k) |[k, k + 1] / (J + 1) n central interval| (J + 1)."""
    from scipy import stats

    from diffusers_pafm.evaluation import evaluate_inverse_problem

    j = 8
    truth = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    draws = std * torch.randn(16, j, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    scores = evaluate_inverse_problem(lambda y, op, n, g: draws, truth, "denoise", num_draws=j).metrics()
    assert scores["spread_over_error"] == pytest.approx(std / math.sqrt((1 + std**2 / j) / (1 + 1 / j)), rel=0.03)

    x = np.linspace(-8, 8, 4001)
    ranks = np.arange(j + 1)
    p_rank = (stats.binom.pmf(ranks[:, None], j, stats.norm.cdf(x / std)) * stats.norm.pdf(x)).sum(1) * (x[1] - x[0])
    for level in (0.5, 0.9):
        lo, hi = 0.5 - level / 2, 0.5 + level / 2
        overlap = np.clip(np.minimum((ranks + 1) / (j + 1), hi) - np.maximum(ranks / (j + 1), lo), 0, None) * (j + 1)
        expected = float((p_rank * overlap).sum())
        if std == 1.0:
            assert expected == pytest.approx(level, abs=1e-6)  # calibrated: nominal at any J
        # 12 288 pixels, 768 per channel-image: a binomial standard error below 0.005
        assert scores[f"coverage_{round(level * 100)}"] == pytest.approx(expected, abs=0.015)


def test_prior_drift_of_a_contracted_and_shifted_map_by_hand():
    """now = 0.5 (start - its mean) + its mean + 0.3: spread ratio 0.5 exactly, mean shift 0.3 / RMS std (numpy)."""
    start = torch.randn(500, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 2, 48).view(
        3, 4, 4
    )
    now = 0.5 * (start - start.mean(0)) + start.mean(0) + 0.3
    drift = prior_drift(start, now)
    flat = start.flatten(1).numpy().astype(np.float64)
    assert drift["prior_spread_ratio"] == pytest.approx(0.5, abs=1e-9)
    assert drift["prior_mean_shift"] == pytest.approx(0.3 / np.sqrt(flat.var(0, ddof=1).mean()), rel=1e-6)
    kept = prior_drift(start, start)
    assert kept == {"prior_spread_ratio": 1.0, "prior_mean_shift": 0.0}
    with pytest.raises(ValueError, match="one shape"):
        prior_drift(start, now[:10])
