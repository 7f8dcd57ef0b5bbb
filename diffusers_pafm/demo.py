"""`make demo`: train a tiny class-conditional diffusers DiT with PAFM on scikit-learn digits (CPU, ~2 minutes).

Writes to ``--output_dir``: ``train_log.jsonl`` (one JSON line per step), ``pipeline/`` (``save_pretrained``),
``samples.png`` (one row per digit class, sampled from the reloaded pipeline) and ``data.png`` (real digits).
Also available as the console script ``diffusers-pafm-demo``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from .candidates import FlowBatch
from .data import load_digits_tensors
from .models import build_dit
from .pipelines import FlowMatchingPipeline
from .presets import make_loss
from .trainers.engine import image_grid
from .velocity_model import VelocityModel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--max_train_steps", type=int, default=500)
    parser.add_argument("--max_train_seconds", type=float, default=120.0, help="stop training after this long")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--objective", default="pafm", help="fm, stf, efm, stablevm or pafm")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_tensors(16)
    transformer = build_dit("tiny", in_channels=1, sample_size=16, num_classes=10)  # ~1 M parameters
    transformer.train()
    model = VelocityModel(transformer)
    loss_fn = make_loss(args.objective, num_classes=10, sample_shape=(1, 16, 16), class_dropout=0.1)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate, weight_decay=0.0)
    ema = EMAModel(transformer.parameters(), decay=0.999, use_ema_warmup=True)

    log_path = out / "train_log.jsonl"
    start = time.perf_counter()
    with (
        log_path.open("w") as log,
        tqdm(range(args.max_train_steps), desc=f"train {args.objective}", mininterval=1.0) as bar,
    ):
        for step in bar:
            idx = torch.randint(0, len(images), (args.train_batch_size,), generator=generator)
            result = loss_fn(model, FlowBatch(x=images[idx], class_labels=labels[idx]), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            ema.step(transformer.parameters())
            scalars = result.scalars()
            elapsed = time.perf_counter() - start
            record = {"step": step + 1, **{k: scalars[k] for k in ("loss", "fm_loss", "ess", "self_weight")}}
            log.write(json.dumps({**record, "seconds": round(elapsed, 3)}) + "\n")
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", ess=f"{scalars['ess']:.2f}", refresh=False)
            if elapsed > args.max_train_seconds:
                break

    ema.copy_to(transformer.parameters())
    transformer.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    FlowMatchingPipeline(transformer=transformer, scheduler=scheduler).save_pretrained(out / "pipeline")
    pipe = FlowMatchingPipeline.from_pretrained(out / "pipeline")
    samples = pipe(
        class_labels=list(range(10)),
        num_images_per_prompt=8,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    # pipeline output is class-major (8 per class); lay it out one row per class
    image_grid(samples, rows=10, cols=8, scale=4).save(out / "samples.png")
    real = [Image.fromarray(((im[0] + 1) * 127.5).round().byte().numpy(), mode="L") for im in images[:80]]
    image_grid(real, rows=10, cols=8, scale=4).save(out / "data.png")

    summary = {
        "objective": args.objective,
        "steps": step + 1,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": scalars["loss"],
        "written": sorted(str(p.relative_to(out)) for p in out.iterdir()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
