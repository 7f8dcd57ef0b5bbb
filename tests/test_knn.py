"""kNN bank: faiss and the torch fallback agree with brute force; bank layout, lookups and errors."""

import numpy as np
import pytest
import torch

from diffusers_pafm import FlowBatch, KNNBank, KNNCandidates, build_knn_bank, nearest_neighbors

faiss = pytest.importorskip("faiss")


def brute_force(database, queries, k, metric):
    if metric == "l2":
        d = ((queries[:, None] - database[None]) ** 2).sum(-1)
        return np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_and_torch_return_the_same_neighbours(metric):
    rng = np.random.default_rng(0)
    database = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((64, 16)).astype(np.float32)
    _, faiss_ids = nearest_neighbors(database, queries, 8, metric, backend="faiss")
    _, torch_ids = nearest_neighbors(database, queries, 8, metric, backend="torch")
    np.testing.assert_array_equal(faiss_ids, torch_ids)
    np.testing.assert_array_equal(faiss_ids, brute_force(database, queries, 8, metric))


def test_bank_layout_lookup_and_self_exclusion(tmp_path):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((200, 2, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 200)
    embeds = rng.standard_normal((200, 5)).astype(np.float32)
    path = build_knn_bank(tmp_path / "bank", latents, k=5, labels=labels, image_embeds=embeds)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["latents.npy", "neighbors.npy", "labels.npy", "image_embeds.npy", "index.faiss", "meta.json"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]  # no temporary folder left behind
    bank = KNNBank(path)
    assert isinstance(bank.latents, np.memmap) and bank.k == 5 and len(bank) == 200
    flat = latents.reshape(200, -1)
    expected = brute_force(flat, flat, 6, "l2")[:, 1:]  # drop self (distance 0)
    np.testing.assert_array_equal(bank.neighbors, expected)
    index = faiss.read_index(str(path / "index.faiss"))
    assert index.ntotal == 200

    ids = torch.tensor([3, 150])
    x = torch.from_numpy(latents[[3, 150]])
    cands = KNNCandidates(bank, k=3)(
        FlowBatch(
            x=x,
            class_labels=torch.from_numpy(labels[[3, 150]]),
            sample_ids=ids,
            image_embeds=torch.from_numpy(embeds[[3, 150]]),
        )
    )
    assert cands.endpoints.shape == (2, 4, 2, 3, 3) and cands.self_index.tolist() == [0, 0]
    assert torch.equal(cands.endpoints[:, 0], x)
    assert torch.equal(cands.endpoints[1, 1:], torch.from_numpy(latents[expected[150, :3]]))
    assert cands.labels[1, 1:].tolist() == labels[expected[150, :3]].tolist()
    assert torch.equal(cands.image_embeds[0, 1:], torch.from_numpy(embeds[expected[3, :3]]))


def test_per_class_neighbours_stay_in_class(tmp_path):
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((120, 4)).astype(np.float32)
    labels = np.repeat(np.arange(3), 40)
    bank = KNNBank(build_knn_bank(tmp_path / "bank", latents, k=4, labels=labels, per_class=True, backend="torch"))
    assert (labels[bank.neighbors] == labels[:, None]).all()
    assert (bank.neighbors != np.arange(120)[:, None]).all()


def test_bank_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_knn_index.py"):
        KNNBank(tmp_path / "missing")
    bad = np.zeros((10, 3), dtype=np.float32)
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf at rows \[4\]"):
        build_knn_bank(tmp_path / "b", bad, k=2)
    bank = KNNBank(build_knn_bank(tmp_path / "ok", np.random.rand(10, 3).astype(np.float32), k=2))
    with pytest.raises(ValueError, match="stores only 2"):
        KNNCandidates(bank, k=5)
    with pytest.raises(ValueError, match="sample_ids"):
        KNNCandidates(bank)(FlowBatch(x=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="unknown kNN backend"):
        build_knn_bank(tmp_path / "b", np.random.rand(10, 3).astype(np.float32), k=2, backend="annoy")
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        bank.lookup(torch.tensor([10]), 2)
