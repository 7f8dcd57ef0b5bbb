#!/usr/bin/env python
"""VFM one-step vs the DPS-style sampler (100 steps): seconds per posterior sample, per DiT size.

Speed does not depend on the weights, so the pipelines are built at random initialisation (the trainers' flow map
and noise adapter, as ``train_vfm.py`` builds them for 3-channel images of that size; patch ``--patch_size``). Each
size solves box inpainting on ``--num_images`` held-out photograph crops with ``--num_draws`` draws each (one batch
per sampler), ``--repeats`` times interleaved (VFM, DPS, VFM, ...); the median seconds per sample of each and their
ratio are reported. The sizes are where per-call overhead dominates ("tiny" at 16 x 16, the demo's) and where model
compute does ("small" = DiT-S at 32 x 32). Posterior quality at these sizes is not measured here (it needs trained
models: ``vfm_images.py`` for the demo size).

Writes ``benchmarks/results/vfm_speed_cpu.json``.

    python benchmarks/vfm_speed.py
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import FlowMapEulerDiscreteScheduler

from diffusers_pafm import (
    FlowMapTransformer2DModel,
    NoiseAdapterModel,
    VariationalFlowMapPipeline,
    build_dit,
    dps_pipeline_sampler,
    evaluate_inverse_problem,
    pipeline_sampler,
)
from diffusers_pafm.evaluation import heldout_patches, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def build_pipeline(size: str, resolution: int, patch_size: int) -> VariationalFlowMapPipeline:
    torch.manual_seed(0)
    flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit(size, 3, resolution, 1, patch_size))
    adapter = NoiseAdapterModel(in_channels=3, sample_size=resolution, latent_size=resolution, num_tasks=1)
    pipe = VariationalFlowMapPipeline(
        adapter.eval(), flow_map.eval(), FlowMapEulerDiscreteScheduler(), tasks=["box_inpaint"]
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny:16,small:32", help="DiT preset:resolution pairs")
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--num_draws", type=int, default=8)
    parser.add_argument("--dps_steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {"sizes": {}}
    for spec in args.sizes.split(","):
        size, resolution = spec.split(":")
        pipe = build_pipeline(size, int(resolution), args.patch_size)
        crops = heldout_patches(args.num_images, int(resolution), 10_000)
        samplers = {"vfm_one_step": pipeline_sampler(pipe), "dps": dps_pipeline_sampler(pipe, args.dps_steps, 1.0)}
        evaluate_inverse_problem(samplers["vfm_one_step"], crops[:1], "box_inpaint", 0.05, 1, 0)  # warm-up
        times = {name: [] for name in samplers}
        for repeat in range(args.repeats):
            for name, sampler in samplers.items():
                result = evaluate_inverse_problem(sampler, crops, "box_inpaint", 0.05, args.num_draws, repeat)
                times[name].append(result.metrics()["seconds_per_sample"])
        medians = {name: statistics.median(values) for name, values in times.items()}
        results["sizes"][spec] = {
            "parameters_flow_map": sum(p.numel() for p in pipe.transformer.parameters()),
            "seconds_per_sample": medians,
            "all_seconds_per_sample": times,
            "speed_ratio_dps_over_vfm": medians["dps"] / medians["vfm_one_step"],
        }
        print(spec, json.dumps(results["sizes"][spec]), flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "vfm_speed_cpu", results, vars(args), start)


if __name__ == "__main__":
    main()
