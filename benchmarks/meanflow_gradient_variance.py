#!/usr/bin/env python
"""Gradient variance of MeanFlow vs posterior MeanFlow, per time t, on class-conditional digits (16 x 16).

The protocol of ``gradient_variance.py`` with a flow map: a tiny class-conditional flow map is trained briefly with
plain MeanFlow (``--train_steps``), then frozen. For each t on a grid and each of ``--repeats`` independent
minibatches (data, noise and r ~ U(0, t) shared by the methods, so every pair has r != t; ``--r_equal_t``: r = t),
the gradient of

* MeanFlow:           mean ||u_theta(x_t, t, r) - sg[v - (t - r) du/dt]||^2,  v = eps - x
* posterior MeanFlow: the same with v^, the posterior velocity over every training digit of the row's class
  (the exact same-class posterior at temperature 1: ``MeanFlowLoss(posterior=PosteriorEstimator(...))``)

is taken, and tr Cov[g] (sum over parameters of the across-minibatch variance), the ratio, the mean ESS and the
relative offset of the mean gradients are reported. Writes
``benchmarks/results/meanflow_gradient_variance_scale<time_embedding_scale>[_r_equal_t]_cpu.json``.

    python benchmarks/meanflow_gradient_variance.py
"""

import argparse
import json
import time
from pathlib import Path

import torch

from diffusers_pafm import (
    ClassMatch,
    FlowBatch,
    FlowMapModel,
    FlowMapTransformer2DModel,
    MeanFlowLoss,
    PosteriorEstimator,
    TwoTimeSampler,
    build_dit,
)
from diffusers_pafm.data import load_digits_tensors
from diffusers_pafm.evaluation import write_results
from diffusers_pafm.pafm import CandidateSet, CandidateSource

RESULTS = Path(__file__).resolve().parent / "results"


class EveryTrainingPoint(CandidateSource):
    """Every training digit as a candidate (the class-match likelihood keeps the row's class): the exact posterior."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.x, self.labels = x, labels

    def forward(self, batch: FlowBatch) -> CandidateSet:
        return CandidateSet(endpoints=self.x, self_index=batch.sample_ids, labels=self.labels)


def flat_grad(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.flatten() for g in grads])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_steps", type=int, default=300, help="MeanFlow pre-training of the measured map")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=32, help="independent minibatches per t")
    parser.add_argument("--times", default="0.1,0.3,0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument(
        "--time_embedding_scale",
        type=float,
        default=1.0,
        help="the map's time embedders see this x t (1 as MeanFlow; 1000 as diffusers' DiT makes d_t u, and with it "
        "the part of the target that does not depend on v, about 1000x larger)",
    )
    parser.add_argument("--r_equal_t", action="store_true", help="r = t for every pair (the FM case of benchmark 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    x_all, labels_all = load_digits_tensors(16)
    transformer = FlowMapTransformer2DModel.from_flow_matching(
        build_dit(args.model_size, 1, 16, 10), time_embedding_scale=args.time_embedding_scale
    )
    u = FlowMapModel(transformer)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    plain = MeanFlowLoss(TwoTimeSampler(), adaptive_power=1.0)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.train_steps):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        loss = plain(u, x_all[idx], class_labels=labels_all[idx], generator=gen).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformer.eval()

    posterior = PosteriorEstimator(EveryTrainingPoint(x_all, labels_all), ClassMatch(null_class_id=10))
    losses = {
        "meanflow": MeanFlowLoss(adaptive_power=0.0),
        "posterior": MeanFlowLoss(adaptive_power=0.0, posterior=posterior),
    }
    results = {"t": [float(t) for t in args.times.split(",")], "variance_meanflow": [], "variance_posterior": []}
    results.update(ratio=[], ess=[], mean_grad_offset=[])
    for t_value in results["t"]:
        grads = {name: [] for name in losses}
        ess = []
        for _ in range(args.repeats):
            idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
            x, labels = x_all[idx], labels_all[idx]
            noise = torch.randn(x.shape, generator=gen)
            t = torch.full((len(x),), t_value)
            r = t.clone() if args.r_equal_t else t * torch.rand(len(x), generator=gen)
            batch = FlowBatch(x=x, class_labels=labels, sample_ids=idx)
            for name, loss_fn in losses.items():
                out = loss_fn(u, x, noise=noise, t=t, r=r, class_labels=labels, batch=batch)
                grads[name].append(flat_grad(transformer, out.loss))
                if name == "posterior":
                    ess.append(float(out.ess.mean()))
        stats = {}
        for name, values in grads.items():
            g = torch.stack(values).double()
            stats[name] = (g.var(0).sum().item(), g.mean(0))
        results["variance_meanflow"].append(stats["meanflow"][0])
        results["variance_posterior"].append(stats["posterior"][0])
        results["ratio"].append(stats["meanflow"][0] / stats["posterior"][0])
        results["ess"].append(sum(ess) / len(ess))
        offset = (stats["posterior"][1] - stats["meanflow"][1]).norm() / stats["meanflow"][1].norm()
        results["mean_grad_offset"].append(offset.item())
        print(
            f"t={t_value:.2f}  tr Cov MeanFlow {stats['meanflow'][0]:.4g}  posterior {stats['posterior'][0]:.4g}  "
            f"ratio {results['ratio'][-1]:.2f}  ESS {results['ess'][-1]:.1f}  mean offset {offset:.3f}",
            flush=True,
        )
    band = [r for t, r in zip(results["t"], results["ratio"]) if t >= 0.7]
    results["min_ratio_t_at_least_0.7"] = min(band) if band else None
    results["goal_ratio_at_least_2_met"] = bool(band) and min(band) >= 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_scale{args.time_embedding_scale:g}" + ("_r_equal_t" if args.r_equal_t else "")
    write_results(out, f"meanflow_gradient_variance{suffix}_cpu", results, vars(args), start)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main()
