"""`make demo`: the whole project on built-in data, on a 2-core CPU, in about 10 minutes.

1. PAFM: a tiny class-conditional diffusers DiT trained with posterior-augmented flow matching on scikit-learn's
   digits (16 x 16), exported with ``save_pretrained`` and reloaded with ``FlowMatchingPipeline.from_pretrained``.
2. VFM: a flow map (x-prediction, raw-t time embedding) trained by MeanFlow on natural-image patches (scikit-image
   photographs, 16 x 16), then a noise adapter trained jointly with it for box inpainting, random inpainting and 2x
   super-resolution (the observation term trains the map too); reloaded with
   ``VariationalFlowMapPipeline.from_pretrained`` and used for one-step posterior sampling of held-out patches (new
   crops, never seen in training).

Writes to ``--output_dir`` (default ``demo_output``):

* ``pafm_samples.png`` - one row per digit class, from the reloaded PAFM pipeline; ``pafm_data.png`` - real digits
* ``vfm_<task>.png`` - one row per held-out patch: observation | one-step samples | mean | ground truth
* ``vfm_prior.png`` - unconditional one-step samples (no observation) of the MeanFlow map and of the jointly trained
  map under a row of held-out patches: what the joint stage did to the prior
* ``metrics.json`` - PSNR of the posterior mean and of the observation's pseudo-inverse, CRPS, how well the draws
  explain the observation (RMS of A x - y in units of sigma; the truth scores about 1), seconds per sample, the MMD
  of both priors to held-out patches, PAFM's effective sample size (ESS) and training losses
* ``model_cards/`` - the rendered model cards of both exports; ``runs/`` - the exported pipelines, training logs
  (``train_log.jsonl``, tensorboard) and validation grids.

Importable (``diffusers_pafm.demo.main(argv)`` returns the metrics) and installed as the console script
``diffusers-pafm-demo`` (:func:`cli`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .data import load_digits_tensors
from .evaluation.inverse_problems import (
    evaluate_inverse_problem,
    heldout_patches,
    pipeline_sampler,
    unconditional_samples,
)
from .evaluation.metrics import mmd
from .models import FlowMapTransformer2DModel
from .pipelines import FlowMatchingPipeline, VariationalFlowMapPipeline
from .trainers import (
    MeanFlowTrainer,
    MeanFlowTrainingConfig,
    PAFMTrainer,
    PAFMTrainingConfig,
    VFMTrainer,
    VFMTrainingConfig,
)
from .utils.images import image_grid, to_pil

__all__ = ["main", "cli", "parse_args", "train_pafm", "train_vfm", "TASKS"]

TASKS = ("box_inpaint", "random_inpaint", "super_resolution_2x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--pafm_steps", type=int, default=1500)
    parser.add_argument("--meanflow_steps", type=int, default=2500)
    parser.add_argument("--vfm_steps", type=int, default=1500)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--num_patches", type=int, default=4096, help="training patches for VFM")
    parser.add_argument("--num_heldout", type=int, default=8, help="held-out patches per task")
    parser.add_argument("--num_draws", type=int, default=6, help="one-step posterior samples per observation")
    parser.add_argument("--measurement_sigma", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test, not a result)")
    return parser.parse_args(argv)


def train_pafm(args: argparse.Namespace, directory: Path) -> Path:
    config = PAFMTrainingConfig(
        output_dir=str(directory),
        dataset="digits",
        objective="pafm",
        model_size="tiny",
        patch_size=4,  # 16 tokens: 3x faster than patch 2 on a 2-core CPU
        max_train_steps=args.pafm_steps,
        train_batch_size=64,
        learning_rate=1e-3,
        lr_scheduler="cosine",
        lr_warmup_steps=min(100, args.pafm_steps // 10),
        use_ema=True,
        ema_decay=0.999,
        checkpointing_steps=max(args.pafm_steps // 2, 1),
        checkpoints_total_limit=1,
        validation_steps=max(args.pafm_steps // 2, 1),
        seed=args.seed,
    )
    return PAFMTrainer(config).train().export_dir


def train_vfm(
    directory: Path,
    *,
    meanflow_steps: int = 2500,
    vfm_steps: int = 1500,
    resolution: int = 16,
    num_patches: int = 4096,
    measurement_sigma: float = 0.05,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
) -> Path:
    """The demo's VFM recipe: a MeanFlow flow map on ``num_patches`` photograph patches, then the noise adapter
    jointly with it for ``tasks``; returns the VFM export under ``directory``."""
    common = {  # data, size and seed only: the recipe is the trainers' defaults (docs/vfm_recipe.md)
        "dataset": "patches",
        "resolution": resolution,
        "max_train_samples": num_patches,
        "model_size": "tiny",
        "checkpoints_total_limit": 1,
        "seed": seed,
    }
    meanflow = MeanFlowTrainingConfig(
        output_dir=str(directory / "flowmap-patches"),
        max_train_steps=meanflow_steps,
        lr_warmup_steps=min(100, meanflow_steps // 10),
        checkpointing_steps=max(meanflow_steps // 2, 1),
        validation_steps=max(meanflow_steps // 2, 1),
        **common,
    )
    flow_map = MeanFlowTrainer(meanflow).train().export_dir
    joint = VFMTrainingConfig(
        output_dir=str(directory / "vfm-patches"),
        pretrained_model_name_or_path=str(flow_map),
        tasks=",".join(tasks),
        measurement_sigma=measurement_sigma,
        max_train_steps=vfm_steps,
        lr_warmup_steps=min(100, vfm_steps // 10),
        checkpointing_steps=max(vfm_steps // 2, 1),
        validation_steps=max(vfm_steps // 2, 1),
        **common,
    )
    return VFMTrainer(joint).train().export_dir


def sample_pafm(folder: Path, out: Path, seed: int) -> None:
    pipe = FlowMatchingPipeline.from_pretrained(folder, use_safetensors=True)
    images = pipe(
        class_labels=list(range(10)),
        num_images_per_prompt=8,
        num_inference_steps=25,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
    ).images
    image_grid(images, rows=10, cols=8, scale=4, gap=2).save(out / "pafm_samples.png")
    digits, _ = load_digits_tensors(16)
    real = [to_pil(im) for im in digits[:80]]
    image_grid(real, rows=10, cols=8, scale=4, gap=2).save(out / "pafm_data.png")


def solve_inverse_problems(folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """One-step posterior samples for held-out patches: a PNG grid and PSNR / SSIM / CRPS / timing per task."""
    pipe = VariationalFlowMapPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    x = heldout_patches(args.num_heldout, args.resolution, seed=10_000 + args.seed)
    results = {}
    for index, task in enumerate(TASKS):
        result = evaluate_inverse_problem(
            pipeline_sampler(pipe), x, task, args.measurement_sigma, args.num_draws, seed=args.seed + 100 * index
        )
        results[task] = result.metrics()
        result.grid().save(out / f"vfm_{task}.png")
    return results


def compare_priors(maps: dict[str, Path], out: Path, resolution: int, seed: int, num_images: int = 256) -> dict:
    """Unconditional one-step samples of each flow map against held-out patches (MMD; 0 for two held-out sets) and
    ``vfm_prior.png``: a row of held-out patches, then a row per map. Shows what joint training did to the prior."""
    x = heldout_patches(num_images, resolution, seed=30_000 + seed)
    reference = heldout_patches(num_images, resolution, seed=30_001 + seed)
    rows, scores = [x[:16]], {"heldout": float(mmd(reference.flatten(1), x.flatten(1)))}
    for name, folder in maps.items():
        samples = unconditional_samples(
            FlowMapTransformer2DModel.from_pretrained(folder, use_safetensors=True), num_images, seed
        )
        scores[name] = float(mmd(samples.flatten(1), x.flatten(1)))
        rows.append(samples[:16])
    tiles = [to_pil(image) for row in rows for image in row]
    image_grid(tiles, rows=len(rows), cols=16, scale=4, gap=2).save(out / "vfm_prior.png")
    return {"mmd_to_heldout": scores}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.pafm_steps, args.meanflow_steps, args.vfm_steps, args.num_patches = 4, 4, 4, 64
        args.num_heldout, args.num_draws = 2, 2
    out = Path(args.output_dir)
    runs = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print("1/4 PAFM on digits")
    pafm_folder = train_pafm(args, runs / "pafm-digits")
    sample_pafm(pafm_folder, out, args.seed)
    print("2/4 MeanFlow flow map and joint VFM on natural-image patches")
    vfm_folder = train_vfm(
        runs,
        meanflow_steps=args.meanflow_steps,
        vfm_steps=args.vfm_steps,
        resolution=args.resolution,
        num_patches=args.num_patches,
        measurement_sigma=args.measurement_sigma,
        seed=args.seed,
    )
    print("3/4 one-step inverse problems on held-out patches")
    inverse = solve_inverse_problems(vfm_folder, out, args)
    prior = compare_priors(
        {"meanflow_map": runs / "flowmap-patches" / "transformer", "joint_map": vfm_folder / "transformer"},
        out,
        args.resolution,
        args.seed,
    )

    print("4/4 metrics and model cards")
    log = [json.loads(line) for line in (pafm_folder / "train_log.jsonl").read_text().splitlines()]
    cards = out / "model_cards"
    cards.mkdir(exist_ok=True)
    shutil.copyfile(pafm_folder / "README.md", cards / "pafm-digits.md")
    shutil.copyfile(vfm_folder / "README.md", cards / "vfm-patches.md")
    metrics = {
        "pafm": {
            "steps": len(log),
            "mean_ess": float(np.mean([r["ess"] for r in log])),
            "final_loss": float(np.mean([r["loss"] for r in log[-50:]])),
        },
        "vfm": {**inverse, "prior": prior},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    written = sorted(str(p.relative_to(out)) for p in out.iterdir() if p.name != "runs") + ["runs/"]
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}/: " + ", ".join(written))
    return metrics


def cli() -> None:
    """The ``diffusers-pafm-demo`` console script (``main`` returns the metrics, which ``sys.exit`` would print)."""
    main()


if __name__ == "__main__":
    cli()
