#!/usr/bin/env python
"""Reward-tilted one-step generation on the 2-D checkerboard against exact tilted samples, and the beta trade-off.

Data p(x): the 4 x 4 checkerboard on [-2, 2]^2. Two contexts with smooth rewards R(x, c) = -|x - a_c|^2 / 2:
a_0 = (0, 0), the corner that two filled cells share (the tilted target is bimodal), and a_1 = (1.5, -1.5), the
centre of an empty cell (its mass moves to the edges of the filled neighbours). The exact target
p_beta(x | c) ~ p(x) exp(R(x, c) / beta) is sampled by rejection from the data (accept with exp(R / beta), R <= 0).

Per seed a MeanFlow MLP flow map (``--meanflow_steps``); then, per beta and seed, one-step draws of:

* ``untuned``: the map from N(0, I) (what doing nothing draws);
* ``vfm``: what ``RewardTrainer`` does: a ``ContextNoiseAdapterModel`` with ``VFMLoss`` + ``RewardTerm``, the
  MeanFlow term on fresh noise training the map, the reward's gradient through a stop-gradient copy of it;
* ``vfm_reward_trains_map``: the same with the reward's gradient reaching the map (``target_model`` = the trained
  map; what ``--reward_trains_flow_map`` did before it was removed on this measurement);
* ``guided_100_steps``: :func:`diffusers_pafm.reward_guided_sample` on the (untuned) map's velocity, 100 steps.

Reported per method (mean over the two contexts, then mean ± s.e. over seeds): MMD to exact tilted samples, the
share of draws on the data's support, the mean reward, and for the VFM rows KL(q || N(0, I)) and the prior drift
(MMD of the tuned map's N(0, I) one-step draws to the data, against the untuned map's). The exact target's own
reward and KL(p_beta || p) = E[R] / beta - log E_p[exp(R / beta)] give the best trade-off possible: the plot
``reward_checkerboard_tradeoff_cpu.png`` draws reward against KL over ``--tradeoff_betas`` for the exact target and
VFM (its KL(q || N(0, I)) bounds the KL of its draws to the map's prior from above). Writes
``benchmarks/results/reward_checkerboard_cpu.json``, ``reward_checkerboard_cpu.png`` (densities: rows beta, columns
exact | untuned | vfm | vfm_reward_trains_map | guided) and the trade-off plot.

    python benchmarks/reward_checkerboard.py
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from diffusers_pafm import (
    ContextNoiseAdapterModel,
    FlowMapModel,
    MeanFlowLoss,
    MLPFlowMapModel,
    RewardTerm,
    TwoTimeSampler,
    VFMLoss,
    one_step,
    reward_guided_sample,
    stop_gradient,
)
from diffusers_pafm.evaluation import checkerboard_support, mmd, sample_checkerboard, summarize_runs, write_results
from diffusers_pafm.utils import density_image

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = torch.tensor([[0.0, 0.0], [1.5, -1.5]])
TUNED = ("vfm", "vfm_reward_trains_map")
METHODS = ("untuned", *TUNED, "guided_100_steps")


def reward(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return -0.5 * (x - TARGETS.to(x.device)[context]).pow(2).sum(1)


def exact_tilted(beta: float, n: int, context: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """n exact draws of p_beta(x | c) by rejection from the data, and log E_p[exp(R / beta)] (for the KL)."""
    kept, log_means = [], []
    labels = torch.full((65536,), context)
    while sum(len(k) for k in kept) < n:
        x = sample_checkerboard(65536, generator)
        log_w = reward(x, labels) / beta
        log_means.append(torch.logsumexp(log_w.double(), 0) - math.log(len(x)))
        kept.append(x[torch.rand(len(x), generator=generator) < log_w.exp()])
    log_z = float(torch.logsumexp(torch.stack(log_means), 0) - math.log(len(log_means)))
    return torch.cat(kept)[:n], log_z


def train_meanflow(seed: int, steps: int, batch: int, width: int, layers: int) -> MLPFlowMapModel:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    flow_map = MLPFlowMapModel(dim=2, hidden_dim=width, num_layers=layers)
    loss_fn = MeanFlowLoss(TwoTimeSampler(scheme="uniform", r_neq_t=0.5))
    optimizer = torch.optim.AdamW(flow_map.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in tqdm(range(steps), desc=f"MeanFlow map, seed {seed}", mininterval=2.0):
        loss = loss_fn(FlowMapModel(flow_map), sample_checkerboard(batch, gen), generator=gen).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow_map.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return flow_map.requires_grad_(False).eval()


def tune(start: MLPFlowMapModel, beta: float, reward_trains_map: bool, seed: int, args) -> tuple:
    """Adapter + map toward p_beta (module docstring); returns (adapter, tuned map)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    flow_map = MLPFlowMapModel.from_config(start.config)
    flow_map.load_state_dict(start.state_dict())
    adapter = ContextNoiseAdapterModel(latent_shape=(2,), num_classes=len(TARGETS))
    loss_fn = VFMLoss(alpha=0.0, meanflow=MeanFlowLoss(TwoTimeSampler(scheme="uniform", r_neq_t=0.5)))
    optimizer = torch.optim.AdamW(
        [
            {"params": adapter.parameters(), "lr": args.adapter_lr},
            {"params": flow_map.parameters(), "lr": args.map_lr},
        ],
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.tune_steps)
    for _ in range(args.tune_steps):
        context = torch.randint(len(TARGETS), (args.batch_size,), generator=gen)
        out = loss_fn(
            FlowMapModel(flow_map),
            adapter,
            sample_checkerboard(args.batch_size, gen),
            RewardTerm(reward, context, beta),
            context,
            target_model=FlowMapModel(flow_map) if reward_trains_map else stop_gradient(flow_map),
            generator=gen,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(list(flow_map.parameters()) + list(adapter.parameters()), 1.0)
        optimizer.step()
        schedule.step()
    return adapter.eval(), flow_map.requires_grad_(False).eval()


@torch.no_grad()
def evaluate(draws: torch.Tensor, context: torch.Tensor, exact: list[torch.Tensor]) -> dict[str, float]:
    per = [
        {
            "mmd": float(mmd(draws[context == c], exact[c])),
            "support": float(checkerboard_support(draws[context == c])),
            "reward": float(reward(draws[context == c], context[context == c]).mean()),
        }
        for c in range(len(TARGETS))
    ]
    return {k: sum(p[k] for p in per) / len(per) for k in per[0]}


def run_seed(seed: int, betas: list[float], table_betas: set[float], args) -> dict:
    start = train_meanflow(seed, args.meanflow_steps, args.batch_size, args.width, args.layers)
    gen = torch.Generator().manual_seed(10_000 + seed)
    n = args.num_samples
    context = torch.arange(len(TARGETS)).repeat_interleave(n)
    noise = torch.randn(len(context), 2, generator=gen)
    data = sample_checkerboard(n, gen)
    untuned = one_step(FlowMapModel(start), noise)
    out = {"prior_mmd_untuned": float(mmd(untuned[:n], data))}
    shown = {}
    for beta in betas:
        exact, log_z = zip(*(exact_tilted(beta, n, c, gen) for c in range(len(TARGETS))))
        exact_reward = sum(float(reward(e, torch.full((n,), c)).mean()) for c, e in enumerate(exact)) / len(exact)
        row = {"exact/reward": exact_reward, "exact/kl": exact_reward / beta - sum(log_z) / len(log_z)}
        row["exact/support"] = sum(float(checkerboard_support(e)) for e in exact) / len(exact)
        draws = {"untuned": untuned}
        methods = TUNED if beta in table_betas else TUNED[:1]
        for name in methods:
            adapter, flow_map = tune(start, beta, name == "vfm_reward_trains_map", seed, args)
            with torch.no_grad():
                q = adapter(context)
                draws[name] = one_step(FlowMapModel(flow_map), q.sample(noise=noise), context)
                row[f"{name}/kl"] = float(q.kl("sum").mean())
                row[f"{name}/prior_drift_mmd"] = float(mmd(one_step(FlowMapModel(flow_map), noise[:n]), data))
        if beta in table_betas:
            guided = reward_guided_sample(FlowMapModel(start), reward, noise, beta, context, args.guided_steps)
            draws["guided_100_steps"] = guided
        for name, x in draws.items():
            row.update({f"{name}/{k}": v for k, v in evaluate(x, context, list(exact)).items()})
        out[str(beta)] = row
        shown[beta] = {"exact": torch.cat(exact), **draws}
        print(f"seed {seed} beta {beta}:", json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    return out, shown


def tradeoff_plot(summary: dict, betas: list[float], path: Path, size: int = 420, pad: int = 50) -> None:
    """Mean reward (y) against KL (x, log scale) over beta: the exact target (black) and VFM (blue), with s.e."""
    curves = {
        "exact p_beta: KL(p_beta || p)": ("exact", (0, 0, 0)),
        "VFM: KL(q || N(0, I))": ("vfm", (30, 90, 200)),
    }
    points = {
        label: [(summary[str(b)][f"{m}/kl"], summary[str(b)][f"{m}/reward"]) for b in betas]
        for label, (m, _) in curves.items()
    }
    kls = [max(p[0]["mean"], 1e-3) for c in points.values() for p in c]
    rewards = [p[1]["mean"] for c in points.values() for p in c]
    lo_x, hi_x = math.log10(min(kls)) - 0.1, math.log10(max(kls)) + 0.1
    lo_y, hi_y = min(rewards) - 0.1, max(rewards) + 0.1
    image = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    draw = ImageDraw.Draw(image)

    def xy(kl: float, r: float) -> tuple[float, float]:
        x = pad + (math.log10(max(kl, 1e-3)) - lo_x) / (hi_x - lo_x) * size
        return x, pad + size - (r - lo_y) / (hi_y - lo_y) * size

    draw.rectangle([pad, pad, pad + size, pad + size], outline="black")
    for label, (_, colour) in curves.items():
        line = [xy(kl["mean"], r["mean"]) for kl, r in points[label]]
        draw.line(line, fill=colour, width=2)
        for (kl, r), beta, (x, y) in zip(points[label], betas, line):
            half = abs(xy(kl["mean"], r["mean"] + (r["se"] if r["se"] == r["se"] else 0))[1] - y)
            draw.line([(x, y - half), (x, y + half)], fill=colour)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            draw.text((x + 5, y - 12), f"beta {beta:g}", fill=colour)
    for i, label in enumerate(curves):
        draw.text((pad + 8, pad + 8 + 14 * i), label, fill=curves[label][1])
    draw.text((pad + size // 2 - 60, pad + size + 18), "KL (nats, log scale)", fill="black")
    draw.text((4, pad - 16), "mean reward E[R(x, c)]", fill="black")
    for value in (lo_x + 0.1, hi_x - 0.1):
        draw.text((xy(10**value, lo_y)[0] - 10, pad + size + 4), f"{10**value:.2g}", fill="black")
    for value in (lo_y + 0.1, hi_y - 0.1):
        draw.text((4, xy(1, value)[1] - 6), f"{value:.2f}", fill="black")
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", default="0.1,1,10", help="the table's betas (every method)")
    parser.add_argument("--tradeoff_betas", default="0.03,0.1,0.3,1,3,10", help="the plot's betas (exact and vfm)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--meanflow_steps", type=int, default=5000)
    parser.add_argument("--tune_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--adapter_lr", type=float, default=1e-2)
    parser.add_argument("--map_lr", type=float, default=1e-4)
    parser.add_argument("--guided_steps", type=int, default=100)
    parser.add_argument("--num_samples", type=int, default=2000, help="draws per context")
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = [float(b) for b in args.betas.split(",")]
    betas = sorted(set(table) | {float(b) for b in args.tradeoff_betas.split(",")})
    runs, shown = [], None
    for seed in (int(s) for s in args.seeds.split(",")):
        result, draws = run_seed(seed, betas, set(table), args)
        runs.append(result)
        shown = shown or draws
    summary = {"prior_mmd_untuned": summarize_runs(runs, ["prior_mmd_untuned"])["prior_mmd_untuned"]}
    for beta in betas:
        rows = [r[str(beta)] for r in runs]
        summary[str(beta)] = summarize_runs(rows, list(rows[0]))
    tiles = [density_image(shown[b][m]) for b in table for m in ("exact", *METHODS)]
    columns = 1 + len(METHODS)
    sheet = Image.new("L", (100 * columns - 4, 100 * len(table) - 4), 255)
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * 100, (i // columns) * 100))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(out / "reward_checkerboard_cpu.png")
    tradeoff_plot(
        summary, [float(b) for b in args.tradeoff_betas.split(",")], out / "reward_checkerboard_tradeoff_cpu.png"
    )
    for beta in table:
        entry = summary[str(beta)]
        print(beta, {k: f"{v['mean']:.3f} ± {v['se']:.3f}" for k, v in entry.items()})
    write_results(out, "reward_checkerboard_cpu", {"summary": summary, "runs": runs}, vars(args), start)


if __name__ == "__main__":
    main()
