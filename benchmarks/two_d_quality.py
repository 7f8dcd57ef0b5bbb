#!/usr/bin/env python
"""2-D quality: FM vs STF vs PAFM at equal steps and seeds, against the exact marginal velocity of a finite dataset.

Datasets: two moons (scikit-learn, noise 0.05, scaled to about [-2, 2]) and the 4 x 4 checkerboard, each a fixed
training set of ``--num_data`` points, so the exact marginal velocity is the posterior velocity over *all* of them
(``posterior_velocity`` at temperature 1). Model: MLP (x, t) -> v, 3 x 256 SiLU, AdamW, ``--steps`` at batch
``--batch_size``. Objectives (presets of ``PAFMLoss``):

* ``fm``: conditional target eps - x;
* ``stf``: posterior over the batch (no condition);
* ``pafm``: posterior over each sample's ``--knn_k`` nearest training neighbours (faiss kNN bank).

Metrics per run: MSE of the learned field to the exact marginal velocity on fresh x_t (t on a grid, averaged),
fraction of 100-step Euler samples off the support (checkerboard: outside the filled cells; moons: farther than 0.1
from every training point), MMD to the data. Mean +- s.e. over ``--seeds``. Writes
``benchmarks/results/two_d_quality_cpu.{json,png}``.

    python benchmarks/two_d_quality.py
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusers_pafm import FlowBatch, build_knn_bank, make_loss, posterior_velocity
from diffusers_pafm.evaluation import checkerboard_support, mmd, sample_checkerboard, summarize_runs, write_results

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fm", "stf", "pafm")


class MLPVelocity(torch.nn.Module):
    """v(x_t, t) for 2-D points; ignores conditioning (unconditional data)."""

    def __init__(self, width: int = 256, layers: int = 3):
        super().__init__()
        dims = [3] + [width] * layers
        blocks = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [torch.nn.Linear(a, b), torch.nn.SiLU()]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 2))

    def forward(self, x_t, t, class_labels=None, **unused):
        return self.net(torch.cat([x_t, t[:, None].to(x_t.dtype)], dim=1))


def dataset(name: str, n: int, seed: int) -> torch.Tensor:
    if name == "checkerboard":
        return sample_checkerboard(n, torch.Generator().manual_seed(seed))
    from sklearn.datasets import make_moons

    points, _ = make_moons(n, noise=0.05, random_state=seed)
    return torch.tensor((points - [0.5, 0.25]) * 1.6, dtype=torch.float32)


@torch.no_grad()
def euler_samples(model, n: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 2, generator=gen)
    for i in range(steps):
        t = 1 - i / steps
        x = x - model(x, torch.full((n,), t)) / steps
    return x


@torch.no_grad()
def velocity_error(model, data: torch.Tensor, gen: torch.Generator, n: int = 2000) -> float:
    """mean over t in {0.1, ..., 0.9} of E ||v_theta(x_t, t) - v*(x_t, t)||^2, v* the exact marginal velocity."""
    errors = []
    for t_value in np.linspace(0.1, 0.9, 9):
        x = data[torch.randint(0, len(data), (n,), generator=gen)]
        t = torch.full((n,), float(t_value))
        x_t = (1 - t_value) * x + t_value * torch.randn(x.shape, generator=gen)
        exact = posterior_velocity(x_t, t, data).velocity
        errors.append(float(((model(x_t, t) - exact) ** 2).sum(1).mean()))
    return float(np.mean(errors))


def off_support(name: str, samples: torch.Tensor, data: torch.Tensor) -> float:
    if name == "checkerboard":
        return 1 - float(checkerboard_support(samples))
    return float((torch.cdist(samples, data).min(1).values > 0.1).float().mean())


def train_and_score(name, data, method, seed, args, knn_folder) -> dict:
    torch.manual_seed(seed)
    model = MLPVelocity()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    if method == "pafm":
        loss_fn = make_loss("pafm", candidates="knn", condition_likelihood="none", knn_bank=knn_folder)
    else:
        loss_fn = make_loss(method)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        ids = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        out = loss_fn(model, FlowBatch(x=data[ids], sample_ids=ids), generator=gen)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        scheduler.step()
    samples = euler_samples(model, args.num_samples, 100, gen)
    return {
        "velocity_mse": velocity_error(model, data, gen),
        "off_support": off_support(name, samples, data),
        "mmd": float(mmd(samples, data[: args.num_samples])),
        "samples": samples,
    }


def plot(samples: dict, path: Path, size: int = 200, columns: tuple[str, ...] = METHODS) -> None:
    """One panel per (dataset, column): a 2-D histogram of the first seed's samples on [-2.5, 2.5]^2."""
    names = list(samples)
    sheet = Image.new("L", (size * len(columns), size * len(names)), 255)
    for row, name in enumerate(names):
        for col, method in enumerate(columns):
            points = samples[name][method].numpy()
            hist, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size // 2, range=[[-2.5, 2.5]] * 2)
            panel = 255 - np.clip(hist[::-1] / max(hist.max() / 3, 1) * 255, 0, 255).astype(np.uint8)
            sheet.paste(Image.fromarray(panel).resize((size, size), Image.NEAREST), (col * size, row * size))
            ImageDraw.Draw(sheet).text((col * size + 4, row * size + 4), f"{name} {method}", fill=0)
    sheet.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="moons,checkerboard")
    parser.add_argument("--num_data", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--knn_k", type=int, default=32)
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    results, first_samples = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            data = dataset(name, args.num_data, 1234)
            knn_folder = build_knn_bank(Path(tmp) / name, data, k=args.knn_k)
            results[name], first_samples[name] = {}, {}
            for method in METHODS:
                runs = [train_and_score(name, data, method, seed, args, knn_folder) for seed in seeds]
                first_samples[name][method] = runs[0].pop("samples")
                summary = summarize_runs(runs, ("velocity_mse", "off_support", "mmd"))
                for metric, stats in summary.items():
                    stats["runs"] = [run[metric] for run in runs]
                results[name][method] = summary
                print(name, method, json.dumps({k: round(v["mean"], 4) for k, v in summary.items()}), flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "two_d_quality_cpu", results, vars(args), start)
    plot(first_samples, out / "two_d_quality_cpu.png")


if __name__ == "__main__":
    main()
