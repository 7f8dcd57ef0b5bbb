"""Sample-based metrics for conditional generation (posterior samples X_j of an unknown x given y).

* ``nlpd`` - negative log predictive density of a fresh observation y' under the samples' predictive
  p(y' | y) ~ (1/J) sum_j N(y'; A X_j, sigma^2 I) (log-sum-exp in float64).
* ``crps`` - energy form E||X - x|| - 1/2 E||X - X'|| (all pairs j != j').
* ``mmd`` - sqrt of the unbiased MMD^2 with an RBF kernel, bandwidth = median pairwise distance of the pooled sets.
* ``psnr`` - 10 log10(range^2 / MSE) per image, for images in [-1, 1] (range 2).
* ``ssim`` - Wang et al. (2004) structural similarity with an 11-tap Gaussian window (sigma 1.5), valid region only
  (scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``).
* ``frechet_distance`` - ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two feature
  sets (FID when the features are Inception's; the benchmarks use an in-project classifier offline).
* ``nearest_neighbor_distance`` - per sample, the L2 distance to the closest training example (memorisation).
* ``interval_coverage`` - fraction of truth entries inside the draws' central interval, by the randomised rank.
* ``checkerboard_support`` - fraction of 2-D points inside the filled cells of an n x n checkerboard on [-2, 2]^2.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "summarize_runs",
    "nlpd",
    "crps",
    "interval_coverage",
    "mmd",
    "psnr",
    "ssim",
    "frechet_distance",
    "nearest_neighbor_distance",
    "checkerboard_support",
    "sample_checkerboard",
    "prior_drift",
]


def nlpd(y_fresh: torch.Tensor, predicted: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B]: -log (1/J) sum_j N(y'_b; predicted_bj, sigma^2 I) for y' [B, m] and predicted observations [B, J, m]."""
    y, p = y_fresh.double().unsqueeze(1), predicted.double()
    m = y.shape[-1]
    log_n = -((y - p) ** 2).sum(-1) / (2 * sigma**2) - m * math.log(sigma * math.sqrt(2 * math.pi))
    return -(torch.logsumexp(log_n, dim=1) - math.log(p.shape[1]))


def crps(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[B]: E||X - x|| - 1/2 E||X - X'|| for samples [B, J, d] and truth [B, d] (unbiased pair average)."""
    s = samples.double()
    j = s.shape[1]
    to_truth = (s - truth.double().unsqueeze(1)).norm(dim=-1).mean(1)
    pairwise = torch.cdist(s, s).sum((1, 2)) / (j * (j - 1))
    return to_truth - 0.5 * pairwise


def interval_coverage(draws: torch.Tensor, truth: torch.Tensor, level: float) -> float:
    """Fraction of the entries of ``truth`` [B, ...] inside the central ``level`` interval of ``draws`` [B, J, ...],
    by the randomised rank (PIT) u = (#{draws < x} + U) / (J + 1), U ~ U(0, 1), exactly uniform for a calibrated
    posterior at any J. Computed as the expectation over U (the overlap of each rank's cell with the interval), so
    without noise."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    cells = draws.shape[1] + 1
    below = (draws < truth.unsqueeze(1)).sum(1).double()
    lo, hi = 0.5 - level / 2, 0.5 + level / 2
    overlap = (torch.clamp((below + 1) / cells, max=hi) - torch.clamp(below / cells, min=lo)).clamp(min=0)
    return float((overlap * cells).mean())


def psnr(estimate: torch.Tensor, truth: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """[B]: 10 log10(data_range^2 / mean((estimate - truth)^2)) per image (default range: images in [-1, 1])."""
    mse = (estimate.double() - truth.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(estimate: torch.Tensor, truth: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """[B]: mean over channels and valid pixels of SSIM = l * cs, the local structural similarity

        (2 mu_x mu_y + C1) (2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (s_x^2 + s_y^2 + C2)).

    Local moments use a normalised Gaussian window of radius int(3.5 sigma + 0.5); C1 = (0.01 L)^2, C2 = (0.03 L)^2.
    """
    x, y = estimate.double(), truth.double()
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"ssim expects two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    radius = int(3.5 * sigma + 0.5)
    if min(x.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"ssim needs images of at least {2 * radius + 1} pixels a side, got {tuple(x.shape[-2:])}")
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    window = torch.outer(taps, taps) / taps.sum() ** 2
    channels = x.shape[1]
    kernel = window.expand(channels, 1, *window.shape)

    def local_mean(image):  # noqa: E306
        return torch.nn.functional.conv2d(image, kernel, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)) for features [n, d] and [m, d].

    Covariances are unbiased (n - 1); the matrix square roots come from symmetric eigendecompositions in float64
    (negative eigenvalues from round-off are clamped to 0).
    """
    a, b = features_a.double().flatten(1), features_b.double().flatten(1)
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"need >= 2 feature rows of one width on each side, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)

    def sqrt_psd(m):  # noqa: E306
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return (a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross


def nearest_neighbor_distance(samples: torch.Tensor, training: torch.Tensor) -> torch.Tensor:
    """[n]: min_j ||samples_i - training_j|| over flattened samples (small = copies of training data)."""
    return torch.cdist(samples.double().flatten(1), training.double().flatten(1)).min(1).values


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """sqrt(max(unbiased MMD^2, 0)) between samples a [n, d] and b [m, d] with k(x, y) = exp(-|x-y|^2 / (2 h^2)).

    Default h: the median of the positive pairwise distances of the pooled sample (median heuristic).
    """
    a, b = a.double(), b.double()
    if bandwidth is None:
        pooled = torch.cat([a, b])
        dist = torch.cdist(pooled, pooled)
        pairs = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), 1)]
        pairs = pairs[pairs > 0]  # repeated points (a collapsed sampler) would otherwise give h = 0 and NaN
        bandwidth = pairs.median().item() if len(pairs) else 1.0

    def k(x, y):  # noqa: E306
        return torch.exp(-(torch.cdist(x, y) ** 2) / (2 * bandwidth**2))

    n, m = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    mmd2 = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    mmd2 = mmd2 - 2 * kab.mean()
    return mmd2.clamp(min=0).sqrt()


def checkerboard_support(points: torch.Tensor, cells: int = 4, low: float = -2.0, high: float = 2.0) -> torch.Tensor:
    """Fraction of points [..., 2] inside [low, high]^2 and in a cell (i, j) with i + j even."""
    scaled = (points - low) / (high - low) * cells
    inside = ((scaled >= 0) & (scaled < cells)).all(-1)
    idx = scaled.floor().long()
    filled = (idx[..., 0] + idx[..., 1]) % 2 == 0
    return (inside & filled).float().mean()


def sample_checkerboard(n: int, generator: torch.Generator | None = None, cells: int = 4) -> torch.Tensor:
    """n points uniform on the filled cells (i + j even) of a cells x cells board on [-2, 2]^2."""
    filled = torch.tensor(
        [(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0], dtype=torch.float32
    )
    pick = filled[torch.randint(len(filled), (n,), generator=generator)]
    return (pick + torch.rand(n, 2, generator=generator)) / cells * 4.0 - 2.0


def summarize_runs(runs: list[dict], keys: list[str] | tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per key, the mean over runs (seeds) and its standard error s / sqrt(n) (s with n - 1; NaN for one run)."""
    summary = {}
    for key in keys:
        values = torch.tensor([float(run[key]) for run in runs], dtype=torch.float64)
        se = values.std(correction=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        summary[key] = {"mean": float(values.mean()), "se": float(se)}
    return summary


def prior_drift(start: torch.Tensor, now: torch.Tensor) -> dict[str, float]:
    """How far training moved a flow map's own samples: ``now`` and ``start`` [N, ...] are unconditional samples of
    the trained and the starting map from the same noise. ``prior_spread_ratio`` is the mean per-dimension std of
    ``now`` over that of ``start`` (1: the spread kept, < 1: contracted); ``prior_mean_shift`` the RMS of the
    per-dimension mean difference over the RMS per-dimension std of ``start`` (0: the mean kept)."""
    if start.shape != now.shape or start.shape[0] < 2:
        raise ValueError(
            f"prior_drift needs two sample sets of one shape [N >= 2, ...], got {start.shape} and {now.shape}"
        )
    start, now = start.flatten(1).double(), now.flatten(1).double()
    start_std = start.std(0)
    return {
        "prior_spread_ratio": float(now.std(0).mean() / start_std.mean()),
        "prior_mean_shift": float((now.mean(0) - start.mean(0)).pow(2).mean().sqrt() / start_std.pow(2).mean().sqrt()),
    }
