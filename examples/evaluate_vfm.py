#!/usr/bin/env python
"""Score a Variational Flow Map pipeline on held-out patches, optionally against a DPS-style guided sampler.

    python examples/evaluate_vfm.py --pipeline demo_output/runs/vfm-patches --output_dir vfm-eval
    python examples/evaluate_vfm.py --pipeline demo_output/runs/vfm-patches --dps_steps 100 --output_dir vfm-eval

For every task of the pipeline: ``--num_images`` held-out crops of the scikit-image photographs (never used in
training), observed with noise ``--sigma``; ``--num_draws`` one-step VFM draws each and, with ``--dps_steps``, as many
DPS-style draws on the same flow map (``diffusers_pafm.dps_sample``). Writes ``metrics.json`` (PSNR / SSIM of
the draws' mean, PSNR of the pseudo-inverse, CRPS, seconds per sample; per method and task, plus the speed ratio) and
``<method>_<task>.png`` grids (observation | draws | mean | truth).
"""

import argparse
import json
from pathlib import Path

from diffusers_pafm import VariationalFlowMapPipeline
from diffusers_pafm.evaluation import (
    dps_pipeline_sampler,
    evaluate_inverse_problem,
    heldout_patches,
    pipeline_sampler,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder or Hub repo id of a VariationalFlowMapPipeline")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the pipeline's tasks")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--num_draws", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--dps_steps", type=int, default=0, help="also run the DPS-style baseline (0: skip)")
    parser.add_argument("--dps_scale", type=float, default=0.5, help="DPS step size zeta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="vfm-eval")
    args = parser.parse_args(argv)

    pipe = VariationalFlowMapPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    tasks = args.tasks.split(",") if args.tasks else pipe.config.tasks
    size = pipe.noise_adapter.config.sample_size
    channels = pipe.noise_adapter.config.in_channels
    truth = heldout_patches(args.num_images, size, seed=10_000 + args.seed, channels=channels)
    samplers = {"vfm_one_step": pipeline_sampler(pipe)}
    if args.dps_steps:
        samplers[f"dps_{args.dps_steps}_steps"] = dps_pipeline_sampler(pipe, args.dps_steps, args.dps_scale)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: {} for name in samplers}
    for index, task in enumerate(tasks):
        for name, sampler in samplers.items():
            result = evaluate_inverse_problem(
                sampler, truth, task, args.sigma, args.num_draws, args.seed + 100 * index
            )
            results[name][task] = result.metrics()
            result.grid().save(out / f"{name}_{task}.png")
            print(name, task, json.dumps({k: round(v, 4) for k, v in results[name][task].items()}))
    if args.dps_steps:
        dps = results[f"dps_{args.dps_steps}_steps"]
        results["speed_ratio_dps_over_vfm"] = {
            task: dps[task]["seconds_per_sample"] / results["vfm_one_step"][task]["seconds_per_sample"]
            for task in tasks
        }
    results["config"] = vars(args)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out}/metrics.json and {len(tasks) * len(samplers)} grids")


if __name__ == "__main__":
    main()
