"""Candidate sources and condition likelihoods; the 2-process global pool equals the 1-process pool."""

import sys

import pytest
import torch
from accelerate import Accelerator
from helpers import run, two_process_launch
from safetensors.torch import load_file, save_file

from diffusers_pafm import (
    BatchCandidates,
    ClassMatch,
    ClassMemoryBank,
    CLIPLikelihood,
    FlowBatch,
    make_loss,
    posterior_velocity,
)


def test_batch_candidates_single_process_is_the_batch():
    x, y = torch.randn(5, 3), torch.arange(5)
    c = BatchCandidates()(FlowBatch(x=x, class_labels=y))
    assert torch.equal(c.endpoints, x) and torch.equal(c.labels, y)
    assert c.self_index.tolist() == [0, 1, 2, 3, 4] and not c.per_query


def test_efm_ring_buffer_extends_the_pool():
    source = BatchCandidates(memory=4, sample_shape=(2,))
    first, second = FlowBatch(x=torch.ones(3, 2)), FlowBatch(x=torch.full((3, 2), 2.0))
    c = source(first)
    assert c.valid.tolist() == [True] * 3 + [False] * 4
    source.update(first)
    source.update(second)
    c = source(second)
    assert c.valid.tolist() == [True] * 7
    # ring order: slots 0..2 got ones, slot 3 and then slots 0, 1 got twos
    assert source.memory.data[0, :, 0].tolist() == [2.0, 2.0, 1.0, 2.0]


def test_class_memory_bank_ring_buffers_and_null_pool():
    bank = ClassMemoryBank(num_classes=3, sample_shape=(2,), bank_size=2, grouped=False)  # the per-query layout
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    y = torch.tensor([0, 0, 0, 1])
    bank.update(FlowBatch(x=x, class_labels=y))
    assert bank.bank.data[0, :, 0].tolist() == [2.0, 1.0]  # class 0 kept its 2 latest
    assert bank.bank.count.tolist() == [2, 1, 0, 2]
    query = FlowBatch(
        x=torch.zeros(3, 2), class_labels=torch.tensor([0, 2, 1]), null_mask=torch.tensor([0, 0, 1]).bool()
    )
    c = bank(query)
    assert c.per_query and c.endpoints.shape == (3, 3, 2)
    assert c.valid.tolist() == [[True, True, True], [True, False, False], [True, True, True]]
    assert c.endpoints[2, 1:, 0].tolist() == [2.0, 3.0]  # null row scored against the global pool
    state = bank.state_dict()
    restored = ClassMemoryBank(num_classes=3, sample_shape=(2,), bank_size=2, grouped=False)
    restored.load_state_dict(state)
    assert torch.equal(restored(query).endpoints, c.endpoints)


@pytest.mark.parametrize("target_ess", [None, 3.0])
def test_grouped_class_bank_gives_the_per_query_weights_without_gathering(target_ess):
    """The grouped layout (each class's rows against that class's bank slice, in place) equals the gathered
    per-query sets [own, *bank[class]]: velocity, weights, ESS, spread, to 1e-6; null rows use the global pool."""
    from diffusers_pafm import PosteriorEstimator

    g = torch.Generator().manual_seed(0)
    banks = {
        grouped: ClassMemoryBank(num_classes=4, sample_shape=(3, 2), bank_size=5, grouped=grouped)
        for grouped in (True, False)
    }
    for _ in range(3):  # partly filled banks: some empty slots stay masked
        past = FlowBatch(x=torch.randn(6, 3, 2, generator=g), class_labels=torch.randint(0, 4, (6,), generator=g))
        for bank in banks.values():
            bank.update(past)
    batch = FlowBatch(
        x=torch.randn(10, 3, 2, generator=g),
        class_labels=torch.tensor([0, 1, 1, 2, 3, 0, 1, 4, 2, 2]),
        null_mask=torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).bool(),
    )
    noise, t = torch.randn(10, 3, 2, generator=g), 0.5 + 0.5 * torch.rand(10, generator=g)
    x_t = (1 - t[:, None, None]) * batch.x + t[:, None, None] * noise
    out = {}
    for grouped, bank in banks.items():
        estimator = PosteriorEstimator(bank, ClassMatch(null_class_id=4), target_ess=target_ess)
        out[grouped] = estimator.posterior_target(batch, x_t, t, noise - batch.x)
    assert banks[True](batch).group_index is not None and banks[True](batch).endpoints.data_ptr() == (
        banks[True].bank.data.data_ptr()
    )  # a view of the bank, nothing gathered
    for name in ("velocity", "weights", "ess", "spread", "self_weight", "effective_k", "temperature"):
        torch.testing.assert_close(getattr(out[True], name), getattr(out[False], name), rtol=1e-6, atol=1e-6)
    assert (out[True].ess > 1.01).any()


def test_class_match_hand_computed():
    batch = FlowBatch(x=torch.zeros(3, 1), class_labels=torch.tensor([0, 1, 10]))
    c = BatchCandidates()(FlowBatch(x=torch.zeros(3, 1), class_labels=torch.tensor([0, 1, 1])))
    log_p = ClassMatch(null_class_id=10)(batch, c)
    inf = float("-inf")
    assert log_p.tolist() == [[0.0, inf, inf], [inf, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_clip_likelihood_hand_computed():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    images = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    batch = FlowBatch(x=torch.zeros(2, 1), text_embeds=text, image_embeds=images)
    c = BatchCandidates()(batch)
    log_p = CLIPLikelihood(temperature=0.5)(batch, c)
    s = 2**-0.5
    torch.testing.assert_close(log_p, torch.tensor([[1.0, s], [0.0, s]]) / 0.5)
    dropped = FlowBatch(
        x=torch.zeros(2, 1), text_embeds=text, image_embeds=images, null_mask=torch.tensor([1, 0]).bool()
    )
    assert CLIPLikelihood(0.5)(dropped, c)[0].eq(0).all()
    with pytest.raises(ValueError, match="text_embeds"):
        CLIPLikelihood()(FlowBatch(x=torch.zeros(2, 1)), c)


GLOBAL_B, LOCAL_B, DIM = 8, 4, 6


def _global_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(GLOBAL_B, DIM, generator=g)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    x_t = torch.randn(GLOBAL_B, DIM, generator=g)
    t = torch.rand(GLOBAL_B, generator=g) * 0.8 + 0.2
    return x, y, x_t, t


def _score(batch, x_t, t):
    cands = BatchCandidates()(batch)
    log_p = ClassMatch()(batch, cands)
    post = posterior_velocity(x_t, t, cands.endpoints, log_p)
    return cands, post


def _two_process_worker(out_dir):
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    x, y, x_t, t = _global_batch()
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    cands, post = _score(FlowBatch(x=x[rows], class_labels=y[rows]), x_t[rows], t[rows])
    save_file(
        {
            "pool": cands.endpoints,
            "labels": cands.labels,
            "self_index": cands.self_index,
            "weights": post.weights,
            "velocity": post.velocity,
            "world": torch.tensor(accelerator.num_processes),
        },
        f"{out_dir}/rank{rank}.safetensors",
    )


def test_two_processes_build_the_same_global_pool_and_weights(tmp_path):
    # a real 2-process launch (a forked debug_launcher can hang when the parent has run multi-threaded kernels)
    run(two_process_launch(__file__, str(tmp_path)), timeout=240)
    x, y, x_t, t = _global_batch()
    cands, post = _score(FlowBatch(x=x, class_labels=y), x_t, t)
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got["world"].item() == 2
        assert torch.equal(got["pool"], cands.endpoints) and torch.equal(got["labels"], y)
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        assert got["self_index"].tolist() == list(range(rank * LOCAL_B, (rank + 1) * LOCAL_B))
        torch.testing.assert_close(got["weights"], post.weights[rows], rtol=0, atol=1e-7)
        torch.testing.assert_close(got["velocity"], post.velocity[rows], rtol=0, atol=1e-6)


def test_stablevm_preset_fills_its_bank_during_training(tiny_dit):
    from diffusers_pafm import VelocityModel

    loss_fn = make_loss("stablevm", num_classes=10, sample_shape=(1, 8, 8), bank_size=4)
    model = VelocityModel(tiny_dit)
    y = torch.tensor([1, 1, 2, 2])
    first = loss_fn(model, FlowBatch(x=torch.randn(4, 1, 8, 8), class_labels=y))
    assert first.effective_k.eq(1).all()  # empty bank: own endpoint only
    second = loss_fn(model, FlowBatch(x=torch.randn(4, 1, 8, 8), class_labels=y))
    assert second.effective_k.eq(3).all()  # own + the two earlier samples of its class


def test_ring_buffer_push_matches_a_sequential_reference():
    from diffusers_pafm.pafm.candidates import _RingBuffers

    g = torch.Generator().manual_seed(0)
    buffers = _RingBuffers(slots=3, size=4, sample_shape=(1,))
    ref = {s: [] for s in range(3)}
    for push in range(5):
        n = int(torch.randint(1, 12, (1,), generator=g))
        slot = torch.randint(0, 3, (n,), generator=g)
        x = torch.arange(n, dtype=torch.float32).view(-1, 1) + 100 * push
        buffers.push(slot, x, None, None)
        for s, v in zip(slot.tolist(), x[:, 0].tolist()):
            ref[s].append(v)
    for s in range(3):
        latest = ref[s][-4:]
        assert buffers.count[s].item() == min(len(ref[s]), 4)
        stored = buffers.data[s, : buffers.count[s], 0].tolist()
        assert sorted(stored) == sorted(latest)
        # the pointer sits right after the most recent sample
        assert buffers.data[s, (buffers.pointer[s] - 1) % 4, 0].item() == ref[s][-1]


if __name__ == "__main__":  # the worker of the 2-process test, started by ``accelerate launch``
    _two_process_worker(sys.argv[1])
