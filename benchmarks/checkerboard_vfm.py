#!/usr/bin/env python
"""VFM on the 2-D checkerboard (the paper's toy): observe x1 with noise sigma = 0.1, sample p(x | y) in one step.

    python benchmarks/checkerboard_vfm.py --output_dir checkerboard_out

1. MeanFlow-trains a two-time MLP flow map u(x, t, r) on a 4 x 4 checkerboard on [-2, 2]^2, then keeps training
   it for ``--distill_steps`` steps with a one-step self-distillation term
   (:class:`diffusers_pafm.OneStepDistillation`: the one-step map regressed onto the map's own
   ``--distill_teacher_steps``-step samples; it lifts the one-step support from about 0.82 to 0.92).
   ``--pretrained_flow_map flow_map_meanflow/`` reuses the map of an earlier run instead of this step.
2. Joint VFM: an MLP noise adapter q(z | y) and the flow map, L = L_MF/(2 tau^2) + |y - x1(f(z))|^2/(2 sigma^2) + KL
   (terms summed over dimensions: the per-sample negative ELBO; the MeanFlow term on adapter noise with probability
   ``--alpha``, ``--vfm_r_neq_t`` of its pairs with r != t), plus ``--consistency_weight`` w x a one-step
   self-consistency term ||z - u(z, 1, 0) - sg[x_K(z)]||^2, z ~ q(z | y) on ``--consistency_batch`` rows, whose
   teacher x_K is the current map run for ``--consistency_steps`` steps (the coupling may move; the one-step map is
   asked to follow it). ``--post_distill_steps N`` then distils the joint map's one-step corner onto its own K-step
   samples for N steps (adapter frozen; fixed pairs from adapter noise and from N(0, I)).
3. Baselines on the step-1 map, frozen: the adapter alone (amortised VI with a fixed generator), and DPS-style
   guided sampling (:func:`diffusers_pafm.dps_sample`, ``--dps_steps`` model calls with gradients per draw, for each
   guidance scale in ``--dps_scales`` (empty: skipped), on the first ``--dps_num_test`` test observations).
4. Evaluates each on B test pairs with J draws each: NLPD (fresh observation), CRPS, support accuracy of
   posterior and prior (unconditional samples), MMD to exact posterior samples (x1 by rejection from
   N(y, sigma^2) restricted to [-2, 2], x2 uniform on the filled cells of x1's column), MMD of the prior to data.

Writes ``samples.npz`` (joint VFM), ``samples_adapter_only.npz`` and ``samples_dps.npz`` (best scale by CRPS;
arrays y [B, 1], x_true [B, 2], samples [B, J, 2], prior [N, 2]), ``metrics.json`` (with seconds per draw),
``checkerboard.png`` (prior and posterior densities, a row per method) and the models (``flow_map_meanflow/``,
``flow_map_vfm/``, ``noise_adapter_vfm/``, ``noise_adapter_adapter_only/``; ``from_pretrained`` folders).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_pafm import (
    BatchCandidates,
    FlowMapModel,
    MeanFlowLoss,
    Measurement,
    OneStepDistillation,
    PosteriorEstimator,
    TwoTimeSampler,
    VFMLoss,
    dps_sample,
    sample_flow_map,
)
from diffusers_pafm.evaluation import checkerboard_support, crps, mmd, nlpd, sample_checkerboard
from diffusers_pafm.flow_maps import MatrixOperator, one_step_distillation_loss, stop_gradient
from diffusers_pafm.models import MLPFlowMapModel, MLPNoiseAdapterModel

OBSERVE_X1 = MatrixOperator(torch.tensor([[1.0, 0.0]]), "observe_x1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="checkerboard_out")
    parser.add_argument(
        "--pretrained_flow_map", default=None, help="a flow_map_meanflow/ folder of an earlier run: skips step 1"
    )
    parser.add_argument("--meanflow_steps", type=int, default=8000)
    parser.add_argument(
        "--distill_steps", type=int, default=2000, help="MeanFlow + one-step self-distillation steps after MeanFlow"
    )
    parser.add_argument("--distill_teacher_steps", type=int, default=16, help="K of the teacher samples x_K(z)")
    parser.add_argument("--distill_pairs", type=int, default=20000, help="fixed teacher pairs (z, x_K(z))")
    parser.add_argument("--distill_weight", type=float, default=1.0, help="weight of the distillation term")
    parser.add_argument(
        "--consistency_weight", type=float, default=1.0, help="joint VFM: weight of the one-step self-consistency term"
    )
    parser.add_argument("--consistency_steps", type=int, default=16, help="K of its (current-map) teacher samples")
    parser.add_argument(
        "--consistency_batch", type=int, default=128, help="rows of the batch that get the term (0: all)"
    )
    parser.add_argument("--vfm_steps", type=int, default=3000)
    parser.add_argument(
        "--post_distill_steps",
        type=int,
        default=3000,
        help="after the joint stage: one-step distillation of the joint map onto its own samples (0: skip)",
    )
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--flow_map_width", type=int, default=512, help="the official toy map: 6 x 512 SiLU")
    parser.add_argument("--flow_map_layers", type=int, default=6)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="share of adapter noise in the joint MeanFlow term")
    parser.add_argument("--num_test", type=int, default=1000, help="B test observations")
    parser.add_argument("--num_draws", type=int, default=100, help="J posterior draws per observation")
    parser.add_argument("--num_prior", type=int, default=10000, help="N unconditional one-step samples")
    parser.add_argument("--r_neq_t", type=float, default=0.5, help="fraction of MeanFlow pairs with r != t")
    parser.add_argument(
        "--vfm_r_neq_t",
        type=float,
        default=0.1,
        help="the same for the joint stage's MeanFlow term (mostly flow matching, as in the official toy code)",
    )
    parser.add_argument("--flow_map_lr_scale", type=float, default=0.2, help="flow-map lr / adapter lr in VFM")
    parser.add_argument("--dps_steps", type=int, default=100, help="guided Euler steps of the DPS baseline")
    parser.add_argument(
        "--dps_scales",
        default="0.1",
        help="DPS guidance scales zeta, comma-separated (all are reported; the README's grid: 0.03,0.1,0.3,1)",
    )
    parser.add_argument("--dps_num_test", type=int, default=100, help="test observations for DPS (costly)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--joint_posterior",
        action="store_true",
        help="also run the joint stage with the posterior velocity (global batch) in its MeanFlow term, paired",
    )
    return parser.parse_args(argv)


def train(loss_step, params, steps: int, lr: float, desc: str) -> list[float]:
    """AdamW (``params``: tensors or parameter groups with their own lr), cosine decay, clipping at 1."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    with tqdm(range(steps), desc=desc, mininterval=1.0) as bar:
        for _ in bar:
            loss, shown = loss_step()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss))
            bar.set_postfix(shown, refresh=False)
    return losses


def exact_posterior(y: torch.Tensor, n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """n exact draws of p(x | y) per row of y [B, 1] (rejection for x1, then x2 uniform on the column's cells)."""
    x1 = torch.empty(y.shape[0], n)
    todo = torch.ones_like(x1, dtype=torch.bool)
    while todo.any():
        proposal = y + sigma * torch.randn(x1.shape, generator=generator)
        accept = todo & (proposal.abs() < 2)
        x1[accept] = proposal[accept]
        todo &= ~accept
    column = ((x1 + 2) / 4 * 4).floor().clamp(0, 3)
    row = 2 * torch.randint(2, x1.shape, generator=generator) + column % 2  # filled rows of the column: i + j even
    x2 = (row + torch.rand(x1.shape, generator=generator)) - 2.0
    return torch.stack([x1, x2], -1)


def prior_sampler(model: FlowMapModel, steps: int):
    """Unconditional draws: z ~ N(0, I) through ``steps`` flow-map steps."""

    def prior(n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_flow_map(model, torch.randn(n, 2, generator=generator), steps)

    return prior


def vfm_sampler(flow_map, adapter, steps: int = 1):
    """Posterior draws x = f(z), z ~ q(z | y), with ``steps`` flow-map steps; prior draws from z ~ N(0, I)."""
    model = FlowMapModel(flow_map)

    def posterior(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return sample_flow_map(model, adapter(y).sample(generator), steps)

    return posterior, prior_sampler(model, steps)


def dps_sampler(flow_map, steps: int, scale: float):
    """DPS-style guided draws on the flow map's velocity u(x, t, t); prior: ``steps`` flow-map steps."""
    model = FlowMapModel(flow_map)

    def posterior(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(len(y), 2, generator=generator)
        return dps_sample(model, OBSERVE_X1, y, noise, num_inference_steps=steps, guidance_scale=scale)

    return posterior, prior_sampler(model, steps)


@torch.no_grad()
def evaluate(sampler, args, generator: torch.Generator, num_test: int | None = None) -> tuple[dict, dict]:
    """Metrics of ``sampler`` = (posterior(y, gen), prior(n, gen)) on ``num_test`` (default B) test pairs."""
    sample_posterior, sample_prior = sampler
    b, j, sigma = num_test or args.num_test, args.num_draws, args.sigma
    x_true = sample_checkerboard(b, generator)
    y = x_true[:, :1] + sigma * torch.randn(b, 1, generator=generator)
    start = time.perf_counter()
    samples = sample_posterior(y.repeat_interleave(j, 0), generator).reshape(b, j, 2)
    seconds_per_draw = (time.perf_counter() - start) / (b * j)
    prior = sample_prior(args.num_prior, generator)
    y_fresh = x_true[:, :1] + sigma * torch.randn(b, 1, generator=generator)
    exact = exact_posterior(y, j, sigma, generator)
    data = sample_checkerboard(4000, generator)
    metrics = {
        "nlpd": float(nlpd(y_fresh, samples[..., :1], sigma).mean()),
        "crps": float(crps(samples, x_true).mean()),
        "support_posterior": float(checkerboard_support(samples)),
        "support_prior": float(checkerboard_support(prior)),
        "mmd_posterior": float(torch.stack([mmd(samples[i], exact[i]) for i in range(b)]).mean()),
        "mmd_prior": float(mmd(prior[:4000], data)),
        "support_exact_posterior": float(checkerboard_support(exact)),
        "seconds_per_draw": seconds_per_draw,
        "num_test": b,
    }
    arrays = {"y": y.numpy(), "x_true": x_true.numpy(), "samples": samples.numpy(), "prior": prior.numpy()}
    return metrics, arrays


def train_flow_map(args, gen: torch.Generator) -> MLPFlowMapModel:
    """1. MeanFlow (uniform (t, r), ``--r_neq_t`` of pairs with r != t, adaptive weighting); 2. MeanFlow plus the
    one-step self-distillation term on fixed pairs (z, x_K(z)) drawn from the step-1 map."""
    flow_map = MLPFlowMapModel(dim=2, hidden_dim=args.flow_map_width, num_layers=args.flow_map_layers)
    meanflow = MeanFlowLoss(TwoTimeSampler(scheme="uniform", r_neq_t=args.r_neq_t))

    def meanflow_step():
        result = meanflow(FlowMapModel(flow_map), sample_checkerboard(args.batch_size, gen), generator=gen)
        return result.loss, {"mse": f"{float(result.mse):.3f}"}

    train(meanflow_step, list(flow_map.parameters()), args.meanflow_steps, args.learning_rate, "MeanFlow flow map")
    if args.distill_steps:
        noise = torch.randn(args.distill_pairs, 2, generator=gen)
        distill_one_step(flow_map, noise, args, gen, args.distill_steps, "distillation", meanflow_step)
    return flow_map


def distill_one_step(flow_map, noise, args, gen, steps: int, desc: str, extra_step=None) -> None:
    """Train the one-step map on fixed pairs (z, x_K(z)) of its own ``--distill_teacher_steps``-step samples
    (:class:`diffusers_pafm.OneStepDistillation`), weight ``--distill_weight``, plus ``extra_step``'s loss if given."""
    teacher = OneStepDistillation.from_model(FlowMapModel(flow_map), noise, args.distill_teacher_steps)

    def distill_step():
        loss, shown = extra_step() if extra_step is not None else (0.0, {})
        one_step = teacher.loss(FlowMapModel(flow_map), args.batch_size, gen)
        return loss + args.distill_weight * one_step, {**shown, "one_step": f"{float(one_step):.4f}"}

    train(distill_step, list(flow_map.parameters()), steps, args.learning_rate * 0.3, desc)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()

    if args.pretrained_flow_map:
        flow_map = MLPFlowMapModel.from_pretrained(args.pretrained_flow_map)
    else:
        flow_map = train_flow_map(args, gen)
    frozen = MLPFlowMapModel.from_config(flow_map.config)
    frozen.load_state_dict(flow_map.state_dict())
    frozen.requires_grad_(False)
    frozen.save_pretrained(out / "flow_map_meanflow")

    # 2. joint VFM and 3. adapter-only baseline against the frozen map
    results = {}
    variants = [("vfm", True, False)]
    if args.joint_posterior:  # the same joint stage from the same map, with the posterior velocity in L_MF
        variants.append(("vfm_posterior", True, True))
    for name, joint, posterior in [*variants, ("adapter_only", False, False)]:
        torch.manual_seed(args.seed + 1)
        if args.joint_posterior:  # paired: every variant sees the same data, noise and times
            gen = torch.Generator().manual_seed(args.seed + 7)
        model = flow_map if joint and not posterior else frozen
        if posterior:
            model = MLPFlowMapModel.from_config(frozen.config)
            model.load_state_dict(frozen.state_dict())
        adapter = MLPNoiseAdapterModel(observation_dim=1, latent_dim=2, hidden_dim=256, num_layers=4)
        loss_fn = VFMLoss(
            sigma=args.sigma,
            tau=args.tau,
            alpha=args.alpha,
            adapter_only=not joint,
            reduction="sum",  # the negative ELBO per sample, as the official checkerboard code (KL summed over 2)
            meanflow=MeanFlowLoss(
                TwoTimeSampler(scheme="uniform", r_neq_t=args.vfm_r_neq_t),
                adaptive_power=0.0,
                posterior=PosteriorEstimator(BatchCandidates()) if posterior else None,
            ),
        )

        def vfm_step(model=model, adapter=adapter, loss_fn=loss_fn, gen=gen, joint=joint):
            x = sample_checkerboard(args.batch_size, gen)
            measurement = Measurement.simulate(x, torch.zeros(len(x), dtype=torch.long), [OBSERVE_X1], args.sigma, gen)
            y = measurement.groups[0][2]
            result = loss_fn(
                FlowMapModel(model),
                lambda obs, task: adapter(obs),
                x,
                measurement,
                y,
                target_model=stop_gradient(model),
                generator=gen,
            )
            shown = {"obs": f"{float(result.logged['observation']):.4f}", "kl": f"{float(result.kl):.3f}"}
            if not joint or not args.consistency_weight:
                return result.loss, shown
            # one-step self-consistency on adapter noise, teacher = the current map run for K steps (no gradient)
            with torch.no_grad():
                z = adapter(y[: args.consistency_batch or None]).sample(gen)
                teacher = sample_flow_map(FlowMapModel(model), z, args.consistency_steps)
            consistency = one_step_distillation_loss(FlowMapModel(model), z, teacher)
            return result.loss + args.consistency_weight * consistency, shown

        lr = args.learning_rate * 0.5
        groups = [{"params": list(adapter.parameters()), "lr": lr}]
        if joint:
            groups.append({"params": list(model.parameters()), "lr": lr * args.flow_map_lr_scale})
        train(vfm_step, groups, args.vfm_steps, lr, f"{name} training")
        if joint and args.post_distill_steps:
            # 2b. the joint map's one-step corner onto its own K-step samples, adapter frozen: pairs from adapter
            # noise of fresh observations and from N(0, I) (posterior and prior draws both take one step)
            before, _ = evaluate(vfm_sampler(model, adapter), args, test_generator(args))
            results[f"{name}_before_post_distillation"] = before
            with torch.no_grad():
                x = sample_checkerboard(args.distill_pairs, gen)
                y = x[:, :1] + args.sigma * torch.randn(len(x), 1, generator=gen)
                noise = torch.cat([adapter(y).sample(gen), torch.randn(args.distill_pairs, 2, generator=gen)])
            distill_one_step(model, noise, args, gen, args.post_distill_steps, "post-joint distillation")
        metrics, arrays = evaluate(vfm_sampler(model, adapter), args, test_generator(args))
        metrics4, _ = evaluate(vfm_sampler(model, adapter, steps=4), args, test_generator(args))
        results[name] = {"one_step": metrics, "four_steps": metrics4}
        np.savez(out / ("samples.npz" if name == "vfm" else f"samples_{name}.npz"), **arrays)
        adapter.save_pretrained(out / f"noise_adapter_{name}")
        if joint:
            model.save_pretrained(out / ("flow_map_vfm" if name == "vfm" else f"flow_map_{name}"))
        print(name, json.dumps(metrics))

    # 4. DPS-style guided sampling on the frozen step-1 map (the same prior as adapter-only), per guidance scale
    results["dps"] = {}
    best = None
    for scale in (float(s) for s in args.dps_scales.split(",") if s):
        sampler = dps_sampler(frozen, args.dps_steps, scale)
        metrics, arrays = evaluate(sampler, args, test_generator(args), num_test=args.dps_num_test)
        results["dps"][f"zeta={scale:g}"] = metrics
        print(f"dps zeta={scale:g}", json.dumps(metrics))
        if best is None or metrics["crps"] < best[0]:
            best = (metrics["crps"], arrays)
    if best is not None:
        np.savez(out / "samples_dps.npz", **best[1])

    results["paper_adapter_only_one_step"] = {
        "nlpd": -0.456,
        "crps": 0.769,
        "support_posterior": 0.898,
        "mmd_posterior": 0.307,
        "support_prior": 0.868,
    }
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["config"] = vars(args)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    plot(out)
    print(json.dumps({k: results[k] for k in ("vfm", "adapter_only", "dps", "seconds")}))
    return results


def test_generator(args) -> torch.Generator:
    """The same test observations (and the same first ``dps_num_test`` of them) for every method."""
    return torch.Generator().manual_seed(args.seed + 1000)


def plot(out: Path) -> None:
    """Density images on [-2.5, 2.5]^2: rows joint VFM / adapter-only / DPS, columns prior / posterior (6 y's)."""
    from PIL import Image

    panels = []
    names = [n for n in ("samples.npz", "samples_adapter_only.npz", "samples_dps.npz") if (out / n).exists()]
    for name in names:
        data = np.load(out / name)
        for points in (data["prior"], data["samples"][:6].reshape(-1, 2)):
            counts, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=128, range=[[-2.5, 2.5], [-2.5, 2.5]])
            density = np.sqrt(counts[::-1] / max(counts.max(), 1))  # y up; sqrt to show the tails
            panels.append(Image.fromarray((255 * (1 - density)).astype(np.uint8)).resize((256, 256), Image.NEAREST))
    grid = Image.new("L", (516, 260 * len(names) - 4), 128)
    for i, im in enumerate(panels):
        grid.paste(im, ((i % 2) * 260, (i // 2) * 260))
    grid.save(out / "checkerboard.png")


if __name__ == "__main__":
    main()
