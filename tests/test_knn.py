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


def test_neighbours_gathered_in_the_loader_give_the_candidates_of_the_in_step_lookup(tmp_path):
    from diffusers_pafm import EncodedDataset, KNNLookup, KNNNeighbourDataset

    rng = np.random.default_rng(3)
    latents = rng.standard_normal((40, 2, 3, 3)).astype(np.float32)
    labels, embeds = rng.integers(0, 4, 40), rng.standard_normal((40, 5)).astype(np.float32)
    bank = KNNBank(build_knn_bank(tmp_path / "bank", latents, k=5, labels=labels, image_embeds=embeds))
    dataset = EncodedDataset(latents, class_labels=labels, clip_image=embeds, meta={"num_classes": 4})
    source = KNNCandidates(bank, k=3)
    wrapped = source.loader_dataset(dataset)
    assert isinstance(wrapped, KNNNeighbourDataset) and len(wrapped) == 40 and wrapped.num_classes == 4
    order = [[7, 0, 39, 12], [5, 5, 21, 30]]  # a repeated sample too
    loader = torch.utils.data.DataLoader(wrapped, batch_sampler=order, num_workers=1)
    for ids, batch in zip(order, loader):
        assert batch["knn_latents"].shape == (4, 3, 2, 3, 3)
        np.testing.assert_array_equal(batch["knn_latents"].numpy(), latents[bank.neighbors[ids, :3]])

        def flow_batch(neighbours):
            return FlowBatch(
                x=batch["x"],
                class_labels=batch["class_labels"],
                image_embeds=batch["clip_image"],
                sample_ids=batch["sample_ids"],
                neighbours=neighbours,
            )

        from_loader, in_step = source(flow_batch(KNNLookup.from_batch(batch))), source(flow_batch(None))
        assert torch.equal(from_loader.endpoints, in_step.endpoints)
        assert torch.equal(from_loader.labels, in_step.labels)
        assert torch.equal(from_loader.image_embeds, in_step.image_embeds)
    fewer = KNNLookup.from_batch(next(iter(loader)))
    with pytest.raises(ValueError, match="carries 3 neighbours per sample, fewer than k=4"):
        KNNCandidates(bank, k=4)(FlowBatch(x=torch.zeros(4, 2, 3, 3), neighbours=fewer))
    with pytest.raises(ValueError, match=r"k must lie in \[1, 5\]"):
        KNNNeighbourDataset(dataset, bank, k=6)
