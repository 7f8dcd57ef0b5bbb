#!/usr/bin/env python
"""Posterior MeanFlow on digits: Frechet distance of one-step samples, plain vs posterior target, seeds paired.

    python benchmarks/meanflow_digits.py [--seeds 0,1,2] [--steps 1500]

Each objective trains a flow map with ``MeanFlowTrainer`` (the ``train_vfm.py --stage meanflow`` path): the demo's
tiny DiT (patch 4) on the 1 797 scikit-learn digits at 16 x 16, batch 64, :data:`common.RECIPE` (cosine lr 1e-3,
EMA). ``fm`` is plain MeanFlow; ``pafm`` the posterior velocity over the global batch with class match (the
``pafm`` preset). Both see the same batches, times and noise per seed. Samples: one flow-map step from the same
fixed noise for both (``--samples_per_class`` per class); features of a small CNN trained here on the digits (the
same network as ``image_quality.py``). Writes ``meanflow_digits_cpu.{json,png}`` to ``--output_dir``.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import RECIPE

from diffusers_pafm import (
    FlowMapModel,
    FlowMapTransformer2DModel,
    MeanFlowTrainer,
    MeanFlowTrainingConfig,
    sample_flow_map,
)
from diffusers_pafm.data import load_digits_tensors
from diffusers_pafm.evaluation import frechet_distance, train_feature_classifier, write_results
from diffusers_pafm.utils import image_grid, to_pil

RESULTS = Path(__file__).resolve().parent / "results"


def train_and_sample(objective: str, seed: int, args: argparse.Namespace) -> torch.Tensor:
    config = MeanFlowTrainingConfig(
        dataset="digits",
        resolution=16,
        model_size="tiny",
        patch_size=4,
        train_batch_size=64,
        objective=objective,
        output_dir=str(Path(args.runs_dir) / f"{objective}-seed{seed}"),
        max_train_steps=args.steps,
        checkpointing_steps=args.steps,
        seed=seed,
        **RECIPE,
    )
    export = MeanFlowTrainer(config).train().export_dir
    flow_map = FlowMapTransformer2DModel.from_pretrained(export / "transformer", use_safetensors=True).eval()
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    noise = torch.randn((len(labels), 1, 16, 16), generator=torch.Generator().manual_seed(1000 + seed))
    with torch.no_grad():
        return sample_flow_map(FlowMapModel(flow_map), noise, 1, labels).clamp(-1, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--samples_per_class", type=int, default=100)
    parser.add_argument("--feature_steps", type=int, default=600, help="training steps of the feature classifier")
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/meanflow_digits", help="where the trained maps go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    real, labels = load_digits_tensors(16)
    net, accuracy = train_feature_classifier(real, labels, (10,), args.feature_steps)
    with torch.no_grad():
        real_features = net.features(real)
    seeds = [int(s) for s in args.seeds.split(",")]
    fd, rows = {"fm": [], "pafm": []}, []
    for seed in seeds:
        for objective in fd:
            samples = train_and_sample(objective, seed, args)
            with torch.no_grad():
                fd[objective].append(float(frechet_distance(net.features(samples), real_features)))
            print(objective, seed, fd[objective][-1], flush=True)
            if seed == seeds[0]:
                rows.append(samples.view(10, args.samples_per_class, 1, 16, 16)[:, :8].reshape(-1, 1, 16, 16))

    def summary(values):
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        return {"mean": statistics.mean(values), "standard_error": se, "runs": values}

    diff = [b - a for a, b in zip(fd["fm"], fd["pafm"])]
    results = {
        "benchmark": "meanflow_digits",
        "feature_net_accuracy": accuracy,
        "one_step_frechet_distance": {"meanflow": summary(fd["fm"]), "posterior_meanflow": summary(fd["pafm"])},
        "paired_difference_posterior_minus_plain": summary(diff),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sheet = image_grid([to_pil(t) for t in torch.cat(rows)], rows=20, cols=8, scale=3, gap=1)
    sheet.save(out / "meanflow_digits_cpu.png")
    print(json.dumps(results))
    write_results(out, "meanflow_digits_cpu", results, vars(args), start)


if __name__ == "__main__":
    main()
