#!/usr/bin/env python
"""VFM on images: one-step VFM vs a DPS-style guided sampler, on held-out natural-image patches.

1. Trains (unless ``--pipeline`` is given) the demo's VFM on 16 x 16 patches of the scikit-image photographs, amortised
   over box / random inpainting, super-resolution x2 / x4 and Gaussian deblurring (``diffusers_pafm.demo.train_vfm``:
   MeanFlow flow map, then noise adapter + flow map jointly, the trainers' defaults).
2. Tunes the DPS step size zeta per task on validation crops (PSNR of the mean of the draws; grid ``--dps_scales``).
   DPS guides the MeanFlow map, the unconditional prior the joint stage started from (``--dps_map joint``: the
   jointly trained map instead, as before 2026-12-07).
3. Scores both samplers on ``--num_images`` test crops (``diffusers_pafm.evaluate_inverse_problem``, ``--num_draws``
   draws each): PSNR / SSIM of the mean, CRPS, calibration, seconds per sample and the speed ratio.

Writes ``benchmarks/results/vfm_images_cpu.json`` and ``vfm_images_cpu.png`` (per task, two rows per image: VFM then
DPS, each observation | draws | mean | truth), or the same under ``--output_dir``.

``--seeds 0,1,2`` is the stability benchmark (issue 20, item 3): one multi-task model per seed, trained with the
defaults; a run that stops with the trainers' non-finite / spike error counts as diverged. Per task it reports the
posterior mean's PSNR minus the pseudo-inverse's and the VFM CRPS minus the DPS CRPS, each paired within a seed (the
samplers see the same observations) and given as mean +- standard error over the seeds; a "beats" flag only where
the mean exceeds its standard error; and per seed the prior kept (issue 20, item 5): MMD of the MeanFlow map's
and the joint map's unconditional one-step samples to held-out patches, and their ratio. Writes
``vfm_stability_cpu.{json,png}`` (the picture: the first seed's).

    python benchmarks/vfm_images.py
    python benchmarks/vfm_images.py --seeds 0,1,2 --meanflow_steps 2000 --vfm_steps 1500 --dps_scales 0.3,1,3
    python benchmarks/vfm_images.py --seeds 0,1,2 --score_existing --dps_map joint --dps_scales 0.3,1,3  # re-score
"""

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from diffusers_pafm import VariationalFlowMapPipeline, dps_pipeline_sampler, evaluate_inverse_problem, pipeline_sampler
from diffusers_pafm.demo import compare_priors, train_vfm
from diffusers_pafm.evaluation import heldout_patches, summarize_runs, write_results

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("box_inpaint", "random_inpaint", "super_resolution_2x", "super_resolution_4x", "gaussian_blur")


def meanflow_map(folder: Path) -> Path:
    """Where ``train_vfm`` puts the MeanFlow map (the prior the joint stage started from) of VFM export ``folder``."""
    return folder.parent / "flowmap-patches" / "transformer"


def prior_pipeline(pipe: VariationalFlowMapPipeline, folder: Path) -> VariationalFlowMapPipeline:
    """The pipeline with its MeanFlow map in place of the joint map."""
    path = meanflow_map(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--dps_map meanflow needs the MeanFlow map next to the VFM export, at {path} (where train_vfm puts "
            "it); pass --dps_map joint to run the DPS baseline on the export's own map"
        )
    transformer = type(pipe.transformer).from_pretrained(path, use_safetensors=True)
    return VariationalFlowMapPipeline(
        pipe.noise_adapter, transformer, pipe.scheduler, vae=pipe.vae, tasks=pipe.config.tasks
    )


def score(folder, args, seed: int) -> tuple[dict, Image.Image]:
    """Per task: VFM and tuned DPS metrics on held-out crops of this seed, and the picture."""
    pipe = VariationalFlowMapPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    tasks = [task for task in TASKS if task in pipe.config.tasks]
    size = pipe.noise_adapter.config.sample_size
    validation = heldout_patches(4, size, 20_000 + seed)
    test = heldout_patches(args.num_images, size, 10_000 + seed)
    vfm = pipeline_sampler(pipe)
    dps_pipe = pipe if args.dps_map == "joint" else prior_pipeline(pipe, Path(folder))

    results, rows = {}, []
    for index, task in enumerate(tasks):
        task_seed = seed + 100 * index  # the same observations for both samplers
        tuning = {}
        for scale in [float(s) for s in args.dps_scales.split(",")]:
            sampler = dps_pipeline_sampler(dps_pipe, args.dps_steps, scale)
            tuning[scale] = evaluate_inverse_problem(
                sampler, validation, task, args.sigma, 2, task_seed + 50
            ).metrics()
        best = max(tuning, key=lambda s: tuning[s]["psnr_posterior_mean"])
        one_step = evaluate_inverse_problem(vfm, test, task, args.sigma, args.num_draws, task_seed)
        dps = evaluate_inverse_problem(
            dps_pipeline_sampler(dps_pipe, args.dps_steps, best), test, task, args.sigma, args.num_draws, task_seed
        )
        scores = {"vfm_one_step": one_step.metrics(), "dps": dps.metrics()}
        speed = dps.metrics()["seconds_per_sample"] / one_step.metrics()["seconds_per_sample"]
        results[task] = {
            **scores,
            "dps_steps": args.dps_steps,
            "dps_map": args.dps_map,
            "dps_scale": best,
            "dps_tuning_psnr": {str(s): m["psnr_posterior_mean"] for s, m in tuning.items()},
            "speed_ratio_dps_over_vfm": speed,
        }
        print(task, json.dumps({k: v for k, v in results[task].items() if k != "dps_tuning_psnr"}), flush=True)
        grids = one_step.grid(scale=1), dps.grid(scale=1)
        for i in range(min(4, len(test))):  # the first images: a VFM row, then a DPS row
            rows += [grid.crop((0, size * i, grid.width, size * (i + 1))) for grid in grids]
    sheet = Image.new("RGB", (rows[0].width, size * len(rows)))
    for i, row in enumerate(rows):
        sheet.paste(row, (0, size * i))
    return results, sheet.resize((sheet.width * 4, sheet.height * 4), Image.NEAREST)


def train(args, seed: int) -> Path:
    return train_vfm(
        Path(args.runs_dir) / f"seed{seed}",
        meanflow_steps=args.meanflow_steps,
        vfm_steps=args.vfm_steps,
        measurement_sigma=args.sigma,
        seed=seed,
        tasks=TASKS,
    )


def existing_run(args, seed: int) -> Path:
    """The VFM export an earlier ``--seeds`` run left for this seed in ``--runs_dir``."""
    folder = Path(args.runs_dir) / f"seed{seed}" / "vfm-patches"
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"--score_existing: no VFM export for seed {seed} at {folder}")
    return folder


def prior_mmd(folder: Path, seed: int) -> dict[str, float]:
    """MMD of unconditional one-step samples of the MeanFlow map and of the joint map to held-out patches (the
    demo's measure; its ``vfm_prior.png`` goes next to the models), and their ratio (issue 20's goal: <= 1.25)."""
    maps = {"meanflow_map": meanflow_map(folder), "joint_map": folder / "transformer"}
    resolution = json.loads((folder / "noise_adapter" / "config.json").read_text())["sample_size"]
    scores = compare_priors(maps, folder.parent, resolution, seed)["mmd_to_heldout"]
    return {**scores, "joint_over_meanflow": scores["joint_map"] / scores["meanflow_map"]}


def stability(args) -> tuple[dict, Image.Image | None]:
    """One default-recipe model per seed; the divergences and, per task, the paired gaps over the seeds."""
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, priors, diverged, sheet = {}, {}, {}, None
    for seed in seeds:
        try:
            folder = existing_run(args, seed) if args.score_existing else train(args, seed)
        except FloatingPointError as error:  # the StepGuard's error: step and term
            diverged[seed] = str(error)
            print(f"seed {seed} diverged: {error}", flush=True)
            continue
        runs[seed], picture = score(folder, args, seed)
        sheet = picture if sheet is None else sheet
        priors[seed] = prior_mmd(folder, seed)
    table = {}
    prior = summarize_runs(list(priors.values()), list(next(iter(priors.values())))) if priors else {}
    for task in TASKS:
        per_seed = [
            {
                "psnr_minus_pseudo_inverse": r[task]["vfm_one_step"]["psnr_posterior_mean"]
                - r[task]["vfm_one_step"]["psnr_pseudo_inverse"],
                "crps_vfm_minus_dps": r[task]["vfm_one_step"]["crps"] - r[task]["dps"]["crps"],
                **{f"vfm_{k}": v for k, v in r[task]["vfm_one_step"].items()},
                **{f"dps_{k}": v for k, v in r[task]["dps"].items()},
            }
            for r in runs.values()
        ]
        if per_seed:
            table[task] = summarize_runs(per_seed, list(per_seed[0]))
            gap, crps = table[task]["psnr_minus_pseudo_inverse"], table[task]["crps_vfm_minus_dps"]
            table[task]["beats_pseudo_inverse_psnr"] = gap["mean"] > 0 and gap["mean"] > gap["se"]
            table[task]["beats_dps_crps"] = crps["mean"] < 0 and -crps["mean"] > crps["se"]
    return {
        "seeds": seeds,
        "diverged": diverged,
        "runs": runs,
        "tasks": table,
        "prior": prior,
        "priors": priors,
    }, sheet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="score this VFM export instead of training one")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: the stability benchmark (docstring)")
    parser.add_argument("--meanflow_steps", type=int, default=2500)
    parser.add_argument("--vfm_steps", type=int, default=2000)
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--num_draws", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--dps_steps", type=int, default=100)
    parser.add_argument("--dps_scales", default="0.3,1,3,10")
    parser.add_argument(
        "--dps_map",
        choices=("meanflow", "joint"),
        default="meanflow",
        help="the flow map the DPS baseline guides: the MeanFlow map (the prior, as DPS assumes) or the joint map",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument(
        "--score_existing",
        action="store_true",
        help="with --seeds: score the models an earlier run left in --runs_dir instead of training them again",
    )
    parser.add_argument("--runs_dir", default="benchmark_runs/vfm_images", help="where the trained models go")
    args = parser.parse_args(argv)
    if args.pipeline and args.seeds:
        parser.error("--seeds trains one model per seed; it cannot be combined with --pipeline")
    if args.score_existing and not args.seeds:
        parser.error("--score_existing scores the models of a --seeds run; pass the same --seeds and --runs_dir")
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if args.seeds:
        name = "vfm_stability_cpu"
        results, sheet = stability(args)
    else:
        name = "vfm_images_cpu"
        folder = args.pipeline or train(args, args.seed)
        tasks, sheet = score(folder, args, args.seed)
        results = {"tasks": tasks, "pipeline": str(folder)}
    if sheet is not None:
        sheet.save(out / f"{name}.png")
    write_results(out, name, results, vars(args), start)


if __name__ == "__main__":
    main()
