"""Pickle-free checkpoint state, atomic folders, checkpoint listing, and the process-count-invariant batch sampler."""

import pytest
import torch

from diffusers_pafm.trainers import GlobalBatchSampler
from diffusers_pafm.utils import atomic_directory, list_checkpoints, load_state, prune, resolve_checkpoint, save_state


def test_optimizer_and_rng_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": 7, "tuple": (1, "a"), "none": None}
    save_state(state, tmp_path / "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_state(tmp_path / "state")
    assert back["step"] == 7 and back["tuple"] == (1, "a") and back["none"] is None
    assert torch.equal(back["rng"], state["rng"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert list(back["optimizer"]["state"]) == [0, 1]  # int keys stay ints
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store object"):
        save_state({"bad": object()}, tmp_path / "bad")


def test_atomic_directory_and_checkpoint_listing(tmp_path):
    with atomic_directory(tmp_path / "checkpoint-5") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "checkpoint-5") as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("crash while writing")
    assert (tmp_path / "checkpoint-5" / "a").read_text() == "old"
    assert not list(tmp_path.glob(".checkpoint-5.tmp-*"))
    for step in (10, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".checkpoint-30.tmp-abc").mkdir()  # left by a killed writer
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10", "checkpoint-20"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-20"
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-99")
    assert [p.name for p in prune(tmp_path, 2)] == ["checkpoint-5"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]


def test_global_batches_do_not_depend_on_the_process_count_and_resume_in_place():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    one = take(GlobalBatchSampler(50, 8, 1, 0, seed=3), 12)
    r0 = take(GlobalBatchSampler(50, 4, 2, 0, seed=3), 12)
    r1 = take(GlobalBatchSampler(50, 4, 2, 1, seed=3), 12)
    assert one == [a + b for a, b in zip(r0, r1)]
    epoch = [i for batch in one[:6] for i in batch]  # 6 full global batches of 8 per epoch of 50
    assert len(set(epoch)) == 48 and one[6] != one[0]
    assert take(GlobalBatchSampler(50, 8, 1, 0, seed=3, start=5), 7) == one[5:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(6, 4, 2, 0, seed=0)
