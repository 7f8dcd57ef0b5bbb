#!/usr/bin/env python
"""Reward-tilted one-step generation from a prompt: a CLIP reward on captioned shapes (``--reward_context text``).

1. The shapes data (``--num_train`` jittered 16 x 16 shapes, "a small red circle at the top left"; 96 captions)
   encoded once by ``training/precompute.py`` with a tiny CLIP fitted on it: its caption embeddings are the
   adapter's context and its image-text similarity is the reward.
2. Per seed: ``train_vfm.py --stage meanflow`` (an unconditional map, defaults), then ``--stage reward
   --reward_context text --reward clip:<that CLIP> --beta``.
3. For each of the 96 captions, ``--num_samples`` one-step draws of the tilted pipeline (``pipe(prompt=...)``) and,
   from the same noise, the starting map's unconditional one-step and ``--base_steps``-step samples. Judged by
   networks fitted on other draws of the shapes: an attribute CNN (the fraction of samples showing all four
   attributes of the prompt, and each alone; chance is 1/96) and an evaluation CLIP (100 cos, not the reward's
   CLIP). Fréchet distance in the CNN's features of all draws against fresh real shapes; the export's reward gain
   and prior drift.

Writes ``benchmarks/results/reward_shapes_cpu.json`` and ``.png`` (8 prompts: a row of the start's one-step samples,
then a row of the tilted pipeline's, from the same noise).

    python benchmarks/reward_shapes.py
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ALL_CAPTIONS, ATTRIBUTE_NAMES, ROOT, shapes_tensor, train_vfm_stage

from diffusers_pafm import FlowMapModel, FlowMapTransformer2DModel, RewardTiltedFlowMapPipeline, sample_flow_map
from diffusers_pafm.data import caption_attributes, make_shapes
from diffusers_pafm.evaluation import frechet_distance, summarize_runs, train_feature_classifier, write_results
from diffusers_pafm.models import load_clip, train_tiny_clip
from diffusers_pafm.utils import image_grid, to_pil

RESULTS = ROOT / "benchmarks" / "results"
SHOWN = [0, 13, 26, 39, 52, 65, 78, 91]  # 8 prompts spread over the attributes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--meanflow_steps", type=int, default=2000)
    parser.add_argument("--reward_steps", type=int, default=400)
    parser.add_argument("--beta", type=float, default=0.02)
    parser.add_argument("--base_steps", type=int, default=4)
    parser.add_argument("--num_train", type=int, default=2048)
    parser.add_argument("--num_samples", type=int, default=4, help="draws per caption")
    parser.add_argument("--clip_steps", type=int, default=400, help="steps of each tiny CLIP (reward and eval)")
    parser.add_argument("--feature_steps", type=int, default=800, help="training steps of the attribute CNN")
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/reward_shapes", help="where the trained models go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs_dir, res, n = Path(args.runs_dir), 16, args.num_samples
    encoded = runs_dir / "shapes"
    if not (encoded / "meta.json").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "training" / "precompute.py"), "--dataset", "shapes", "--resolution", str(res)]
            + ["--max_train_samples", str(args.num_train), "--clip_train_steps", str(args.clip_steps)]
            + ["--no_text_encoder", "--output_dir", str(encoded)],
            check=True,
        )
    eval_images, eval_captions = make_shapes(4000, resolution=res, seed=101)
    eval_clip = load_clip(train_tiny_clip(eval_images, eval_captions, runs_dir / "clip_eval", args.clip_steps, res, 1))
    cnn_images, cnn_captions = shapes_tensor(4000, res, seed=102)
    net, cnn_accuracy = train_feature_classifier(
        cnn_images, caption_attributes(cnn_captions), steps=args.feature_steps
    )
    real, _ = shapes_tensor(2000, res, seed=103)
    with torch.no_grad():
        real_features = net.features(real)
    prompts = [c for c in ALL_CAPTIONS for _ in range(n)]
    wanted = caption_attributes(prompts)

    def scores(samples: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            correct = net.predict(samples) == wanted
            fd = float(frechet_distance(net.features(samples).double(), real_features.double()))
            image_embeds = eval_clip.encode_image([to_pil(im) for im in samples])
        return {
            "attribute_accuracy": float(correct.all(1).float().mean()),
            **{f"{name}_accuracy": float(correct[:, j].float().mean()) for j, name in enumerate(ATTRIBUTE_NAMES)},
            "clip_score": float(100 * (image_embeds * eval_clip.encode_text(prompts)).sum(1).mean()),
            "frechet_distance": fd,
        }

    runs, rows = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        seed_dir = runs_dir / f"seed{seed}"
        flow_map = train_vfm_stage(
            "meanflow", seed_dir / "flowmap", args.meanflow_steps, seed, dataset=encoded, model_size="tiny"
        )
        tuned = train_vfm_stage(
            "reward", seed_dir / "reward", args.reward_steps, seed, dataset=encoded, reward_context="text",
            reward=f"clip:{encoded / 'clip'}", beta=args.beta, pretrained_model_name_or_path=flow_map,
            validation_steps=args.reward_steps,
        )  # fmt: skip
        base = FlowMapTransformer2DModel.from_pretrained(flow_map / "transformer", use_safetensors=True).eval()
        noise = torch.randn((len(prompts), 3, res, res), generator=torch.Generator().manual_seed(seed))
        null = torch.full((len(prompts),), base.config.num_embeds_ada_norm)
        with torch.no_grad():
            base_one = sample_flow_map(FlowMapModel(base), noise, 1, class_labels=null).clamp(-1, 1)
            base_multi = sample_flow_map(FlowMapModel(base), noise, args.base_steps, class_labels=null).clamp(-1, 1)
        pipe = RewardTiltedFlowMapPipeline.from_pretrained(tuned)
        pipe.set_progress_bar_config(disable=True)
        tilted = pipe(prompt=ALL_CAPTIONS, num_images_per_prompt=n, noise=noise, output_type="pt").images * 2 - 1
        run = {
            "seed": seed,
            "base_one_step": scores(base_one),
            f"base_{args.base_steps}_steps": scores(base_multi),
            "tilted_one_step": scores(tilted),
            "report": json.loads((tuned / "reward_report.json").read_text()),
        }
        print(json.dumps(run), flush=True)
        runs.append(run)
        if not rows:
            for i in SHOWN:
                rows += [to_pil(x) for x in base_one[i * n : (i + 1) * n]] + [
                    to_pil(x) for x in tilted[i * n : (i + 1) * n]
                ]

    results = {"attribute_cnn_heldout_accuracy": cnn_accuracy, "runs": runs, "summary": {}}
    for name in ("base_one_step", f"base_{args.base_steps}_steps", "tilted_one_step"):
        results["summary"][name] = summarize_runs([r[name] for r in runs], list(runs[0][name]))
    paired = [
        {
            f"{k}_tilted_minus_base_one_step": r["tilted_one_step"][k] - r["base_one_step"][k]
            for k in r["base_one_step"]
        }
        for r in runs
    ]
    results["summary"]["paired"] = summarize_runs(paired, list(paired[0]))
    results["summary"]["report"] = summarize_runs([r["report"] for r in runs], ["reward_gain", "prior_drift_mmd"])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_grid(rows, rows=2 * len(SHOWN), cols=n, scale=4, gap=1).save(out / "reward_shapes_cpu.png")
    results["sheet_prompts"] = [ALL_CAPTIONS[i] for i in SHOWN]
    write_results(out, "reward_shapes_cpu", results, vars(args), start)
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
