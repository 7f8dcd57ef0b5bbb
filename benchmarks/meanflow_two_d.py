#!/usr/bin/env python
"""One-step 2-D quality: plain MeanFlow vs posterior MeanFlow, same steps, seeds, data and noise (paired).

Datasets (``two_d_quality.py``): two moons and the 4 x 4 checkerboard, a fixed training set of ``--num_data``
points each, so the exact marginal flow is known: its one-step map x0*(z) is integrated with ``--exact_steps`` Euler
steps of the exact marginal velocity (the posterior velocity over *all* training points at temperature 1). Model:
``MLPFlowMapModel`` u(x_t, t, r), trained with ``MeanFlowLoss`` (adaptive weighting, (t, r) uniform with
``--r_neq_t`` of the pairs r != t, as the checkerboard VFM benchmark's map) and either the
conditional velocity (``meanflow``) or the posterior velocity over the global batch (``posterior``, the STF-style
candidates; exchangeable, so the sum form is unbiased). Metrics of one-step samples f(z) = z - u(z, 1, 0): MMD to
the data, fraction off the support, and the mean squared error of f(z) against x0*(z) on the same noise. Mean +- s.e.
over ``--seeds`` and the paired difference. Writes ``benchmarks/results/meanflow_two_d_cpu.{json,png}``.

    python benchmarks/meanflow_two_d.py
"""

import argparse
import time
from pathlib import Path

import torch
from two_d_quality import dataset, off_support, plot

from diffusers_pafm import (
    BatchCandidates,
    FlowBatch,
    FlowMapModel,
    MeanFlowLoss,
    MLPFlowMapModel,
    NoCondition,
    PosteriorEstimator,
    TwoTimeSampler,
    one_step,
    posterior_velocity,
)
from diffusers_pafm.evaluation import mmd, summarize_runs, write_results

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("meanflow", "posterior")
KEYS = ("one_step_mse", "mmd", "off_support")


@torch.no_grad()
def exact_one_step(noise: torch.Tensor, data: torch.Tensor, steps: int) -> torch.Tensor:
    """x0*(z): Euler integration of the exact marginal velocity from t = 1 to 0."""
    x = noise.clone()
    for i in range(steps):
        t = 1 - i / steps
        x = x - posterior_velocity(x, torch.full((len(x),), t), data).velocity / steps
    return x


def train(data: torch.Tensor, method: str, seed: int, args) -> MLPFlowMapModel:
    torch.manual_seed(seed)
    model = MLPFlowMapModel(dim=2, hidden_dim=args.width, num_layers=args.layers)
    posterior = PosteriorEstimator(BatchCandidates(), NoCondition()) if method == "posterior" else None
    loss_fn = MeanFlowLoss(TwoTimeSampler(scheme="uniform", r_neq_t=args.r_neq_t), posterior=posterior)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    u = FlowMapModel(model)
    gen = torch.Generator().manual_seed(seed)  # the same batches, noise and times for both methods
    for _ in range(args.steps):
        ids = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        x = data[ids]
        t, r = loss_fn.time_sampler(len(x), gen)
        noise = torch.randn(x.shape, generator=gen)
        out = loss_fn(u, x, noise=noise, t=t, r=r, batch=FlowBatch(x=x, sample_ids=ids))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="moons,checkerboard")
    parser.add_argument("--num_data", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--r_neq_t", type=float, default=0.5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--exact_steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    results, first_samples = {}, {}
    for name in args.datasets.split(","):
        data = dataset(name, args.num_data, seed=0)
        noise = torch.randn(args.num_samples, 2, generator=torch.Generator().manual_seed(12345))
        exact = exact_one_step(noise, data, args.exact_steps)
        runs = {method: [] for method in METHODS}
        first_samples[name] = {"exact": exact}
        for seed in seeds:
            for method in METHODS:
                model = train(data, method, seed, args)
                with torch.no_grad():
                    samples = one_step(FlowMapModel(model), noise)
                runs[method].append(
                    {
                        "one_step_mse": float(((samples - exact) ** 2).sum(1).mean()),
                        "mmd": float(mmd(samples, data[: args.num_samples])),
                        "off_support": off_support(name, samples, data),
                    }
                )
                if seed == seeds[0]:
                    first_samples[name][method] = samples
            print(name, seed, {m: runs[m][-1] for m in METHODS}, flush=True)
        paired = [
            {k: b[k] - a[k] for k in KEYS} for a, b in zip(runs["meanflow"], runs["posterior"])
        ]  # posterior - plain: negative is better for every metric
        results[name] = {
            "exact_off_support": off_support(name, exact, data),
            "exact_mmd": float(mmd(exact, data[: args.num_samples])),
            **{method: summarize_runs(runs[method], KEYS) for method in METHODS},
            "posterior_minus_meanflow": summarize_runs(paired, KEYS),
            "runs": runs,
        }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "meanflow_two_d_cpu", results, vars(args), start)
    plot(first_samples, out / "meanflow_two_d_cpu.png", columns=(*METHODS, "exact"))
    for name in args.datasets.split(","):
        d = results[name]["posterior_minus_meanflow"]
        print(name, {k: f"{d[k]['mean']:+.4f} +- {d[k]['se']:.4f}" for k in KEYS})


if __name__ == "__main__":
    main()
