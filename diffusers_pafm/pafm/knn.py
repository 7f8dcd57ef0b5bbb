"""Offline k-nearest-neighbour bank for PAFM's kNN candidate source.

Built once (``training/build_knn_index.py`` or :func:`build_knn_bank`), used read-only during training::

    <bank>/latents.npy        [N, ...] float16/32, memory-mapped at training time
    <bank>/neighbors.npy      [N, k] int64, the k nearest other samples of every sample
    <bank>/labels.npy         [N] int64 (optional)       <bank>/image_embeds.npy  [N, E] (optional, CLIP)
    <bank>/index.faiss        the faiss index over the search features (for new queries)
    <bank>/meta.json          shapes, metric, k, backend

Search uses faiss (``faiss-cpu``, or ``faiss-gpu`` on all visible GPUs) and falls back to a chunked ``torch.mm`` +
``topk`` when faiss is not installed; both return the same neighbours. Training only looks neighbour lists up,
in the data loader (:class:`KNNNeighbourDataset` adds each item's neighbours, so ``--dataloader_num_workers``
overlaps the gather with the step) or, for batches built by hand, in the step (:meth:`KNNBank.lookup`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "nearest_neighbors",
    "build_knn_bank",
    "KNNBank",
    "KNNLookup",
    "KNNNeighbourDataset",
    "faiss_available",
]

METRICS = ("l2", "ip")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, metric: str) -> str:
    """Validate ``metric`` and turn ``backend`` ("auto", "faiss", "torch") into "faiss" or "torch"."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend not in ("faiss", "torch"):
        raise ValueError(f"unknown kNN backend {backend!r}; choose 'auto', 'faiss' or 'torch'")
    return backend


def _faiss_index(database: np.ndarray, metric: str, index_factory: str):
    """A faiss index over ``database`` (on every visible GPU when faiss-gpu sees one); returns (index, on_gpu)."""
    import faiss

    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(database.shape[1], index_factory, faiss_metric)
    on_gpu = faiss.get_num_gpus() > 0
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        index.train(database)
    index.add(database)
    return index, on_gpu


def _torch_search(database: np.ndarray, queries: np.ndarray, k: int, metric: str, chunk_size: int = 4096):
    db = torch.from_numpy(database)
    db_sq = db.pow(2).sum(1)
    all_scores, all_ids = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = torch.from_numpy(queries[start : start + chunk_size])
        dots = q @ db.T
        if metric == "l2":
            scores, ids = torch.topk(-(q.pow(2).sum(1, keepdim=True) - 2 * dots + db_sq), k, dim=1)
            scores = -scores
        else:
            scores, ids = torch.topk(dots, k, dim=1)
        all_scores.append(scores)
        all_ids.append(ids)
    return torch.cat(all_scores).numpy(), torch.cat(all_ids).numpy()


def nearest_neighbors(
    database: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    metric: str = "l2",
    backend: str = "auto",
    index_factory: str = "Flat",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database rows of each query: (scores [Q, k], ids [Q, k]), best first.

    ``metric`` "l2" returns squared distances (ascending), "ip" inner products (descending; use L2-normalised
    features for cosine). ``backend`` is "faiss", "torch" or "auto" (faiss when installed).
    """
    backend = _resolve_backend(backend, metric)
    database = np.ascontiguousarray(np.asarray(database, dtype=np.float32).reshape(len(database), -1))
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(len(queries), -1))
    if k > database.shape[0]:
        raise ValueError(f"k={k} exceeds the {database.shape[0]} database rows")
    if backend == "faiss":
        scores, ids = _faiss_index(database, metric, index_factory)[0].search(queries, k)
        return scores, ids.astype(np.int64)
    return _torch_search(database, queries, k, metric)


def _exclude_self(ids: np.ndarray, k: int) -> np.ndarray:
    """Drop each row's own index from its k + 1 neighbours (or the last one if it was not returned)."""
    is_self = ids == np.arange(ids.shape[0])[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # own index last, the others in rank order
    return np.take_along_axis(ids, order, axis=1)[:, :k].astype(np.int64)


def build_knn_bank(
    output_dir: str | os.PathLike,
    latents: np.ndarray | torch.Tensor,
    k: int = 16,
    labels: np.ndarray | torch.Tensor | None = None,
    image_embeds: np.ndarray | torch.Tensor | None = None,
    features: np.ndarray | torch.Tensor | None = None,
    metric: str = "l2",
    backend: str = "auto",
    index_factory: str = "Flat",
    per_class: bool = False,
    latent_dtype: str = "float32",
) -> Path:
    """Write a kNN bank (layout in the module docstring) atomically to ``output_dir``.

    Neighbours are searched in ``features`` (default: the flattened latents). With ``per_class`` each sample's
    neighbours are restricted to its own class (needs ``labels``). The folder appears only once complete.
    """
    latents = np.asarray(latents.cpu() if isinstance(latents, torch.Tensor) else latents)
    n = latents.shape[0]
    if not np.isfinite(latents).all():
        bad = np.flatnonzero(~np.isfinite(latents.reshape(n, -1)).all(1))
        raise ValueError(f"latents contain NaN/inf at rows {bad[:10].tolist()}; refusing to build a kNN bank")
    feats = latents.reshape(n, -1) if features is None else np.asarray(features).reshape(n, -1)
    if feats.shape[0] != n:
        raise ValueError(f"features have {feats.shape[0]} rows but latents have {n}")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64).reshape(n)
    if per_class and labels is None:
        raise ValueError("per_class kNN needs labels")
    if k >= n:
        raise ValueError(f"k={k} neighbours need more than {n} samples")

    backend = _resolve_backend(backend, metric)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    index = on_gpu = None
    if per_class:
        neighbors = np.empty((n, k), dtype=np.int64)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if len(members) <= k:
                raise ValueError(f"class {c} has {len(members)} samples, fewer than k + 1 = {k + 1}")
            _, ids = nearest_neighbors(feats[members], feats[members], k + 1, metric, backend, index_factory)
            neighbors[members] = members[_exclude_self(ids, k)]
    elif backend == "faiss":
        index, on_gpu = _faiss_index(feats, metric, index_factory)
        neighbors = _exclude_self(index.search(feats, k + 1)[1], k)
    else:
        neighbors = _exclude_self(nearest_neighbors(feats, feats, k + 1, metric, "torch")[1], k)

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        np.save(tmp / "latents.npy", latents.astype(latent_dtype))
        np.save(tmp / "neighbors.npy", neighbors)
        if labels is not None:
            np.save(tmp / "labels.npy", labels)
        if image_embeds is not None:
            embeds = np.asarray(image_embeds.cpu() if isinstance(image_embeds, torch.Tensor) else image_embeds)
            np.save(tmp / "image_embeds.npy", embeds.astype(np.float32))
        if backend == "faiss":
            import faiss

            if index is None:  # per-class search: the saved index still covers every sample
                index, on_gpu = _faiss_index(feats, metric, index_factory)
            if on_gpu:
                index = faiss.index_gpu_to_cpu(index)
            faiss.write_index(index, str(tmp / "index.faiss"))
        meta = {
            "num_samples": n,
            "sample_shape": list(latents.shape[1:]),
            "k": k,
            "metric": metric,
            "backend": backend,
            "per_class": per_class,
            "features": "latents" if features is None else "custom",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output_dir


@dataclass
class KNNLookup:
    latents: torch.Tensor
    """[B, k, ...]"""
    labels: torch.Tensor | None
    """[B, k]"""
    image_embeds: torch.Tensor | None
    """[B, k, E]"""

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> KNNLookup | None:
        """The neighbours a :class:`KNNNeighbourDataset` put in a data-loader batch, or None."""
        if "knn_latents" not in batch:
            return None
        return cls(batch["knn_latents"], batch.get("knn_labels"), batch.get("knn_image_embeds"))


class KNNBank:
    """Read-only view of a bank written by :func:`build_knn_bank`; latents stay memory-mapped on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"no kNN bank at {self.path} (missing meta.json); build one with "
                f"`python training/build_knn_index.py --latents <latents.npy> --output_dir {self.path}`"
            )
        self.meta = json.loads(meta_file.read_text())
        self.latents = np.load(self.path / "latents.npy", mmap_mode="r", allow_pickle=False)
        self.neighbors = np.load(self.path / "neighbors.npy", allow_pickle=False)
        self.labels = self._optional("labels.npy")
        self.image_embeds = self._optional("image_embeds.npy")
        if self.neighbors.shape[0] != self.latents.shape[0]:
            raise ValueError(f"corrupt kNN bank at {self.path}: neighbours and latents disagree on N")

    def _optional(self, name: str) -> np.ndarray | None:
        f = self.path / name
        return np.load(f, allow_pickle=False) if f.is_file() else None

    @property
    def k(self) -> int:
        return int(self.neighbors.shape[1])

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def lookup(self, sample_ids: torch.Tensor, k: int, device: torch.device | str = "cpu") -> KNNLookup:
        ids = sample_ids.detach().cpu().numpy().astype(np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= len(self):
            raise IndexError(f"sample ids must lie in [0, {len(self)}) for the kNN bank at {self.path}")
        nbr = self.neighbors[ids, :k]  # [B, k]
        flat = nbr.reshape(-1)
        order = np.argsort(flat, kind="stable")  # sorted reads are kinder to the memory map
        gathered = np.empty((flat.size,) + self.latents.shape[1:], dtype=np.float32)
        gathered[order] = self.latents[flat[order]]
        latents = torch.from_numpy(gathered).reshape(nbr.shape + self.latents.shape[1:]).to(device)
        labels = None if self.labels is None else torch.from_numpy(self.labels[nbr]).to(device)
        embeds = None if self.image_embeds is None else torch.from_numpy(self.image_embeds[nbr]).to(device)
        return KNNLookup(latents, labels, embeds)


class KNNNeighbourDataset(torch.utils.data.Dataset):
    """``dataset`` with each item's ``k`` neighbours from ``bank`` added: ``knn_latents`` [k, ...] (and ``knn_labels``
    [k], ``knn_image_embeds`` [k, E] when the bank has them), in the bank's neighbour order.

    The gather runs where the item is read - in the data loader's workers, overlapped with the training step - and
    :class:`~.candidates.KNNCandidates` takes the neighbours from the batch (:meth:`KNNLookup.from_batch`) instead of
    reading the memory map in the step. Items must carry ``sample_ids``, the index the bank was built over.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, bank: KNNBank, k: int):
        if len(bank) != len(dataset):
            raise ValueError(
                f"the kNN bank at {bank.path} holds {len(bank)} samples but the dataset has {len(dataset)}"
            )
        if not 1 <= k <= bank.k:
            raise ValueError(f"k must lie in [1, {bank.k}] for the kNN bank at {bank.path}, got {k}")
        self.dataset, self.bank, self.k = dataset, bank, k

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (meta, captions, ...)
        if name in ("dataset", "bank", "k"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.dataset[i]
        nbr = self.bank.neighbors[int(item["sample_ids"]), : self.k]
        item["knn_latents"] = torch.from_numpy(np.asarray(self.bank.latents[nbr], dtype=np.float32))
        if self.bank.labels is not None:
            item["knn_labels"] = torch.from_numpy(self.bank.labels[nbr])
        if self.bank.image_embeds is not None:
            item["knn_image_embeds"] = torch.from_numpy(self.bank.image_embeds[nbr])
        return item
