#!/usr/bin/env python
"""PAFM overhead: train-step time and peak memory of PAFM vs plain FM, and of a naive B x K x D PAFM, in one run.

Reference config: tiny class-conditional diffusers DiT on 4x32x32 "latents" (D = 4096, patch 4 -> 64 tokens),
batch 64, in-batch candidates (global batch + class match, the ``pafm`` preset), fp32, CPU threads as available.

* time: the variants' train steps (forward, backward, AdamW step) are interleaved, ``--steps`` each after
  warm-up; medians are compared (step-to-step noise on shared CPUs reaches 1.5x, so only same-run ratios count).
* memory: each variant runs in a fresh subprocess; peak = RSS high-water mark during its steps minus the RSS
  before the model was built (Linux /proc; the CPU analogue of ``torch.cuda.max_memory_allocated``).
* also: extra peak memory of ``posterior_velocity`` at B = K = 1024, D = 16384 (acceptance: well under 2 GB);
  a MeanFlow step (split JVP) of the same DiT as a flow map (goal: <= 1.3x an FM step; eager and with the JVP
  through ``torch.compile``, ``mode="compiled_jvp"``, compiled during the warm-up), and with the posterior
  velocity in its target (global batch + class match; goal: <= 1.03x a MeanFlow step); PAFM with kNN candidates
  from a faiss bank, and the share of its step spent waiting for the neighbours (goal: <= 1 %): gathered with the
  batch in a one-worker data loader (:class:`~diffusers_pafm.KNNNeighbourDataset`, the trainers' path) and, for
  comparison, looked up in the step (:meth:`~diffusers_pafm.KNNBank.lookup`); the extra peak memory
  of a class-bank posterior at B = K = 256, D = 4096, grouped by class in place vs gathered per query.

The last line printed is one JSON object; it is also written to ``benchmarks/results/pafm_overhead.json``.
Usage: ``python benchmarks/pafm_overhead.py [--steps 20] [--device cpu|cuda]``
"""

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from diffusers_pafm import (
    ClassMatch,
    ClassMemoryBank,
    EncodedDataset,
    FlowBatch,
    FlowMapModel,
    FlowMapTransformer2DModel,
    KNNBank,
    KNNLookup,
    MeanFlowLoss,
    PosteriorEstimator,
    TwoTimeSampler,
    VelocityModel,
    build_knn_bank,
    make_loss,
    make_posterior,
    posterior_velocity,
)

BATCH, CHANNELS, SIZE, NUM_CLASSES = 64, 4, 32, 10
KNN_BANK, KNN_K = 4096, 16
VARIANTS = (
    "fm",
    "pafm",
    "naive",
    "meanflow",
    "meanflow_compiled",
    "meanflow_double_backward",
    "meanflow_posterior",
    "pafm_knn",
    "pafm_knn_in_step",
)
RESULTS = Path(__file__).resolve().parent / "results"


def build(device, hidden_heads=4, head_dim=32, layers=4, patch=4, seed=0):
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=hidden_heads,
        attention_head_dim=head_dim,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_layers=layers,
        sample_size=SIZE,
        patch_size=patch,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    ).to(device)
    transformer.train()
    return transformer, torch.optim.AdamW(transformer.parameters(), lr=1e-4)


def naive_pafm_loss(model, x, labels, t, noise):
    """PAFM written the obvious way: per-candidate targets and losses as B x K x D tensors."""
    tt = t.view(-1, 1, 1)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    pred = model(x_t, t, class_labels=labels).flatten(1)
    xf, xtf = x.flatten(1), x_t.flatten(1)
    with torch.no_grad():
        logits = -((xtf[:, None] - (1 - tt) * xf[None]) ** 2).sum(-1) / (2 * t.view(-1, 1) ** 2)
        logits = logits.masked_fill(labels[:, None] != labels[None], float("-inf"))
        weights = torch.softmax(logits, 1)
    v_j = (xtf[:, None] - xf[None]) / tt  # [B, K, D]
    return (weights * (pred[:, None] - v_j).pow(2).mean(-1)).sum(1).mean()


def make_steps(device, knn_dir):
    transformer, optimizer = build(device)
    model = VelocityModel(transformer)
    flow_map = FlowMapTransformer2DModel.from_flow_matching(transformer).to(device)
    flow_map_optimizer = torch.optim.AdamW(flow_map.parameters(), lr=1e-4)
    cands, likelihood = make_posterior("pafm", num_classes=NUM_CLASSES)  # global batch + class match
    meanflows = {
        "meanflow": MeanFlowLoss(TwoTimeSampler()),
        "meanflow_compiled": MeanFlowLoss(TwoTimeSampler(), mode="compiled_jvp"),
        "meanflow_double_backward": MeanFlowLoss(TwoTimeSampler(), mode="double_backward"),
        "meanflow_posterior": MeanFlowLoss(TwoTimeSampler(), posterior=PosteriorEstimator(cands, likelihood)),
    }
    bank_data = torch.randn(KNN_BANK, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    bank_labels = torch.randint(0, NUM_CLASSES, (KNN_BANK,), generator=torch.Generator().manual_seed(2))
    bank = KNNBank(build_knn_bank(knn_dir, bank_data, k=KNN_K, labels=bank_labels))
    losses = {
        "fm": make_loss("fm", num_classes=NUM_CLASSES),
        "pafm": make_loss("pafm", num_classes=NUM_CLASSES),
        "pafm_knn": make_loss("pafm", num_classes=NUM_CLASSES, candidates="knn", knn_bank=bank),
    }
    g = torch.Generator(device=device).manual_seed(0)
    lookup_seconds, wait_seconds = [], []
    order = torch.randint(0, KNN_BANK, (1000, BATCH), generator=torch.Generator().manual_seed(3)).tolist()
    loader = torch.utils.data.DataLoader(  # the trainers' path: neighbours gathered with the batch by a worker
        losses["pafm_knn"].candidates.loader_dataset(EncodedDataset(bank_data, class_labels=bank_labels)),
        batch_sampler=order,
        num_workers=1,
    )
    batches = iter(loader)

    def data():
        x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, device=device, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), device=device, generator=g)
        t = torch.rand(BATCH, device=device, generator=g).clamp_min(1e-4)
        return x, labels, t, torch.randn(x.shape, device=device, generator=g)

    def step(variant):
        x, labels, t, noise = data()
        opt = optimizer
        if variant == "naive":
            loss = naive_pafm_loss(model, x, labels, t, noise)
        elif variant in meanflows:
            loss_fn = meanflows[variant]
            loss = loss_fn(FlowMapModel(flow_map), x, noise=noise, class_labels=labels, generator=g).loss
            opt = flow_map_optimizer
        elif variant == "pafm_knn":
            start = time.perf_counter()
            item = next(batches)  # the time the step waits for the loader (the gather itself ran in the worker)
            wait_seconds.append(time.perf_counter() - start)
            batch = FlowBatch(
                x=item["x"].to(device),
                class_labels=item["class_labels"].to(device),
                sample_ids=item["sample_ids"].to(device),
                neighbours=KNNLookup.from_batch({k: v.to(device) for k, v in item.items()}),
            )
            loss = losses[variant](model, batch, t=t, noise=noise).loss
        elif variant == "pafm_knn_in_step":
            ids = torch.randint(0, KNN_BANK, (BATCH,), generator=torch.Generator().manual_seed(len(lookup_seconds)))
            start = time.perf_counter()
            bank.lookup(ids, KNN_K, device=device)  # the lookup alone, timed for its share of the step
            lookup_seconds.append(time.perf_counter() - start)
            x, labels = bank_data[ids].to(device), bank.lookup(ids, 1).labels[:, 0].to(device)
            batch = FlowBatch(x=x, class_labels=labels, sample_ids=ids.to(device))
            loss = losses["pafm_knn"](model, batch, t=t, noise=noise).loss
        else:
            loss = losses[variant](model, FlowBatch(x=x, class_labels=labels), t=t, noise=noise).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.lookup_seconds, step.wait_seconds = lookup_seconds, wait_seconds
    return step


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(device, steps, knn_dir, warmup=3):
    step = make_steps(device, knn_dir)
    times = {v: [] for v in VARIANTS}
    for _ in range(warmup):
        for v in times:
            step(v)
    for _ in range(steps):
        for v in times:
            sync(device)
            start = time.perf_counter()
            step(v)
            sync(device)
            times[v].append(time.perf_counter() - start)
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    medians["knn_lookup"] = statistics.median(step.lookup_seconds[-steps:])
    medians["knn_wait"] = statistics.median(step.wait_seconds[-steps:])
    return medians


def _status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


def peak_memory_child(variant, device, knn_dir, steps=3):
    """Runs in a fresh process: peak memory of ``steps`` train steps of one variant, in MiB."""
    if device == "cuda":
        step = make_steps(device, knn_dir)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step(variant)
        return torch.cuda.max_memory_allocated() / 2**20
    base = _status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
    step = make_steps(device, knn_dir)
    for _ in range(steps):
        step(variant)
    return (_status("VmHWM:") - base) / 2**20


def posterior_memory_child(device):
    x_t, t = torch.randn(1024, 16384, device=device), torch.rand(1024, device=device)
    cands = torch.randn(1024, 16384, device=device)
    posterior_velocity(x_t[:4], t[:4], cands[:8])
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        posterior_velocity(x_t, t, cands)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    posterior_velocity(x_t, t, cands)
    return (_status("VmHWM:") - base) / 2**20


def class_bank_memory_child(device, grouped: str, classes=100, batch=256, bank_size=256):
    """Extra peak memory (MiB) of one class-bank posterior at B = 256, K = 256, D = 4 x 32 x 32 over a full bank of
    ``classes`` classes, grouped by class (in place) or gathered per query (B x (1 + K) x D)."""
    shape = (CHANNELS, SIZE, SIZE)
    bank = ClassMemoryBank(classes, shape, bank_size=bank_size, grouped=grouped == "grouped").to(device)
    fill = FlowBatch(
        x=torch.randn(classes * bank_size, *shape, device=device),
        class_labels=torch.arange(classes, device=device).repeat_interleave(bank_size),
    )
    bank.update(fill)
    del fill
    estimator = PosteriorEstimator(bank, ClassMatch(null_class_id=classes))
    x = torch.randn(batch, *shape, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    t = torch.rand(batch, device=device)
    query = FlowBatch(x=x, class_labels=labels)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        estimator.posterior_target(query, x, t, x)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    estimator.posterior_target(query, x, t, x)
    return (_status("VmHWM:") - base) / 2**20


def in_child(*args):
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "step":
            value = peak_memory_child(rest[0], args.device, rest[1])
        elif kind == "class_bank":
            value = class_bank_memory_child(args.device, rest[0])
        else:
            value = posterior_memory_child(args.device)
        print(value)
        return

    with tempfile.TemporaryDirectory() as knn_dir:
        times = time_steps(args.device, args.steps, knn_dir + "/timing")
        memory = {v: in_child("step", v, knn_dir + f"/{v}", "--device", args.device) for v in ("fm", "pafm", "naive")}
    hardware = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    result = {
        "benchmark": "pafm_overhead",
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "hardware": hardware,
        "torch_threads": torch.get_num_threads(),
        "config": {
            "model": "DiT 4 layers x 128 hidden, patch 4",
            "batch": BATCH,
            "latent": [CHANNELS, SIZE, SIZE],
            "candidates": "in-batch (global batch, class match)",
            "steps_timed": args.steps,
        },
        "fm_step_seconds": round(times["fm"], 4),
        "pafm_step_seconds": round(times["pafm"], 4),
        "naive_step_seconds": round(times["naive"], 4),
        "fm_peak_mib": round(memory["fm"], 1),
        "pafm_peak_mib": round(memory["pafm"], 1),
        "naive_peak_mib": round(memory["naive"], 1),
        "posterior_1024x1024x16384_extra_mib": round(in_child("posterior", "--device", args.device), 1),
        "class_bank_b256_k256_d4096_extra_mib": {
            layout: round(in_child("class_bank", layout, "--device", args.device), 1)
            for layout in ("grouped", "gathered")
        },
        "step_time_ratio": round(times["pafm"] / times["fm"], 4),
        "peak_memory_ratio": round(memory["pafm"] / memory["fm"], 4),
        "naive_step_time_ratio": round(times["naive"] / times["fm"], 4),
        "naive_peak_memory_ratio": round(memory["naive"] / memory["fm"], 4),
        "meanflow_step_seconds": round(times["meanflow"], 4),
        "meanflow_step_time_ratio": round(times["meanflow"] / times["fm"], 4),
        "meanflow_compiled_jvp_step_seconds": round(times["meanflow_compiled"], 4),
        "meanflow_compiled_jvp_step_time_ratio": round(times["meanflow_compiled"] / times["fm"], 4),
        "meanflow_double_backward_step_seconds": round(times["meanflow_double_backward"], 4),
        "meanflow_double_backward_step_time_ratio": round(times["meanflow_double_backward"] / times["fm"], 4),
        "posterior_meanflow_step_seconds": round(times["meanflow_posterior"], 4),
        "posterior_meanflow_over_meanflow_step_time_ratio": round(times["meanflow_posterior"] / times["meanflow"], 4),
        "pafm_knn_step_seconds": round(times["pafm_knn"], 4),
        "knn_loader_wait_seconds": round(times["knn_wait"], 6),
        "knn_loader_wait_share_of_step": round(times["knn_wait"] / times["pafm_knn"], 5),
        "pafm_knn_in_step_seconds": round(times["pafm_knn_in_step"], 4),
        "knn_in_step_lookup_seconds": round(times["knn_lookup"], 6),
        "knn_in_step_lookup_share_of_step": round(times["knn_lookup"] / times["pafm_knn_in_step"], 5),
        "knn_config": f"faiss bank of {KNN_BANK} random latents, k = {KNN_K}, memory-mapped neighbours",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pafm_overhead_{args.device}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
