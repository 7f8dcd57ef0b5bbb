#!/usr/bin/env python
"""The GPU check: what a GPU user gets, measured and verified in one short run (about 5-7 minutes on one H100/H200).

    python benchmarks/gpu_check.py                      # cuda, bf16 autocast, SiT-B/2-sized DiT on 4x32x32
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code path at toy size (runs in the tests)

Speed, as medians of interleaved steps after warm-up (``torch.cuda.synchronize`` around each), with the peak memory
of each step (``torch.cuda.max_memory_allocated``): FM, PAFM with in-batch and class-bank candidates, kNN-PAFM over a
faiss bank of ``--bank_size`` latents (and the lookup's share of the step), MeanFlow (split JVP, eager and through
``torch.compile``: ``mode="compiled_jvp"``, compiled in the warm-up), a joint VFM step, and per-image VFM one-step
sampling against the DPS-style sampler. Correctness, on the device: the posterior velocity equals the CPU result
(fp32, relative error), the MeanFlow JVP equals a central finite difference and the compiled JVP the eager one, a
short PAFM run has finite losses, and a resumed PAFMTrainer run equals an uninterrupted one.

Writes ``benchmarks/results/gpu_check_<device>.json`` (or ``--output``) and prints a table. Installs nothing: on a
CUDA machine the project's own line ``pip install -e ".[knn-gpu]"`` (no CPU constraints file) is all it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_pafm import (
    FlowBatch,
    FlowMapModel,
    FlowMapTransformer2DModel,
    KNNBank,
    MeanFlowLoss,
    Measurement,
    NoiseAdapterModel,
    PAFMTrainer,
    PAFMTrainingConfig,
    TwoTimeSampler,
    VelocityModel,
    VFMLoss,
    build_dit,
    build_knn_bank,
    dps_sample,
    make_loss,
    one_step,
    posterior_velocity,
    stop_gradient,
)
from diffusers_pafm.flow_maps import meanflow_target
from diffusers_pafm.pafm import faiss_available

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"pafm_over_fm": 1.02, "knn_lookup_share": 0.01, "meanflow_over_fm": 1.6, "vfm_speedup_over_dps": 300}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (seconds on a CPU): the test-suite form")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20, tiny 2)")
    parser.add_argument("--bank_size", type=int, default=None, help="kNN bank latents (default 100 000, tiny 256)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.size, args.model_size, args.batch = (8, "test", 8) if tiny else (32, "base", 64)
    args.num_classes = 10 if tiny else 1000
    args.steps = args.steps or (2 if tiny else 20)
    args.bank_size = args.bank_size or (256 if tiny else 100_000)
    args.knn_k = 4 if tiny else 16
    args.dps_steps = 4 if tiny else 100
    args.run_steps = 5 if tiny else 50
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def timed(fn, device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak bytes allocated during the call; None off CUDA) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def speed(args, device: torch.device, work: Path) -> tuple[dict, dict]:
    """Median step times and peak memory of every variant, interleaved."""
    torch.manual_seed(0)
    c, s, b, n = 4, args.size, args.batch, args.num_classes
    dit = build_dit(args.model_size, c, s, n, patch_size=2).to(device).train()
    model = VelocityModel(dit)
    flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit(args.model_size, c, s, n)).to(device).train()
    adapter = NoiseAdapterModel(in_channels=c, sample_size=s, latent_channels=c, latent_size=s, num_tasks=1)
    adapter = adapter.to(device).train()
    params = [*dit.parameters(), *flow_map.parameters(), *adapter.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    bank_latents = torch.randn(args.bank_size, c, s, s, generator=torch.Generator().manual_seed(1))
    bank_labels = torch.randint(0, n, (args.bank_size,), generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    bank = KNNBank(build_knn_bank(work / "knn", bank_latents, k=args.knn_k, labels=bank_labels))
    knn_build = time.perf_counter() - start
    losses = {
        "fm": make_loss("fm", num_classes=n),
        "pafm": make_loss("pafm", num_classes=n),
        "pafm_class_bank": make_loss("pafm", num_classes=n, candidates="class_bank", sample_shape=(c, s, s)),
        "pafm_knn": make_loss("pafm", num_classes=n, candidates="knn", knn_bank=bank, knn_k=args.knn_k),
    }
    for loss in losses.values():
        loss.to(device)
    meanflow = {
        "meanflow": MeanFlowLoss(TwoTimeSampler()),
        "meanflow_compiled_jvp": MeanFlowLoss(TwoTimeSampler(), mode="compiled_jvp"),
    }
    vfm = VFMLoss()
    lookup_seconds = []

    def batch():
        ids = torch.randint(0, args.bank_size, (b,), generator=torch.Generator().manual_seed(len(lookup_seconds)))
        x = bank_latents[ids].to(device, non_blocking=True)
        return FlowBatch(x=x, class_labels=bank_labels[ids].to(device), sample_ids=ids.to(device))

    def step(variant):
        data = batch()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            if variant in losses:
                if variant == "pafm_knn":
                    _sync(device)
                    t0 = time.perf_counter()
                    bank.lookup(data.sample_ids, args.knn_k, device=device)
                    _sync(device)
                    lookup_seconds.append(time.perf_counter() - t0)
                loss = losses[variant](model, data, generator=gen).loss
            elif variant in meanflow:
                loss_fn = meanflow[variant]
                loss = loss_fn(FlowMapModel(flow_map), data.x, class_labels=data.class_labels, generator=gen).loss
            else:  # vfm joint step, super-resolution of the latent images
                task = torch.zeros(b, dtype=torch.long, device=device)
                y = Measurement.simulate(data.x, task, ["super_resolution_2x"], 0.05, gen)
                null = torch.full((b,), n, device=device)
                loss = vfm(
                    FlowMapModel(flow_map),
                    adapter,
                    data.x,
                    y,
                    y.pseudo_inverse(data.x),
                    task_ids=task,
                    class_labels=null,
                    target_model=stop_gradient(flow_map),
                    generator=gen,
                ).loss
        loss.backward()
        optimizer.step()

    variants = [*losses, *meanflow, "vfm_joint"]
    for variant in variants:  # warm-up (kernels, autotuning, allocator)
        step(variant)
    times = {v: [] for v in variants}
    memory = dict.fromkeys(variants, 0)
    lookup_seconds.clear()
    for _ in range(args.steps):
        for variant in variants:
            seconds, peak = timed(lambda v=variant: step(v), device)
            times[variant].append(seconds)
            memory[variant] = max(memory[variant], peak or 0)
    medians = {v: statistics.median(ts) for v, ts in times.items()}

    # sampling: one-step VFM against DPS, per image
    flow_map.eval()
    adapter.eval()
    z = torch.randn(b, c, s, s, device=device, generator=gen)
    null = torch.full((b,), n, device=device)
    y_true = Measurement.simulate(
        z, torch.zeros(b, dtype=torch.long, device=device), ["super_resolution_2x"], 0.05, gen
    )
    ((_, op, y),) = y_true.groups

    @torch.no_grad()
    def vfm_sample():
        with _autocast(device):
            q = adapter(op.pseudo_inverse(y), torch.zeros(b, dtype=torch.long, device=device))
            one_step(FlowMapModel(flow_map), q.sample(generator=gen), null)

    def dps():
        with _autocast(device):
            dps_sample(FlowMapModel(flow_map), op, y, z, args.dps_steps, 1.0, class_labels=null)

    vfm_sample(), dps()
    sample_times = {"vfm_one_step": [], f"dps_{args.dps_steps}_steps": []}
    for _ in range(max(args.steps // 4, 2)):
        sample_times["vfm_one_step"].append(timed(vfm_sample, device)[0] / b)
        sample_times[f"dps_{args.dps_steps}_steps"].append(timed(dps, device)[0] / b)
    per_image = {k: statistics.median(v) for k, v in sample_times.items()}
    fm = medians["fm"]
    ratios = {
        "pafm_over_fm": medians["pafm"] / fm,
        "pafm_class_bank_over_fm": medians["pafm_class_bank"] / fm,
        "pafm_knn_over_fm": medians["pafm_knn"] / fm,
        "knn_lookup_share": statistics.median(lookup_seconds) / medians["pafm_knn"],
        "meanflow_over_fm": medians["meanflow"] / fm,
        "meanflow_compiled_jvp_over_fm": medians["meanflow_compiled_jvp"] / fm,
        "vfm_joint_over_fm": medians["vfm_joint"] / fm,
        "vfm_speedup_over_dps": per_image[f"dps_{args.dps_steps}_steps"] / per_image["vfm_one_step"],
    }
    absolute = {
        "step_seconds": medians,
        "peak_memory_mib": {v: (m / 2**20 if m else None) for v, m in memory.items()},
        "sample_seconds_per_image": per_image,
        "knn_lookup_seconds": statistics.median(lookup_seconds),
        "knn_build_seconds": knn_build,
        "faiss": faiss_available(),
    }
    return ratios, absolute


def correctness(args, device: torch.device, work: Path) -> dict:
    """Device results against CPU / finite-difference references, a short finite run and an exact resume."""
    checks = {}
    gen = torch.Generator().manual_seed(3)
    b, k, d = 32, 256, 4 * args.size * args.size
    x_t, cands = torch.randn(b, d, generator=gen), torch.randn(k, d, generator=gen)
    t = torch.rand(b, generator=gen).clamp(0.05, 1)
    cpu = posterior_velocity(x_t, t, cands).velocity
    dev = posterior_velocity(x_t.to(device), t.to(device), cands.to(device)).velocity.cpu()
    checks["posterior_velocity_rel_error"] = float((dev - cpu).norm() / cpu.norm())

    torch.manual_seed(0)
    dit = build_dit("test", 4, args.size, 10)  # raw-t time embedding: smooth in t, so a finite difference is exact
    flow_map = FlowMapTransformer2DModel.from_flow_matching(dit, time_embedding_scale=1.0).to(device).eval()
    for p in flow_map.parameters():  # a zero-initialised output has a zero derivative: give the check something
        if p.ndim >= 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    u = FlowMapModel(flow_map)
    labels = torch.full((4,), 10, device=device)
    x = torch.randn(4, 4, args.size, args.size, device=device)
    v = torch.randn_like(x)
    tt, rr = torch.full((4,), 0.7, device=device), torch.full((4,), 0.2, device=device)
    jvp = meanflow_target(lambda a, b_, c_: u(a, b_, c_, labels), x, tt, rr, v)
    fd = meanflow_target(lambda a, b_, c_: u(a, b_, c_, labels), x, tt, rr, v, mode="finite_difference", fd_step=1e-3)
    checks["jvp_vs_finite_difference_rel_error"] = float((jvp - fd).norm() / (v - jvp).norm().clamp_min(1e-12))
    compiled = meanflow_target(lambda a, b_, c_: u(a, b_, c_, labels), x, tt, rr, v, mode="compiled_jvp")
    checks["compiled_jvp_vs_jvp_rel_error"] = float((compiled - jvp).norm() / (v - jvp).norm().clamp_min(1e-12))

    model = VelocityModel(build_dit("test", 4, args.size, 10).to(device).train())
    optimizer = torch.optim.AdamW(model.transformer.parameters(), lr=1e-3)
    loss_fn = make_loss("pafm", num_classes=10, class_dropout=0.1, null_class_id=10)
    run = []
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.run_steps):
        batch = FlowBatch(
            x=torch.randn(16, 4, args.size, args.size, device=device, generator=g),
            class_labels=torch.randint(0, 10, (16,), device=device, generator=g),
        )
        with _autocast(device):
            out = loss_fn(model, batch, generator=g)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        run.append(float(out.loss.detach()))
    checks["pafm_run_losses_finite"] = all(torch.isfinite(torch.tensor(run)).tolist())

    common = {"dataset": "digits", "model_size": "test", "train_batch_size": 16, "report_to": "none"}
    common["checkpointing_steps"] = 2
    straight = PAFMTrainer(PAFMTrainingConfig(output_dir=str(work / "straight"), max_train_steps=4, **common)).train()
    PAFMTrainer(PAFMTrainingConfig(output_dir=str(work / "resumed"), max_train_steps=2, **common)).train()
    resumed = PAFMTrainer(
        PAFMTrainingConfig(
            output_dir=str(work / "resumed"), max_train_steps=4, resume_from_checkpoint="latest", **common
        )
    ).train()
    checks["resume_max_loss_difference"] = max(abs(a - b) for a, b in zip(straight.losses[2:], resumed.losses))
    checks["passed"] = (
        checks["posterior_velocity_rel_error"] <= 1e-5
        and checks["jvp_vs_finite_difference_rel_error"] <= 1e-2
        and checks["compiled_jvp_vs_jvp_rel_error"] <= 1e-4
        and checks["pafm_run_losses_finite"]
        and checks["resume_max_loss_difference"] <= 1e-6
    )
    return checks


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; pass --device cpu --tiny for the CPU form")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checks = correctness(args, device, Path(tmp))
        ratios, absolute = speed(args, device, Path(tmp))
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "torch": torch.__version__,
        "ratios": ratios,
        "goals": {
            k: {"goal": g, "value": ratios[k], "met": ratios[k] >= g if k.endswith("dps") else ratios[k] <= g}
            for k, g in GOALS.items()
        },
        "absolute": absolute,
        "correctness": checks,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"{'measure':<28} {'value':>12}  goal")
    for key, value in ratios.items():
        goal = GOALS.get(key)
        print(f"{key:<28} {value:>12.4g}  {'' if goal is None else goal}")
    for key, value in checks.items():
        print(f"{key:<28} {value!s:>12}")
    output = (
        Path(args.output) if args.output else RESULTS / f"gpu_check_{device.type}{'_tiny' if args.tiny else ''}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
