#!/usr/bin/env python
"""When is the "sum" form of a posterior-weighted loss an unbiased estimate of the plain loss? Monte Carlo, exactly.

Data: 64 points in 2-D from 4 classes (fixed), each with a CLIP-like image embedding and a noisy text embedding of
it. Model: a fixed small MLP v_theta(x_t, t) (or u_theta(x_t, t, r) for MeanFlow). For each case and each of
``--reps`` independent minibatches (``--batch_size`` rows drawn with replacement, fresh noise and times), the paired
difference of the sum-form loss and the plain loss (FM, or MeanFlow with the conditional velocity) is recorded, in
value and in gradient (projected on three fixed random directions of parameter space). The table gives the mean
difference with its standard error and the largest |z| of the gradient projections.

Theory (``docs/pafm.md``): with the own endpoint plus candidates exchangeable with it (global batch, EFM ring buffer,
class bank with the class-match likelihood) at temperature 1, the expected difference is exactly 0 in value and
gradient; kNN candidates, the CLIP term (its normaliser over z is dropped), T != 1 and ``target_ess`` are biased.
``tests/test_unbiasedness.py`` checks the unbiased cases (within 3 standard errors) and that kNN's bias is detected.

    python benchmarks/unbiasedness.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from diffusers_pafm import (
    FlowBatch,
    MeanFlowLoss,
    PosteriorEstimator,
    TwoTimeSampler,
    build_knn_bank,
    make_loss,
    make_posterior,
)
from diffusers_pafm.evaluation import environment

RESULTS = Path(__file__).resolve().parent / "results"
NUM_POINTS, NUM_CLASSES, DIM, EMBED = 64, 4, 2, 8

PAFM_CASES = {
    "batch, none": {"candidates": "batch", "condition_likelihood": "none"},
    "batch, class": {"candidates": "batch", "condition_likelihood": "class"},
    "efm ring buffer, none": {"preset": "efm", "efm_extra_samples": 16},
    "class bank, class": {"candidates": "class_bank", "condition_likelihood": "class", "bank_size": 8},
    "knn, none": {"candidates": "knn", "condition_likelihood": "none", "knn_k": 4},
    "batch, clip": {"candidates": "batch", "condition_likelihood": "clip", "clip_temperature": 0.1},
    "batch, none, T = 2": {"candidates": "batch", "condition_likelihood": "none", "temperature": 2.0},
    "batch, none, target_ess 4": {"candidates": "batch", "condition_likelihood": "none", "target_ess": 4.0},
}
MEANFLOW_CASES = {"meanflow: batch, none": {"candidates": "batch", "condition_likelihood": "none"}}
UNBIASED = {"batch, none", "batch, class", "efm ring buffer, none", "class bank, class", "meanflow: batch, none"}


def toy_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """64 points in 2-D around 4 class centres, unit-norm image embeddings and noisy text embeddings of them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_POINTS) % NUM_CLASSES
    centres = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    x = centres[labels] + 0.35 * torch.randn(NUM_POINTS, DIM, generator=g)
    image = nn.functional.normalize(torch.randn(NUM_POINTS, EMBED, generator=g), dim=1)
    text = nn.functional.normalize(image + 0.5 * torch.randn(NUM_POINTS, EMBED, generator=g), dim=1)
    return {"x": x, "labels": labels, "image": image, "text": text}


class ToyVelocity(nn.Module):
    """v_theta(x_t, t) or, with ``two_times``, u_theta(x_t, t, r): a fixed random MLP."""

    def __init__(self, two_times: bool = False, width: int = 32, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(DIM + 1 + two_times, width), nn.SiLU(), nn.Linear(width, DIM))

    def forward(self, x_t, t, r=None, class_labels=None, **_):
        times = [t[:, None]] if r is None else [t[:, None], r[:, None]]
        return self.net(torch.cat([x_t, *times], dim=1))


def _flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def measure(case: str, reps: int = 2000, batch_size: int = 8, seed: int = 0) -> dict[str, float]:
    """Mean and standard error of (sum-form loss - plain loss) over ``reps`` minibatches, and the largest |z| of its
    gradient along three fixed random directions."""
    data = toy_data()
    meanflow = case in MEANFLOW_CASES
    options = dict((MEANFLOW_CASES if meanflow else PAFM_CASES)[case])
    preset = options.pop("preset", "pafm")
    model = ToyVelocity(two_times=meanflow)
    with tempfile.TemporaryDirectory() as tmp:
        if options.get("candidates") == "knn":
            options["knn_bank"] = build_knn_bank(Path(tmp) / "knn", data["x"].numpy(), k=options["knn_k"])
        loss_options = {k: options.pop(k) for k in ("temperature", "target_ess") if k in options}
        common = {"num_classes": NUM_CLASSES, "sample_shape": (DIM,), **options}
        if meanflow:
            candidates, likelihood = make_posterior(preset, **common)
            posterior = PosteriorEstimator(candidates, likelihood, **loss_options)
            sampler = TwoTimeSampler(r_neq_t=1.0)
            summed = MeanFlowLoss(sampler, adaptive_power=0.0, posterior=posterior, form="sum")
            plain = MeanFlowLoss(sampler, adaptive_power=0.0)
        else:
            summed = make_loss(preset, form="sum", **common, **loss_options)
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=g)
        directions = directions / directions.norm(dim=1, keepdim=True)
        values, projections = [], []
        for _ in range(reps):
            ids = torch.randint(NUM_POINTS, (batch_size,), generator=g)
            batch = FlowBatch(
                x=data["x"][ids],
                class_labels=data["labels"][ids],
                text_embeds=data["text"][ids],
                image_embeds=data["image"][ids],
                sample_ids=ids,
            )
            noise = torch.randn(batch_size, DIM, generator=g)
            if meanflow:
                t, r = sampler(batch_size, g)
                kwargs = {"noise": noise, "t": t, "r": r, "generator": g}
                out = summed(model, batch.x, batch=batch, **kwargs)
                reference = plain(model, batch.x, **kwargs).loss
            else:
                t = torch.rand(batch_size, generator=g).clamp(0.02, 0.98)
                out = summed(model, batch, t=t, noise=noise)
                x_t = (1 - t[:, None]) * batch.x + t[:, None] * noise
                reference = (model(x_t, t) - (noise - batch.x)).pow(2).mean()
            difference = out.loss - reference
            values.append(float(difference.detach()))
            projections.append(directions @ _flat_grad(model, difference))
    values = torch.tensor(values, dtype=torch.float64)
    projections = torch.stack(projections).double()
    grad_z = projections.mean(0) / (projections.std(0) / reps**0.5)
    return {
        "value_bias": float(values.mean()),
        "value_se": float(values.std() / reps**0.5),
        "grad_max_abs_z": float(grad_z.abs().max()),
        "grad_z": grad_z.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args()
    start = time.time()
    rows = {}
    for case in [*PAFM_CASES, *MEANFLOW_CASES]:
        runs = [measure(case, args.reps, args.batch_size, seed) for seed in range(args.seeds)]
        bias = sum(r["value_bias"] for r in runs) / len(runs)
        se = (sum(r["value_se"] ** 2 for r in runs) ** 0.5) / len(runs)
        rows[case] = {
            "theory": "unbiased" if case in UNBIASED else "biased",
            "value_bias": bias,
            "value_se": se,
            "grad_max_abs_z": max(r["grad_max_abs_z"] for r in runs),
            "seeds": runs,
        }
        print(
            f"{case:28s} {rows[case]['theory']:9s} value {bias:+.4f} +- {se:.4f}  "
            f"gradient max|z| {rows[case]['grad_max_abs_z']:.1f}"
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "cases": rows, "seconds": time.time() - start, "environment": environment()}
    (out / "unbiasedness_cpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'unbiasedness_cpu.json'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
