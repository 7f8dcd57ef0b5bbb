#!/usr/bin/env python
"""VFM on images: one-step VFM vs a DPS-style guided sampler on the same flow map, on held-out natural-image patches.

1. Trains (unless ``--pipeline`` is given) the demo's VFM on 16 x 16 patches of the scikit-image photographs, amortised
   over box / random inpainting, super-resolution x2 / x4 and Gaussian deblurring (``diffusers_pafm.demo.train_vfm``:
   MeanFlow flow map, then noise adapter + flow map jointly).
2. Tunes the DPS step size zeta per task on validation crops (PSNR of the mean of the draws; grid ``--dps_scales``).
3. Scores both samplers on ``--num_images`` test crops (``diffusers_pafm.evaluate_inverse_problem``, ``--num_draws``
   draws each): PSNR / SSIM of the mean, CRPS, seconds per sample and the speed ratio.

Writes ``benchmarks/results/vfm_images_cpu.json`` and ``vfm_images_cpu.png`` (per task, two rows per image: VFM then
DPS, each observation | draws | mean | truth), or the same under ``--output_dir``.

    python benchmarks/vfm_images.py
"""

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from diffusers_pafm import VariationalFlowMapPipeline, dps_pipeline_sampler, evaluate_inverse_problem, pipeline_sampler
from diffusers_pafm.demo import train_vfm
from diffusers_pafm.evaluation import environment, heldout_patches

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("box_inpaint", "random_inpaint", "super_resolution_2x", "super_resolution_4x", "gaussian_blur")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="score this VFM export instead of training one")
    parser.add_argument("--meanflow_steps", type=int, default=2500)
    parser.add_argument("--vfm_steps", type=int, default=2000)
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--num_draws", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--dps_steps", type=int, default=100)
    parser.add_argument("--dps_scales", default="0.3,1,3,10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/vfm_images", help="where the trained models go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    folder = args.pipeline
    if folder is None:
        folder = train_vfm(
            Path(args.runs_dir),
            meanflow_steps=args.meanflow_steps,
            vfm_steps=args.vfm_steps,
            measurement_sigma=args.sigma,
            seed=args.seed,
            tasks=TASKS,
        )
    pipe = VariationalFlowMapPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    tasks = [task for task in TASKS if task in pipe.config.tasks]
    size = pipe.noise_adapter.config.sample_size
    validation = heldout_patches(4, size, 20_000 + args.seed)
    test = heldout_patches(args.num_images, size, 10_000 + args.seed)
    vfm = pipeline_sampler(pipe)

    results, rows = {"tasks": {}}, []
    for index, task in enumerate(tasks):
        seed = args.seed + 100 * index  # the same observations for both samplers
        tuning = {}
        for scale in [float(s) for s in args.dps_scales.split(",")]:
            sampler = dps_pipeline_sampler(pipe, args.dps_steps, scale)
            tuning[scale] = evaluate_inverse_problem(sampler, validation, task, args.sigma, 2, seed + 50).metrics()
        best = max(tuning, key=lambda s: tuning[s]["psnr_posterior_mean"])
        one_step = evaluate_inverse_problem(vfm, test, task, args.sigma, args.num_draws, seed)
        dps = evaluate_inverse_problem(
            dps_pipeline_sampler(pipe, args.dps_steps, best), test, task, args.sigma, args.num_draws, seed
        )
        scores = {"vfm_one_step": one_step.metrics(), f"dps_{args.dps_steps}_steps": dps.metrics()}
        speed = dps.metrics()["seconds_per_sample"] / one_step.metrics()["seconds_per_sample"]
        results["tasks"][task] = {
            **scores,
            "dps_scale": best,
            "dps_tuning_psnr": {str(s): m["psnr_posterior_mean"] for s, m in tuning.items()},
            "speed_ratio_dps_over_vfm": speed,
        }
        print(
            task, json.dumps({k: v for k, v in results["tasks"][task].items() if k != "dps_tuning_psnr"}), flush=True
        )
        grids = one_step.grid(scale=1), dps.grid(scale=1)
        for i in range(min(4, len(test))):  # the first images: a VFM row, then a DPS row
            rows += [grid.crop((0, size * i, grid.width, size * (i + 1))) for grid in grids]
    sheet = Image.new("RGB", (rows[0].width, size * len(rows)))
    for i, row in enumerate(rows):
        sheet.paste(row, (0, size * i))
    sheet.resize((sheet.width * 4, sheet.height * 4), Image.NEAREST).save(out / "vfm_images_cpu.png")
    results["config"] = {**vars(args), "pipeline": str(folder)}
    results["seconds"] = round(time.perf_counter() - start, 1)
    results.update(environment())
    (out / "vfm_images_cpu.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'vfm_images_cpu.json'} and {out / 'vfm_images_cpu.png'} in {results['seconds']} s")


if __name__ == "__main__":
    main()
