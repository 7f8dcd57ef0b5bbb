#!/usr/bin/env python
"""What moves the flow map off its prior in joint VFM training (issue 20, item 5), on the exact Gaussian reference.

1. The reference of ``vfm_gaussian_calibration.py`` (N(m, C) fitted to 3 x 8 x 8 photograph crops) and a MeanFlow
   map trained on samples of it through ``train_vfm.py`` (or ``--flow_map`` to reuse one).
2. One joint stage per lever setting, all from that map with the same data and seeds: the defaults, per-row MeanFlow
   weights (``--meanflow_adaptive_power 1``), the paper's stop-gradient observation term
   (``--observation_trains_flow_map false``) and alpha (the share of MeanFlow rows on adapter noise). Each logs the
   map's prior drift every ``--every`` steps (``prior_drift.jsonl``: the spread of its unconditional one-step samples
   over the starting map's, same noise).
3. For each final adapter, the spectrum of the aggregate of its noise over many observations (a calibrated adapter
   aggregates to N(0, I): eigenvalues 1). The joint map learns to decode that aggregate, so directions where it is
   wider than 1 are the directions the map contracts for fresh noise.
4. Which MeanFlow rows pull the map (when the defaults run): for the defaults' final adapter against the starting
   map, the first-order change of the map's sample second moment S = E||f(eps) - m||^2 under one gradient step on
   each group of rows (adapter or fresh noise, r = t or r != t), with plain and with per-row adaptive weights
   (negative: the group contracts).

Writes ``benchmarks/results/vfm_prior_drift_cpu.{json,png}`` (the picture: spread ratio against steps per setting).

    python benchmarks/vfm_prior_drift.py
"""

import argparse
import json
import time
from pathlib import Path

import torch
from common import train_vfm_stage
from PIL import Image, ImageDraw
from vfm_gaussian_calibration import RESULTS, TASKS, reference, save_samples

from diffusers_pafm import (
    EncodedDataset,
    FlowMapModel,
    FlowMapTransformer2DModel,
    MeanFlowLoss,
    Measurement,
    NoiseAdapterModel,
    TwoTimeSampler,
)
from diffusers_pafm.evaluation import write_results
from diffusers_pafm.flow_maps import one_step
from diffusers_pafm.paths import sample_path

SETTINGS = {  # name -> options beside the defaults (observation term into the map, plain MeanFlow rows, alpha 0.8)
    "defaults": {},
    "per-row weights (the earlier default)": {"meanflow_adaptive_power": 1.0},
    "alpha 0: the observation term alone": {"alpha": 0.0},
    "stop-gradient observation term (the paper)": {"observation_trains_flow_map": False},
    "stop-gradient, per-row weights": {"observation_trains_flow_map": False, "meanflow_adaptive_power": 1.0},
    "stop-gradient, alpha 0.5": {"observation_trains_flow_map": False, "alpha": 0.5},
    "stop-gradient, alpha 1": {"observation_trains_flow_map": False, "alpha": 1.0},
    "stop-gradient, alpha 0 (fresh noise only)": {"observation_trains_flow_map": False, "alpha": 0.0},
}
COLORS = [
    (0, 0, 0),
    (200, 60, 60),
    (150, 20, 20),
    (40, 90, 200),
    (120, 60, 200),
    (40, 160, 80),
    (230, 140, 0),
    (120, 120, 120),
]


def observations(data: Path, num: int, seed: int):
    """``num`` training samples (at most all of them) with a random task each, their measurement and the adapter's
    input A^+ y."""
    dataset = EncodedDataset.load(data)
    num = min(num, len(dataset))
    x = torch.stack([torch.as_tensor(dataset[i]["x"]) for i in range(num)]).float()
    generator = torch.Generator().manual_seed(seed)
    task_ids = torch.randint(len(TASKS), (num,), generator=generator)
    measurement = Measurement.simulate(x, task_ids, list(TASKS), 0.05, generator)
    return x, task_ids, measurement.pseudo_inverse(x), generator


@torch.no_grad()
def aggregate_spectrum(folder: Path, data: Path, seed: int) -> dict:
    """Eigenvalues of the covariance of adapter noise z ~ q(z | y) over 2048 observations (N(0, I): all 1)."""
    adapter = NoiseAdapterModel.from_pretrained(folder, subfolder="noise_adapter", use_safetensors=True).eval()
    _, task_ids, view, generator = observations(data, 2048, seed)
    z = adapter(view, task_ids).sample(generator).flatten(1).double()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0)
    return {
        "top5": [round(float(v), 3) for v in eigenvalues[:5]],
        "median": float(eigenvalues.median()),
        "mean": float(eigenvalues.mean()),
    }


def pull_on_the_prior(flow_map_folder: Path, adapter_folder: Path, data: Path, seed: int) -> dict:
    """-grad S . grad L_group per group of MeanFlow rows (docstring, step 4), S the map's sample second moment."""
    flow_map = FlowMapTransformer2DModel.from_pretrained(flow_map_folder, subfolder="transformer")
    adapter = NoiseAdapterModel.from_pretrained(adapter_folder, subfolder="noise_adapter").eval()
    u, params = FlowMapModel(flow_map), [p for p in flow_map.parameters() if p.requires_grad]
    x, task_ids, view, generator = observations(data, 1024, seed)
    batch = x.shape[0]
    null = torch.full((batch,), flow_map.config.num_embeds_ada_norm)
    fresh_eps = torch.randn(x.shape, generator=generator)
    samples = one_step(u, fresh_eps, null)
    second_moment = (samples - x.mean(0)).pow(2).flatten(1).sum(1).mean()
    grad_s = torch.autograd.grad(second_moment, params)
    with torch.no_grad():
        adapter_noise = adapter(view, task_ids).sample(generator)
    sampler = TwoTimeSampler(scheme="uniform", r_neq_t=0.5)
    t, r = sampler(batch, generator)
    loss = MeanFlowLoss(sampler, adaptive_power=1.0)
    pulls = {}
    for noise_name, noise in (
        ("adapter noise", adapter_noise),
        ("fresh noise", torch.randn(x.shape, generator=generator)),
    ):
        path = sample_path(x, noise, t)
        target = loss.target(u, path.x_t, t, r, path.velocity, null)
        rows = (u(path.x_t, t, r, null).float() - target).pow(2).flatten(1).mean(1)
        for weighting, weights in (("plain", torch.ones_like(rows)), ("per-row", loss.weight(rows))):
            for times, chosen in (("r = t", t == r), ("r != t", t != r)):
                group = (weights * rows)[chosen].sum() / batch
                grad = torch.autograd.grad(group, params, retain_graph=True)
                pulls[f"{noise_name}, {times}, {weighting}"] = -float(sum((a * b).sum() for a, b in zip(grad_s, grad)))
    return pulls


def plot(traces: dict, path: Path, size=(720, 440), margin=60) -> None:
    """Spread ratio against steps per setting (a dependency-free PIL line plot); the band [0.8, 1.25] shaded."""
    steps = sorted({s for trace in traces.values() for s, _ in trace})
    top = max(1.3, max(v for trace in traces.values() for _, v in trace))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def xy(step, value):  # noqa: E306
        return margin + step / steps[-1] * w, margin + (top - value) / top * h

    draw.rectangle([xy(0, 1.25), xy(steps[-1], 0.8)], fill=(235, 235, 235))
    draw.rectangle([margin, margin, margin + w, margin + h], outline="black")
    for (name, trace), color in zip(traces.items(), COLORS):
        draw.line([xy(s, v) for s, v in trace], fill=color, width=3)
        draw.text((margin + 10, margin + 6 + 13 * list(traces).index(name)), name, fill=color)
    for value in (0.25, 0.5, 0.75, 1.0, 1.25):
        draw.text((8, xy(0, value)[1] - 6), f"{value:.2f}", fill="black")
    for step in steps[:: max(len(steps) // 6, 1)]:
        draw.text((xy(step, 0)[0] - 10, margin + h + 6), str(step), fill="black")
    draw.text((margin, 10), "spread of the joint map's own samples / the starting map's (shaded: kept)", fill="black")
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow_map", default=None, help="a MeanFlow map folder to start from (default: train one)")
    parser.add_argument("--meanflow_steps", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=600, help="joint steps per setting")
    parser.add_argument("--every", type=int, default=100, help="prior drift logged every N steps")
    parser.add_argument("--num_train", type=int, default=16384)
    parser.add_argument("--settings", default=None, help="comma list of setting numbers (0-7, SETTINGS order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--runs_dir", default="benchmark_runs/vfm_prior_drift")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out, runs = Path(args.output_dir), Path(args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)

    prior = reference(8192, 8, args.seed)
    data = save_samples(prior, args.num_train, args.seed, runs / "data")
    common = {"dataset": str(data), "seed": args.seed}
    flow_map = Path(args.flow_map or train_vfm_stage("meanflow", runs / "flowmap", args.meanflow_steps, **common))
    joint = {"pretrained_model_name_or_path": str(flow_map), "tasks": ",".join(TASKS), "validation_steps": args.every}
    chosen = [int(i) for i in args.settings.split(",")] if args.settings else range(len(SETTINGS))
    results = {"settings": {}}
    for index, (name, options) in enumerate(SETTINGS.items()):
        if index not in chosen:
            continue
        folder = train_vfm_stage("vfm", runs / f"setting{index}", args.steps, **common, **joint, **options)
        drift = [json.loads(line) for line in (folder / "prior_drift.jsonl").read_text().splitlines()]
        results["settings"][name] = {
            "options": options,
            "prior_drift": drift,
            "adapter_aggregate_eigenvalues": aggregate_spectrum(folder, data, args.seed),
        }
        print(name, json.dumps(results["settings"][name]["prior_drift"][-1]), flush=True)
    if 0 in chosen:  # the defaults' adapter
        results["pull_on_the_prior"] = pull_on_the_prior(flow_map, runs / "setting0", data, args.seed)
    traces = {
        name: [(0, 1.0)] + [(d["step"], d["prior_spread_ratio"]) for d in setting["prior_drift"]]
        for name, setting in results["settings"].items()
    }
    plot(traces, out / "vfm_prior_drift_cpu.png")
    write_results(out, "vfm_prior_drift_cpu", results, vars(args), start)


if __name__ == "__main__":
    main()
