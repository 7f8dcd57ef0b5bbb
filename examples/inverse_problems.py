#!/usr/bin/env python
"""One-step inverse problems with a saved Variational Flow Map pipeline (local folder or Hub repo id).

    python examples/inverse_problems.py --pipeline demo_output/runs/vfm-patches --image photo.png \
        --task box_inpaint --num_samples 4 --output inpainted.png

Degrades ``--image`` with the task's operator (seeded; observation noise ``--sigma``), then draws
``--num_samples`` posterior samples in one forward pass each and writes a row: observation | samples | original.
Without ``--image`` a crop of a scikit-image photograph is used.
"""

import argparse

import torch
from PIL import Image

from diffusers_pafm import VariationalFlowMapPipeline, build_operator
from diffusers_pafm.data import image_to_tensor, make_patches
from diffusers_pafm.evaluation import psnr
from diffusers_pafm.utils import image_grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder or Hub repo id of a VariationalFlowMapPipeline")
    parser.add_argument("--task", default=None, help="one of the pipeline's tasks (default: its first)")
    parser.add_argument("--image", default=None)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--sigma", type=float, default=0.05, help="observation noise on the [-1, 1] scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="inverse_problem.png")
    args = parser.parse_args(argv)

    pipe = VariationalFlowMapPipeline.from_pretrained(args.pipeline)
    task = args.task or pipe.config.tasks[0]
    size, channels = pipe.noise_adapter.config.sample_size, pipe.noise_adapter.config.in_channels
    image = Image.open(args.image) if args.image else make_patches(1, resolution=size, seed=args.seed)[0][0]
    x = image_to_tensor(image, size, channels)[None]
    generator = torch.Generator().manual_seed(args.seed)
    degrade = build_operator(task, x.shape, generator)
    y = degrade(x)
    y = y + args.sigma * torch.randn(y.shape, generator=generator)
    samples = pipe(
        y,
        degrade,  # the operator itself (its mask, kernel, ...); a task name works for deterministic ones
        num_images_per_prompt=args.num_samples,
        observation_range=(-1, 1),
        generator=generator,
        output_type="pt",
    ).images
    print(f"{task}: PSNR of the sample mean {float(psnr(samples.mean(0, keepdim=True) * 2 - 1, x)[0]):.2f} dB")
    to_pil = pipe.image_processor.postprocess
    view = (degrade.pseudo_inverse(y).clamp(-1, 1) + 1) / 2
    row = to_pil(view, output_type="pil", do_denormalize=[False]) + to_pil(
        samples, output_type="pil", do_denormalize=[False] * len(samples)
    )
    row += to_pil((x + 1) / 2, output_type="pil", do_denormalize=[False])
    image_grid(row, rows=1, cols=len(row), scale=4).save(args.output)
    print(f"wrote {args.output}: observation | {args.num_samples} samples | original")


if __name__ == "__main__":
    main()
