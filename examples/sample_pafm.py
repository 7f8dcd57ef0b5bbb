#!/usr/bin/env python
"""Sample a PAFM-trained pipeline (local folder or Hub repo id): class labels or, for text models, prompts.

python examples/sample_pafm.py --pipeline demo_output/runs/pafm-digits --class_labels 0 1 2 3 --output digits.png
python examples/sample_pafm.py --pipeline pafm-shapes --prompt "a red circle" --output circle.png
"""

import argparse

import torch

from diffusers_pafm import FlowMatchingPipeline
from diffusers_pafm.utils import image_grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--class_labels", type=int, nargs="*", default=None)
    parser.add_argument("--prompt", nargs="*", default=None)
    parser.add_argument("--lora", default=None, help="a LoRA folder written by train_pafm.py --lora_rank")
    parser.add_argument("--num_images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="samples.png")
    args = parser.parse_args(argv)
    if (args.class_labels is None) == (args.prompt is None):
        parser.error("give exactly one of --class_labels and --prompt")

    pipe = FlowMatchingPipeline.from_pretrained(args.pipeline)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    condition = {"class_labels": args.class_labels} if args.prompt is None else {"prompt": args.prompt}
    images = pipe(
        **condition,
        num_images_per_prompt=args.num_images_per_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    rows = len(args.class_labels or args.prompt)
    image_grid(images, rows=rows, cols=args.num_images_per_prompt, scale=4).save(args.output)
    print(f"wrote {args.output}: {rows} rows x {args.num_images_per_prompt} samples")


if __name__ == "__main__":
    main()
