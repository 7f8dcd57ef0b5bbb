#!/usr/bin/env python
"""VFM calibration against an exact reference: a Gaussian image prior N(m, C) fitted to real patches.

1. Fits m and a full C to 3 x 8 x 8 crops of the scikit-image photographs (``GaussianImagePrior.fit``), at half
   their contrast (x -> x / 2, so that draws and observations stay well inside the pipeline's accepted range), and
   writes ``--num_train`` samples of it as an encoded dataset.
2. Trains through the CLI with its defaults (``training/train_vfm.py``: data, size, steps, tasks and seed only): the
   MeanFlow stage, then the joint VFM stage on five tasks (one multi-task adapter), and the adapter-only baseline
   against the same MeanFlow map.
3. For ``--num_images`` fresh draws of the prior per task: the exact posterior N(mu, S) of each observation, and
   ``--num_draws`` one-step draws of each pipeline. Reports per task the RMS of (draw mean - mu) / sqrt(diag S)
   (exact draws: about sqrt(1/J)), the ratio of the draws' std to sqrt(diag S), the coverage of the truth by the
   draws' central 50 % / 90 % per-pixel intervals, PSNR of the draws' mean (the exact posterior mean's PSNR is the
   ceiling) and the pseudo-inverse's; the same scores for exact posterior draws check the protocol.
   Goals (issue 20): coverage within 5 points of nominal, std ratio in [0.8, 1.25], mean z RMS <= 0.5.

Writes ``benchmarks/results/vfm_gaussian_calibration_cpu.json`` and ``.png`` (per task, one row per image: truth |
A^+ y | exact mean | 3 exact draws | VFM mean | 3 VFM draws | adapter-only mean | 3 adapter-only draws).

``--alphas 0.8,0.3`` measures the one lever that moves the map off its prior (``--alpha``, the share of the MeanFlow
term's rows on adapter noise; ``benchmarks/README.md`` section 18): one joint run per value from the same MeanFlow
map, paired, written to ``vfm_gaussian_calibration_alphas_cpu.{json,png}``; ``--stop_gradient_variant`` adds the
joint stage with the paper's stop-gradient data term (``..._stop_gradient_cpu``). ``--adapter_steps 0`` skips the
baseline.

    python benchmarks/vfm_gaussian_calibration.py
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusers_pafm import (
    EncodedDataset,
    FlowMapTransformer2DModel,
    VariationalFlowMapPipeline,
    evaluate_inverse_problem,
    pipeline_sampler,
)
from diffusers_pafm.evaluation import (
    GaussianImagePrior,
    InverseProblemResult,
    calibration_to_reference,
    environment,
    heldout_patches,
    psnr,
    unconditional_samples,
)
from diffusers_pafm.utils import image_grid, to_pil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("box_inpaint", "random_inpaint", "super_resolution_2x", "super_resolution_4x", "gaussian_blur")
GOALS = {"coverage_points": 0.05, "std_ratio": (0.8, 1.25), "mean_z_rms": 0.5}


def train(stage: str, output_dir: Path, steps: int, seed: int, **options) -> Path:
    """``training/train_vfm.py --stage <stage>`` in a subprocess, as a user runs it; returns the export folder."""
    argv = [sys.executable, str(ROOT / "training" / "train_vfm.py"), "--stage", stage, "--output_dir", str(output_dir)]
    options = {"max_train_steps": steps, "seed": seed, "checkpointing_steps": steps, "report_to": "none", **options}
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    subprocess.run(argv, check=True)
    return output_dir


def exact_sampler(prior: GaussianImagePrior, sigma: float):
    """Draws from the closed-form posterior: the protocol's own check (scores should sit at their ideal values)."""

    def sample(y, operator, num_draws, generator):
        means, covariances = prior.posterior(operator, y, sigma)
        jitter = 1e-10 * torch.eye(covariances.shape[-1], dtype=torch.float64)
        eps = torch.randn(y.shape[0], num_draws, covariances.shape[-1], generator=generator, dtype=torch.float64)
        draws = means.flatten(1).unsqueeze(1) + torch.einsum(
            "bde,bje->bjd", torch.linalg.cholesky(covariances + jitter), eps
        )
        return draws.float().view(y.shape[0], num_draws, *prior.shape)

    return sample


def scores(result: InverseProblemResult, prior: GaussianImagePrior) -> dict[str, float]:
    means, covariances = prior.posterior(result.operator, result.observation, result.measurement_sigma)
    out = calibration_to_reference(result.draws, result.truth, means, covariances)
    out["psnr_posterior_mean"] = float(psnr(result.draws.mean(1), result.truth).mean())
    out["psnr_exact_posterior_mean"] = float(psnr(means.float(), result.truth).mean())
    out["psnr_pseudo_inverse"] = float(psnr(result.pseudo_inverse, result.truth).mean())
    out["spread_over_error"] = result.spread_over_error()
    return out


def prior_fit(folder: Path, prior: GaussianImagePrior, num_samples: int = 4096) -> dict[str, float]:
    """How well a map's own one-step samples from N(0, I) match N(m, C): the RMS of the per-pixel mean error in
    units of the pixel std, the mean per-pixel std ratio, and the std ratio along the top and the bottom 10 % of
    C's eigen-directions (what a posterior that conditions on the small directions inherits)."""
    transformer = FlowMapTransformer2DModel.from_pretrained(folder / "transformer", use_safetensors=True).eval()
    x = unconditional_samples(transformer, num_samples, seed=5).flatten(1).double()
    std = prior.covariance.diagonal().sqrt()
    eigenvalues, vectors = torch.linalg.eigh(prior.covariance)
    projected_var = ((x - x.mean(0)) @ vectors).var(0)
    ratio = (projected_var / eigenvalues).sqrt()
    tenth = max(len(ratio) // 10, 1)
    return {
        "mean_error_over_std_rms": float(((x.mean(0) - prior.mean) / std).pow(2).mean().sqrt()),
        "pixel_std_ratio": float((x.std(0) / std).mean()),
        "std_ratio_top_10pct_directions": float(ratio[-tenth:].mean()),
        "std_ratio_bottom_10pct_directions": float(ratio[:tenth].mean()),
    }


def meets_goals(row: dict[str, float]) -> bool:
    low, high = GOALS["std_ratio"]
    return (
        abs(row["coverage_50"] - 0.5) <= GOALS["coverage_points"]
        and abs(row["coverage_90"] - 0.9) <= GOALS["coverage_points"]
        and low <= row["std_ratio"] <= high
        and row["mean_z_rms"] <= GOALS["mean_z_rms"]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meanflow_steps", type=int, default=4000)
    parser.add_argument("--vfm_steps", type=int, default=3000)
    parser.add_argument("--adapter_steps", type=int, default=2000, help="0: no adapter-only baseline")
    parser.add_argument(
        "--stop_gradient_variant",
        action="store_true",
        help="also a joint run with --observation_trains_flow_map false (the paper's stop-gradient data term)",
    )
    parser.add_argument(
        "--alphas", default=None, help="comma list: one joint run per --alpha (default: the trainer's)"
    )
    parser.add_argument("--num_train", type=int, default=16384, help="samples of the Gaussian to train on")
    parser.add_argument("--num_fit", type=int, default=8192, help="photograph crops the Gaussian is fitted to")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--num_draws", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/vfm_gaussian", help="where data and models go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out, runs = Path(args.output_dir), Path(args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)

    crops = heldout_patches(args.num_fit, args.resolution, 30_000 + args.seed) / 2
    prior = GaussianImagePrior.fit(crops)
    samples = prior.sample(args.num_train, torch.Generator().manual_seed(args.seed))
    meta = {"space": "pixel", "resolution": args.resolution, "num_classes": None, "source": "Gaussian fit to patches"}
    data = EncodedDataset(samples, meta=meta).save(runs / "data")

    common = {"dataset": str(data), "seed": args.seed}
    flow_map = train("meanflow", runs / "flowmap", args.meanflow_steps, **common)
    vfm_options = {"pretrained_model_name_or_path": str(flow_map), "tasks": ",".join(TASKS)}
    vfm_options["measurement_sigma"] = args.sigma
    # the joint runs: name -> (run folder, options beside the defaults), all from the same MeanFlow map
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else []
    joint_runs = {f"vfm_joint_alpha{a:g}": (f"vfm_alpha{a:g}", {"alpha": a}) for a in alphas} or {
        "vfm_joint": ("vfm", {})
    }
    if args.stop_gradient_variant:  # the observation term's map a stop-gradient copy (the paper's data term)
        joint_runs["vfm_joint_stop_gradient"] = ("vfm_stop_gradient", {"observation_trains_flow_map": False})
    joints = {
        name: train("vfm", runs / folder, args.vfm_steps, **common, **vfm_options, **extra)
        for name, (folder, extra) in joint_runs.items()
    }
    folders = dict(joints)
    if args.adapter_steps:
        folders["adapter_only"] = train(
            "adapter_only", runs / "adapter_only", args.adapter_steps, **common, **vfm_options
        )

    samplers = {"exact_posterior": exact_sampler(prior, args.sigma)}
    for name, folder in folders.items():
        pipe = VariationalFlowMapPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        samplers[name] = pipeline_sampler(pipe, clip=False)  # the Gaussian's values may leave [-1, 1]

    truth = prior.sample(args.num_images, torch.Generator().manual_seed(10_000 + args.seed))
    results, tiles = {"tasks": {}}, []
    for index, task in enumerate(TASKS):
        seed = args.seed + 100 * index  # the same observations for every sampler
        runs_of_task = {
            name: evaluate_inverse_problem(sampler, truth, task, args.sigma, args.num_draws, seed)
            for name, sampler in samplers.items()
        }
        results["tasks"][task] = {name: scores(result, prior) for name, result in runs_of_task.items()}
        for name in joints:
            results["tasks"][task][f"{name}_meets_goals"] = meets_goals(results["tasks"][task][name])
        print(task, json.dumps(results["tasks"][task]), flush=True)
        exact = runs_of_task["exact_posterior"]
        for i in range(2):  # the first two images of each task
            tiles += [to_pil(exact.truth[i].clamp(-1, 1)), to_pil(exact.pseudo_inverse[i].clamp(-1, 1))]
            for result in runs_of_task.values():
                draws = result.draws[i].clamp(-1, 1)
                tiles += [to_pil(draws.mean(0)), *[to_pil(d) for d in draws[:3]]]
    cols = 2 + 4 * len(samplers)  # truth, A^+ y, then mean + 3 draws per sampler
    grid = image_grid(tiles, rows=len(tiles) // cols, cols=cols, scale=8)
    stem = "vfm_gaussian_calibration" + ("_alphas" if args.alphas else "")
    stem += "_stop_gradient" if args.stop_gradient_variant else ""
    grid.save(out / f"{stem}_cpu.png")

    results["goals"] = GOALS
    results["prior"] = {
        "dimension": prior.mean.numel(),
        "mean_pixel_std": float(prior.covariance.diagonal().sqrt().mean()),
        "condition_number": float(torch.linalg.cond(prior.covariance)),
        "effective_rank_95": int(
            (torch.linalg.eigvalsh(prior.covariance).flip(0).cumsum(0) / prior.covariance.trace() < 0.95).sum()
        )
        + 1,
    }
    maps = {"meanflow_map": flow_map, **{name.replace("vfm_joint", "joint_map"): f for name, f in joints.items()}}
    results["flow_map_prior_fit"] = {name: prior_fit(folder, prior) for name, folder in maps.items()}
    results["config"] = vars(args)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results.update(environment())
    (out / f"{stem}_cpu.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / f'{stem}_cpu.json'} and .png in {results['seconds']} s")


if __name__ == "__main__":
    main()
