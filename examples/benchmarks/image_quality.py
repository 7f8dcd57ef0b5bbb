#!/usr/bin/env python
"""Image quality: FM vs PAFM (and optionally the StableVM preset) on class-conditional 16 x 16 digits, equal compute.

Each method trains the same tiny class-conditional DiT with ``PAFMTrainer`` (same steps, batch, seed, schedule, EMA)
for every seed in ``--seeds``; the exported pipeline is reloaded and draws ``--samples_per_class`` images per digit
(``--num_inference_steps`` Euler steps, guidance ``--guidance_scale``). Scores, against all 1797 real digits:

* Frechet distance in the feature space of a small CNN classifier trained here on the digits (the same network for
  every method; its held-out accuracy is reported) - an offline stand-in for FID;
* memorisation: mean distance of each sample to its nearest training digit (pixels in [-1, 1]).

Mean +- standard error over seeds. Writes ``benchmarks/results/image_quality_cpu.{json,png}`` (the PNG: one row per
method, samples of the first seed).

    python examples/benchmarks/image_quality.py
"""

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_pafm import FlowMatchingPipeline, PAFMTrainer, PAFMTrainingConfig
from diffusers_pafm.data import load_digits_tensors
from diffusers_pafm.evaluation import to_pil
from diffusers_pafm.metrics import frechet_distance, nearest_neighbor_distance
from diffusers_pafm.trainers.engine import image_grid

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


class DigitFeatures(torch.nn.Module):
    """Small CNN classifier for 1 x 16 x 16 digits; ``features`` is its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(64 * 16, 64),
            torch.nn.SiLU(),
        )
        self.head = torch.nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, steps: int = 600) -> tuple[DigitFeatures, float]:
    """Train on 80 % of the digits (light noise augmentation); returns the net and its accuracy on the other 20 %."""
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=gen)
    split = int(0.8 * len(images))
    train, held_out = order[:split], order[split:]
    net = DigitFeatures()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = train[torch.randint(0, split, (128,), generator=gen)]
        x = images[idx] + 0.1 * torch.randn(images[idx].shape, generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(images[held_out]).argmax(1) == labels[held_out]).float().mean())
    return net, accuracy


def train_and_sample(method: str, seed: int, args: argparse.Namespace) -> torch.Tensor:
    """``method`` is an objective preset, optionally with a candidate source: ``pafm:class_bank``."""
    objective, _, candidates = method.partition(":")
    config = PAFMTrainingConfig(
        output_dir=str(Path(args.runs_dir) / f"{method.replace(':', '-')}-seed{seed}"),
        dataset="digits",
        objective=objective,
        candidates=candidates or None,
        model_size="tiny",
        patch_size=4,
        max_train_steps=args.steps,
        train_batch_size=64,
        learning_rate=1e-3,
        lr_scheduler="cosine",
        lr_warmup_steps=100,
        use_ema=True,
        ema_decay=0.999,
        checkpointing_steps=args.steps,
        checkpoints_total_limit=1,
        report_to="none",
        seed=seed,
    )
    folder = PAFMTrainer(config).train().export_dir
    pipe = FlowMatchingPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        class_labels=list(range(10)),
        num_images_per_prompt=args.samples_per_class,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(1000 + seed),
        output_type="pt",
    ).images
    return images * 2 - 1  # "pt" output is in [0, 1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", default="fm,pafm", help="objective presets, optionally :candidates (fm,pafm,pafm:class_bank)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--samples_per_class", type=int, default=100)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--feature_steps", type=int, default=600, help="training steps of the feature classifier")
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/image_quality", help="where the trained models go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    real, labels = load_digits_tensors(16)
    net, accuracy = train_feature_net(real, labels, args.feature_steps)
    with torch.no_grad():
        real_features = net.features(real)
    print(f"feature network: held-out accuracy {accuracy:.3f}", flush=True)

    results = {"feature_net_accuracy": accuracy, "methods": {}}
    rows = []
    for method in args.methods.split(","):
        runs = []
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            samples = train_and_sample(method, seed, args)
            with torch.no_grad():
                fd = float(frechet_distance(net.features(samples), real_features))
            memorisation = float(nearest_neighbor_distance(samples, real).mean())
            runs.append({"seed": seed, "frechet_distance": fd, "nearest_training_distance": memorisation})
            print(method, runs[-1], flush=True)
            if i == 0:
                rows.append(samples.view(10, args.samples_per_class, 1, 16, 16)[:, :8].reshape(-1, 1, 16, 16))
        summary = {}
        for key in ("frechet_distance", "nearest_training_distance"):
            values = np.array([run[key] for run in runs])
            se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
            summary[key] = {"mean": float(values.mean()), "se": float(se)}
        results["methods"][method] = {"runs": runs, **summary}
    if "fm" in results["methods"]:
        fm = results["methods"]["fm"]["frechet_distance"]["mean"]
        for method, scores in results["methods"].items():
            scores["fd_reduction_vs_fm"] = 1 - scores["frechet_distance"]["mean"] / fm
    # sheet: per method a block of 10 rows (digits) x 8 samples
    sheet = image_grid([to_pil(tile) for tile in torch.cat(rows)], rows=10 * len(rows), cols=8, scale=3)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sheet.save(out / "image_quality_cpu.png")
    results["config"] = vars(args)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["hardware"] = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["date"] = datetime.date.today().isoformat()
    (out / "image_quality_cpu.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "methods"}))


if __name__ == "__main__":
    main()
