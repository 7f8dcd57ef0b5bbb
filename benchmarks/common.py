"""Shared by the quality benchmarks (image_quality.py, text_quality.py): one training recipe for every method compared
(equal compute), then the exported pipeline reloaded as a user would and sampled; and by the reward benchmarks
(reward_digits.py, reward_shapes.py): a ``train_vfm.py`` stage run as a user runs it."""

import itertools
import subprocess
import sys
from pathlib import Path

import torch

from diffusers_pafm import FlowMatchingPipeline, PAFMTrainer, PAFMTrainingConfig
from diffusers_pafm.data import SHAPE_ATTRIBUTES, image_to_tensor, make_shapes

ROOT = Path(__file__).resolve().parent.parent
ALL_CAPTIONS = [f"a {s} {c} {k} at the {p}" for s, c, k, p in itertools.product(*SHAPE_ATTRIBUTES)]
"""the 96 captions of the shapes data"""
ATTRIBUTE_NAMES = ("size", "color", "shape", "position")

RECIPE = {
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "use_ema": True,
    "ema_decay": 0.999,
    "checkpoints_total_limit": 1,
    "report_to": "none",
}


def train_and_sample(method: str, seed: int, args, sampling: dict, **config) -> torch.Tensor:
    """Train ``PAFMTrainingConfig(**config)`` with :data:`RECIPE` for ``args.steps`` into
    ``args.runs_dir/<method>-seed<seed>``, reload the export and return ``pipe(**sampling)`` images in [-1, 1] drawn
    with ``args.num_inference_steps`` Euler steps at ``args.guidance_scale`` (generator seeded with 1000 + seed)."""
    output_dir = Path(args.runs_dir) / f"{method.replace(':', '-')}-seed{seed}"
    config = PAFMTrainingConfig(
        output_dir=str(output_dir),
        max_train_steps=args.steps,
        checkpointing_steps=args.steps,
        seed=seed,
        **RECIPE,
        **config,
    )
    pipe = FlowMatchingPipeline.from_pretrained(PAFMTrainer(config).train().export_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        **sampling,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(1000 + seed),
        output_type="pt",
    ).images
    return images * 2 - 1  # "pt" output is in [0, 1]


def train_vfm_stage(stage: str, output_dir: Path, steps: int, seed: int, **options) -> Path:
    """``training/train_vfm.py --stage <stage>`` with ``options`` as ``--key value`` flags; returns ``output_dir``."""
    argv = [sys.executable, str(ROOT / "training" / "train_vfm.py"), "--stage", stage, "--output_dir", str(output_dir)]
    options = {"max_train_steps": steps, "seed": seed, "report_to": "none", **options}
    options.setdefault("checkpointing_steps", steps)
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    subprocess.run(argv, check=True)
    return output_dir


def shapes_tensor(num: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``num`` drawn shapes as a [num, 3, H, W] tensor in [-1, 1], and their captions."""
    images, captions = make_shapes(num, resolution=resolution, seed=seed)
    return torch.stack([image_to_tensor(im, resolution, 3) for im in images]), captions
