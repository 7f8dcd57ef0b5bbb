"""Shared by the quality benchmarks (image_quality.py, text_quality.py): one training recipe for every method compared
(equal compute), then the exported pipeline reloaded as a user would and sampled."""

from pathlib import Path

import torch

from diffusers_pafm import FlowMatchingPipeline, PAFMTrainer, PAFMTrainingConfig

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
