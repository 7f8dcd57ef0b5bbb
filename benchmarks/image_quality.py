#!/usr/bin/env python
"""Image quality: FM vs PAFM (and optionally the StableVM preset) on class-conditional 16 x 16 images, equal compute.

``--dataset digits`` (default; scikit-learn's 1797 digits, 10 classes) or ``patches`` (2048 natural-image crops
from scikit-image's sample photos, the photo as the class).

Each method trains the same tiny class-conditional DiT with ``PAFMTrainer`` (same steps, batch, seed, schedule, EMA)
for every seed in ``--seeds``; the exported pipeline is reloaded and draws ``--samples_per_class`` images per class
(``--num_inference_steps`` Euler steps, guidance ``--guidance_scale``). Scores, against the real set:

* Frechet distance in the feature space of a small CNN classifier trained here on the real set (the same network for
  every method; its held-out accuracy is reported) - an offline stand-in for FID. With ``--inception_weights
  inception.safetensors`` it is computed in FID Inception's 2048-d pool features instead (torch-fidelity);
* memorisation: mean distance of each sample to its nearest real image (pixels in [-1, 1]).

Mean +- standard error over seeds. Writes ``benchmarks/results/image_quality_cpu.{json,png}``
(``image_quality_patches_cpu.*`` for patches; the PNG: per method a block of one row per class, first seed).

    python benchmarks/image_quality.py
"""

import argparse
import json
import time
from pathlib import Path

import torch
from common import train_and_sample

from diffusers_pafm.data import image_to_tensor, load_digits_tensors, make_patches
from diffusers_pafm.evaluation import (
    InceptionFeatures,
    frechet_distance,
    nearest_neighbor_distance,
    summarize_runs,
    train_feature_classifier,
    write_results,
)
from diffusers_pafm.utils import image_grid, to_pil

RESULTS = Path(__file__).resolve().parent / "results"


def load_real(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The real set in [-1, 1] at 16 x 16 with its class labels (patches: the training draw of seed 0)."""
    if dataset == "digits":
        return load_digits_tensors(16)
    images, labels = make_patches(2048, resolution=16, seed=0)
    return torch.stack([image_to_tensor(im, 16, 3) for im in images]), torch.tensor(labels)


def train_and_sample_method(method: str, seed: int, args: argparse.Namespace) -> torch.Tensor:
    """``method`` is an objective preset, optionally with a candidate source: ``pafm:class_bank``."""
    objective, _, candidates = method.partition(":")
    sampling = {"class_labels": list(range(args.num_classes)), "num_images_per_prompt": args.samples_per_class}
    return train_and_sample(
        method,
        seed,
        args,
        sampling,
        dataset=args.dataset,
        resolution=16,
        objective=objective,
        candidates=candidates or None,
        model_size="tiny",
        patch_size=4,
        train_batch_size=64,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", default="fm,pafm", help="objective presets, optionally :candidates (fm,pafm,pafm:class_bank)"
    )
    parser.add_argument("--dataset", default="digits", choices=("digits", "patches"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--samples_per_class", type=int, default=100)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--feature_steps", type=int, default=600, help="training steps of the feature classifier")
    parser.add_argument("--inception_weights", help="FID Inception .safetensors: Frechet distance in its features")
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/image_quality", help="where the trained models go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    real, labels = load_real(args.dataset)
    args.num_classes = int(labels.max()) + 1
    net, accuracy = train_feature_classifier(real, labels, (args.num_classes,), args.feature_steps)
    print(f"feature network: held-out accuracy {accuracy:.3f}", flush=True)
    features = InceptionFeatures(args.inception_weights).features if args.inception_weights else net.features
    with torch.no_grad():
        real_features = features(real)

    feature_space = "inception_pool3" if args.inception_weights else "in_project_classifier"
    results = {"feature_net_accuracy": accuracy, "feature_space": feature_space, "methods": {}}
    rows = []
    for method in args.methods.split(","):
        runs = []
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            samples = train_and_sample_method(method, seed, args)
            with torch.no_grad():
                fd = float(frechet_distance(features(samples), real_features))
            memorisation = float(nearest_neighbor_distance(samples, real).mean())
            runs.append({"seed": seed, "frechet_distance": fd, "nearest_training_distance": memorisation})
            print(method, runs[-1], flush=True)
            if i == 0:
                per_class = samples.view(args.num_classes, args.samples_per_class, *real.shape[1:])
                rows.append(per_class[:, :8].reshape(-1, *real.shape[1:]))
        summary = summarize_runs(runs, ("frechet_distance", "nearest_training_distance"))
        results["methods"][method] = {"runs": runs, **summary}
    if "fm" in results["methods"]:
        fm = results["methods"]["fm"]["frechet_distance"]["mean"]
        for method, scores in results["methods"].items():
            scores["fd_reduction_vs_fm"] = 1 - scores["frechet_distance"]["mean"] / fm
    # sheet: per method a block of one row per class x 8 samples
    tiles = [to_pil(tile) for tile in torch.cat(rows)]
    sheet = image_grid(tiles, rows=args.num_classes * len(rows), cols=min(8, args.samples_per_class), scale=3, gap=1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "image_quality_cpu" if args.dataset == "digits" else f"image_quality_{args.dataset}_cpu"
    sheet.save(out / f"{name}.png")
    write_results(out, name, results, vars(args), start)
    print(json.dumps({k: v for k, v in results.items() if k != "methods"}))


if __name__ == "__main__":
    main()
