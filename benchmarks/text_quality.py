#!/usr/bin/env python
"""Text conditioning: FM vs PAFM with caption-as-class vs PAFM with the CLIP likelihood, on captioned shapes (MMDiT).

Each method trains the same tiny text-conditioned ``SD3Transformer2DModel`` with ``PAFMTrainer`` on
``--num_train`` jittered 16 x 16 shapes ("a small red circle at the top left"; same steps, batch, seed, schedule,
EMA) for every seed in ``--seeds``. One tiny CLIP, fitted here on the training shapes, is the text encoder of every
method and the likelihood of ``pafm:clip``; ``pafm:caption`` counts identical captions as one class (the paper's naive
text variant). The exported pipeline is reloaded and draws ``--samples_per_prompt`` images for each of the 96
captions (``--num_inference_steps`` Euler steps, guidance ``--guidance_scale``). Scores:

* Frechet distance against fresh real shapes, in the features of a CNN trained here to read the four attributes
  (size, colour, shape, position; held-out accuracy reported; ``--inception_weights`` switches to FID Inception);
* attribute accuracy: the fraction of samples in which that CNN reads all four attributes of the prompt (and each
  attribute alone);
* CLIP score 100 * cos(text, image) under an evaluation CLIP fitted separately (other draws, other seed): not the
  CLIP that the PAFM likelihood used.

Mean +- standard error over seeds. Writes ``benchmarks/results/text_quality_cpu.{json,png}`` (the PNG: per method a
block of 8 prompts x 6 samples from the first seed, prompts listed in the JSON).

    python benchmarks/text_quality.py
"""

import argparse
import json
import time
from pathlib import Path

import torch
from common import ALL_CAPTIONS, ATTRIBUTE_NAMES, shapes_tensor, train_and_sample

from diffusers_pafm import load_clip
from diffusers_pafm.data import caption_attributes, make_shapes
from diffusers_pafm.evaluation import (
    InceptionFeatures,
    frechet_distance,
    summarize_runs,
    train_feature_classifier,
    write_results,
)
from diffusers_pafm.models import train_tiny_clip
from diffusers_pafm.utils import image_grid, to_pil

RESULTS = Path(__file__).resolve().parent / "results"


def train_and_sample_method(method: str, seed: int, clip_dir: Path, args: argparse.Namespace) -> torch.Tensor:
    """``method`` is an objective preset, optionally with a condition likelihood: ``pafm:clip``."""
    objective, _, condition = method.partition(":")
    sampling = {"prompt": ALL_CAPTIONS, "num_images_per_prompt": args.samples_per_prompt}
    return train_and_sample(
        method,
        seed,
        args,
        sampling,
        dataset="shapes",
        resolution=args.resolution,
        max_train_samples=args.num_train,
        model="sd3",
        model_size="tiny",
        patch_size=args.patch_size,
        clip_model=str(clip_dir),
        objective=objective,
        condition_likelihood=condition or None,
        train_batch_size=args.batch_size,
        validation_steps=0,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="fm,pafm:caption,pafm:clip", help="objective[:condition_likelihood]")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_train", type=int, default=2048, help="training shapes")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--samples_per_prompt", type=int, default=5, help="images for each of the 96 captions")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--clip_steps", type=int, default=400, help="steps of each tiny CLIP (training and eval)")
    parser.add_argument("--feature_steps", type=int, default=800, help="training steps of the attribute CNN")
    parser.add_argument("--inception_weights", help="FID Inception .safetensors: Frechet distance in its features")
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/text_quality", help="where the trained models go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    runs_dir = Path(args.runs_dir)
    res = args.resolution

    # the CLIP every method encodes text with (and PAFM's likelihood), fitted on the seed-0 training shapes
    train_images, train_captions = make_shapes(args.num_train, resolution=res, seed=0)
    clip_dir = train_tiny_clip(train_images, train_captions, runs_dir / "clip_train", args.clip_steps, res, seed=0)
    # evaluation networks: fitted on other draws, shared by every method
    eval_images, eval_captions = make_shapes(4000, resolution=res, seed=101)
    eval_clip = load_clip(train_tiny_clip(eval_images, eval_captions, runs_dir / "clip_eval", args.clip_steps, res, 1))
    cnn_images, cnn_captions = shapes_tensor(4000, res, seed=102)
    net, accuracy = train_feature_classifier(cnn_images, caption_attributes(cnn_captions), steps=args.feature_steps)
    print(f"attribute CNN: held-out accuracy (all four attributes) {accuracy:.3f}", flush=True)
    features = InceptionFeatures(args.inception_weights).features if args.inception_weights else net.features
    real, real_captions = shapes_tensor(2000, res, seed=103)
    with torch.no_grad():
        real_features = features(real)

    def clip_score(images: torch.Tensor, captions: list[str]) -> float:
        image_embeds = eval_clip.encode_image([to_pil(im) for im in images])
        return float(100 * (image_embeds * eval_clip.encode_text(captions)).sum(1).mean())

    prompts = [c for c in ALL_CAPTIONS for _ in range(args.samples_per_prompt)]
    prompt_attributes = caption_attributes(prompts)
    results = {
        "feature_net_accuracy": accuracy,
        "feature_space": "inception_pool3" if args.inception_weights else "attribute_classifier",
        "real_reference": {
            "attribute_accuracy": float(
                (net.predict(real) == caption_attributes(real_captions)).all(1).float().mean()
            ),
            "clip_score": clip_score(real, real_captions),
        },
        "methods": {},
    }
    print("real shapes:", results["real_reference"], flush=True)
    # 8 prompts spread over all four attributes (size, colour, shape, position ids)
    grid = [
        (0, 0, 0, 0),
        (0, 1, 1, 1),
        (0, 2, 2, 2),
        (0, 3, 0, 3),
        (1, 0, 2, 1),
        (1, 1, 0, 2),
        (1, 2, 1, 3),
        (1, 3, 2, 0),
    ]
    blocks, shown = [], [48 * s + 12 * c + 4 * k + p for s, c, k, p in grid]
    for method in args.methods.split(","):
        runs = []
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            samples = train_and_sample_method(method, seed, clip_dir, args)
            with torch.no_grad():
                fd = float(frechet_distance(features(samples), real_features))
            correct = net.predict(samples) == prompt_attributes
            runs.append(
                {
                    "seed": seed,
                    "frechet_distance": fd,
                    "attribute_accuracy": float(correct.all(1).float().mean()),
                    **{
                        f"{name}_accuracy": float(correct[:, j].float().mean())
                        for j, name in enumerate(ATTRIBUTE_NAMES)
                    },
                    "clip_score": clip_score(samples, prompts),
                }
            )
            print(method, runs[-1], flush=True)
            if i == 0:
                per_prompt = samples.view(96, args.samples_per_prompt, 3, res, res)
                blocks.append(per_prompt[shown, : min(6, args.samples_per_prompt)].reshape(-1, 3, res, res))
        summary = summarize_runs(runs, [k for k in runs[0] if k != "seed"])
        results["methods"][method] = {"runs": runs, **summary}
    if "fm" in results["methods"]:
        fm = results["methods"]["fm"]["frechet_distance"]["mean"]
        for scores in results["methods"].values():
            scores["fd_reduction_vs_fm"] = 1 - scores["frechet_distance"]["mean"] / fm
    cols = min(6, args.samples_per_prompt)
    sheet = image_grid(
        [to_pil(tile) for tile in torch.cat(blocks)], rows=len(shown) * len(blocks), cols=cols, scale=4, gap=1
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sheet.save(out / "text_quality_cpu.png")
    results["sheet_prompts"] = [ALL_CAPTIONS[i] for i in shown]
    write_results(out, "text_quality_cpu", results, vars(args), start)
    print(json.dumps({k: v for k, v in results.items() if k != "methods"}))


if __name__ == "__main__":
    main()
