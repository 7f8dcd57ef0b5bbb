#!/usr/bin/env python
"""Gradient variance of flow matching vs PAFM, per time t, on class-conditional digits (16 x 16).

A tiny class-conditional diffusers DiT is first trained briefly with plain FM (``--train_steps``), then frozen. For
each t on a grid and each of ``--repeats`` independent minibatches (batch ``--batch_size``, data and noise shared by
the methods), we compute the gradient of

* FM:   mean ||v_theta(x_t, t, c) - (eps - x)||^2
* PAFM: mean ||v_theta(x_t, t, c) - v_post(x_t, t, c)||^2, v_post the self-normalised posterior velocity over
  candidates = every training digit of class c (the exact same-class posterior at temperature 1); its gradient
  equals the gradient of PAFM's weighted sum of per-candidate losses.
* PAFM with a tuned temperature: per-row temperature raising the ESS to ``--target_ess`` (biased, lower variance).

and report tr Cov[g] (sum over parameters of the across-minibatch variance), the ratio FM / PAFM, the mean ESS and
how far each mean gradient lies from FM's (relative; PAFM at temperature 1 is unbiased). Writes
``benchmarks/results/gradient_variance_cpu.{json,png}`` (or ``--output_dir``).

    python benchmarks/gradient_variance.py
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffusers_pafm import FlowBatch, VelocityModel, build_dit, make_loss, posterior_velocity
from diffusers_pafm.data import load_digits_tensors
from diffusers_pafm.evaluation import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def flat_grad(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


def plot(results: dict, path: Path, size=(640, 400), margin=50) -> None:
    """log10 tr Cov[g] against t for each method (a dependency-free PIL line plot)."""
    colors = {"fm": (200, 60, 60), "pafm": (40, 90, 200), "pafm_tuned": (40, 160, 80)}
    times = results["t"]
    curves = {name: [math.log10(v) for v in results[f"variance_{name}"]] for name in colors}
    lo, hi = min(min(c) for c in curves.values()), max(max(c) for c in curves.values())
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def xy(t, v):  # noqa: E306
        return margin + (t - times[0]) / (times[-1] - times[0]) * w, margin + (hi - v) / max(hi - lo, 1e-9) * h

    draw.rectangle([margin, margin, margin + w, margin + h], outline="black")
    for name, color in colors.items():
        draw.line([xy(t, v) for t, v in zip(times, curves[name])], fill=color, width=3)
        draw.text((margin + 10, margin + 10 + 14 * list(colors).index(name)), name, fill=color)
    for t in times:
        draw.text((xy(t, lo)[0] - 8, margin + h + 6), f"{t:.1f}", fill="black")
    draw.text((4, margin - 20), f"log10 tr Cov[grad]: top {hi:.2f}, bottom {lo:.2f}; x: t", fill="black")
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_steps", type=int, default=400, help="FM pre-training of the model that is measured")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=48, help="independent minibatches per t")
    parser.add_argument("--times", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--target_ess", type=float, default=16.0, help="ESS of the tuned-temperature variant")
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    x_all, labels_all = load_digits_tensors(16)
    model_module = build_dit(args.model_size, 1, 16, 10)
    model = VelocityModel(model_module)
    optimizer = torch.optim.AdamW(model_module.parameters(), lr=1e-3)
    fm = make_loss("fm", num_classes=10)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.train_steps):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        loss = fm(model, FlowBatch(x=x_all[idx], class_labels=labels_all[idx]), generator=gen).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model_module.eval()

    candidates = x_all  # [N, 1, 16, 16]; the class mask below keeps the same-class ones
    results = {"t": [float(t) for t in args.times.split(",")]}
    for key in ("variance_fm", "variance_pafm", "variance_pafm_tuned", "ratio_fm_over_pafm", "ratio_fm_over_tuned"):
        results[key] = []
    for key in ("ess_pafm", "ess_pafm_tuned", "mean_grad_offset_pafm", "mean_grad_offset_tuned"):
        results[key] = []
    for t_value in results["t"]:
        grads = {"fm": [], "pafm": [], "pafm_tuned": []}
        ess = {"pafm": [], "pafm_tuned": []}
        for _ in range(args.repeats):
            idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
            x, labels = x_all[idx], labels_all[idx]
            noise = torch.randn(x.shape, generator=gen)
            t = torch.full((len(x),), t_value)
            x_t = (1 - t_value) * x + t_value * noise
            log_condition = torch.where(labels[:, None] == labels_all[None], 0.0, float("-inf"))
            targets = {"fm": noise - x}
            exact = posterior_velocity(x_t, t, candidates, log_condition)
            tuned = posterior_velocity(x_t, t, candidates, log_condition, target_ess=args.target_ess)
            targets["pafm"], targets["pafm_tuned"] = exact.velocity, tuned.velocity
            ess["pafm"].append(exact.ess.mean().item())
            ess["pafm_tuned"].append(tuned.ess.mean().item())
            prediction = model(x_t, t, class_labels=labels)
            for name, target in targets.items():
                loss = ((prediction - target) ** 2).mean()
                grads[name].append(flat_grad(model_module, loss))
        stats = {}
        for name, values in grads.items():
            g = torch.stack(values).double()
            stats[name] = (g.var(0).sum().item(), g.mean(0))
        fm_mean = stats["fm"][1]
        results["variance_fm"].append(stats["fm"][0])
        results["variance_pafm"].append(stats["pafm"][0])
        results["variance_pafm_tuned"].append(stats["pafm_tuned"][0])
        results["ratio_fm_over_pafm"].append(stats["fm"][0] / stats["pafm"][0])
        results["ratio_fm_over_tuned"].append(stats["fm"][0] / stats["pafm_tuned"][0])
        results["ess_pafm"].append(sum(ess["pafm"]) / len(ess["pafm"]))
        results["ess_pafm_tuned"].append(sum(ess["pafm_tuned"]) / len(ess["pafm_tuned"]))
        for name, key in (("pafm", "mean_grad_offset_pafm"), ("pafm_tuned", "mean_grad_offset_tuned")):
            results[key].append(((stats[name][1] - fm_mean).norm() / fm_mean.norm()).item())
        print(
            f"t={t_value:.2f}  tr Cov FM {stats['fm'][0]:.4g}  PAFM {stats['pafm'][0]:.4g}  "
            f"ratio {results['ratio_fm_over_pafm'][-1]:.2f}  ESS {results['ess_pafm'][-1]:.1f}  "
            f"tuned ratio {results['ratio_fm_over_tuned'][-1]:.2f}",
            flush=True,
        )
    band = [r for t, r in zip(results["t"], results["ratio_fm_over_pafm"]) if 0.5 <= t <= 0.9]
    results["min_ratio_t_0.5_to_0.9"] = min(band) if band else None
    results["goal_ratio_at_least_2_met"] = bool(band) and min(band) >= 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "gradient_variance_cpu", results, vars(args), start)
    plot(results, out / "gradient_variance_cpu.png")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main()
