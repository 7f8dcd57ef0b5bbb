"""Candidate sources: which data endpoints z_j compete for each intermediate x_t^i.

Every source always includes each row's own endpoint (so K = 1 is plain FM and no row is ever fully masked) and
returns a :class:`CandidateSet`. Sources:

* :class:`SelfCandidates` - the own endpoint only (plain FM, K = 1).
* :class:`BatchCandidates` - the global batch: under ``accelerate`` gathered from every process (no gradient),
  optionally plus a ring buffer of earlier batches (EFM-style extra samples). Shared by the batch: ``[K, ...]``.
* :class:`ClassMemoryBank` - StableVM-style ring buffer per class (``bank_size`` latents each) and a global pool for
  condition-dropped rows. One set per query: ``[B, 1 + bank_size, ...]``.
* :class:`KNNCandidates` - precomputed nearest neighbours of each training sample from a :class:`~.knn.KNNBank`
  (latents memory-mapped on disk, neighbour lists built offline with faiss). ``[B, 1 + k, ...]``.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import gather
from torch import nn

from ..utils.labels import class_label_tensor
from .batch import CandidateSet, FlowBatch
from .knn import KNNBank, KNNLookup, KNNNeighbourDataset

__all__ = [
    "CandidateSource",
    "SelfCandidates",
    "BatchCandidates",
    "ClassMemoryBank",
    "KNNCandidates",
]


def _own_first(batch: FlowBatch, others: torch.Tensor, labels: torch.Tensor | None, embeds: torch.Tensor | None):
    """Per-query candidates with the row's own endpoint at index 0 followed by ``others`` [B, M, ...]."""
    endpoints = torch.cat([batch.x.detach().unsqueeze(1), others.to(batch.x.dtype)], dim=1)
    out_labels = None
    if labels is not None:
        own = batch.class_labels if batch.class_labels is not None else torch.full_like(labels[:, 0], -1)
        out_labels = torch.cat([own.unsqueeze(1).to(labels.dtype), labels], dim=1)
    out_embeds = None
    if embeds is not None and batch.image_embeds is not None:
        out_embeds = torch.cat([batch.image_embeds.unsqueeze(1), embeds.to(batch.image_embeds.dtype)], dim=1)
    return endpoints, out_labels, out_embeds


class CandidateSource(nn.Module):
    """Base of every candidate source: ``forward(batch) -> CandidateSet``, then ``update(batch)``, the explicit step
    :class:`~.loss.PAFMLoss` takes after the target (sources with memory push the batch; the rest do nothing)."""

    def forward(self, batch: FlowBatch) -> CandidateSet:
        raise NotImplementedError

    def update(self, batch: FlowBatch) -> None:
        """Add ``batch`` to the source's memory (no-op for memoryless sources)."""

    def loader_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """The dataset the training loader should read: ``dataset``, or a wrapper adding per-item candidates."""
        return dataset


class SelfCandidates(CandidateSource):
    """Only the own endpoint (K = 1): the posterior velocity is exactly the FM target."""

    def forward(self, batch: FlowBatch) -> CandidateSet:
        return CandidateSet(
            endpoints=batch.x.detach().unsqueeze(1),
            self_index=torch.zeros(batch.x.shape[0], dtype=torch.long, device=batch.x.device),
            labels=None if batch.class_labels is None else batch.class_labels.unsqueeze(1),
            image_embeds=None if batch.image_embeds is None else batch.image_embeds.unsqueeze(1),
            per_query=True,
        )


class _RingBuffers(nn.Module):
    """``slots`` ring buffers of ``size`` samples each, kept as buffers so they travel with ``state_dict``."""

    def __init__(self, slots: int, size: int, sample_shape: tuple[int, ...], embed_dim: int = 0):
        super().__init__()
        self.size = size
        self.register_buffer("data", torch.zeros(slots, size, *sample_shape))
        self.register_buffer("labels", torch.full((slots, size), -1, dtype=torch.long))
        self.register_buffer("embeds", torch.zeros(slots, size, embed_dim))
        self.register_buffer("pointer", torch.zeros(slots, dtype=torch.long))
        self.register_buffer("count", torch.zeros(slots, dtype=torch.long))

    @torch.no_grad()
    def push(self, slot: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None, embeds: torch.Tensor | None):
        """Append sample i to ring buffer ``slot[i]`` (in order; only the last ``size`` per slot survive)."""
        if tuple(x.shape[1:]) != tuple(self.data.shape[2:]):
            raise ValueError(
                f"memory bank holds samples of shape {tuple(self.data.shape[2:])}, got {tuple(x.shape[1:])}"
            )
        slot = slot.to(self.pointer.device).long()
        counts = torch.bincount(slot, minlength=self.pointer.shape[0])
        order = torch.argsort(slot, stable=True)
        rank = torch.empty_like(slot)
        rank[order] = torch.arange(slot.shape[0], device=slot.device) - (counts.cumsum(0) - counts)[slot[order]]
        keep = rank >= counts[slot] - self.size  # earlier samples would be overwritten within this push
        slot, position = slot[keep], (self.pointer[slot] + rank)[keep] % self.size
        self.data[slot, position] = x[keep].to(self.data.dtype)
        if labels is not None:
            self.labels[slot, position] = labels[keep].to(self.labels.device)
        if embeds is not None and self.embeds.shape[-1]:
            self.embeds[slot, position] = embeds[keep].to(self.embeds.dtype)
        self.pointer.copy_((self.pointer + counts) % self.size)
        self.count.copy_((self.count + counts).clamp(max=self.size))

    def valid(self, slot: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.size, device=self.count.device).unsqueeze(0) < self.count[slot].unsqueeze(1)


def _gather_global(batch: FlowBatch) -> tuple[FlowBatch, int]:
    """All-gather the batch across processes (no gradient); returns the global batch and this process's offset."""
    state = PartialState()
    local = batch.x.shape[0]
    if state.num_processes == 1:
        return batch, 0

    def _g(v):
        return None if v is None else gather(v.detach().contiguous())

    gathered = FlowBatch(
        x=_g(batch.x),
        class_labels=_g(batch.class_labels),
        text_embeds=None,
        image_embeds=_g(batch.image_embeds),
        sample_ids=_g(batch.sample_ids),
        null_mask=None,
    )
    if gathered.x.shape[0] != local * state.num_processes:
        raise ValueError("global candidate pools need the same batch size on every process (use drop_last=True)")
    return gathered, state.process_index * local


class BatchCandidates(CandidateSource):
    """The global batch as a shared candidate pool, optionally extended by a ring buffer of ``memory`` earlier samples.

    Under ``accelerate`` the latents (and labels / image embeddings) of every process are gathered without gradient,
    so every process scores the same pool; row i of process r finds its own endpoint at ``r * B_local + i``.
    """

    def __init__(self, memory: int = 0, sample_shape: tuple[int, ...] | None = None, embed_dim: int = 0):
        super().__init__()
        if memory and sample_shape is None:
            raise ValueError("BatchCandidates(memory > 0) needs sample_shape to allocate its ring buffer")
        self.memory = _RingBuffers(1, memory, tuple(sample_shape), embed_dim) if memory else None

    def forward(self, batch: FlowBatch) -> CandidateSet:
        pool, offset = _gather_global(batch)
        endpoints, labels, embeds = pool.x.detach(), pool.class_labels, pool.image_embeds
        valid = None
        if self.memory is not None:
            slot = torch.zeros(1, dtype=torch.long, device=endpoints.device)
            endpoints = torch.cat([endpoints, self.memory.data[0].to(endpoints.dtype)])
            labels = None if labels is None else torch.cat([labels, self.memory.labels[0]])
            if embeds is not None and self.memory.embeds.shape[-1]:
                embeds = torch.cat([embeds, self.memory.embeds[0].to(embeds.dtype)])
            valid = torch.cat(
                [torch.ones(pool.x.shape[0], dtype=torch.bool, device=endpoints.device), self.memory.valid(slot)[0]]
            )
        self_index = offset + torch.arange(batch.x.shape[0], device=batch.x.device)
        return CandidateSet(endpoints, self_index, labels, embeds, valid)

    def update(self, batch: FlowBatch) -> None:
        if self.memory is not None:
            pool, _ = _gather_global(batch)
            slots = torch.zeros(pool.x.shape[0], dtype=torch.long, device=pool.x.device)
            self.memory.push(slots, pool.x, pool.class_labels, pool.image_embeds)


class ClassMemoryBank(CandidateSource):
    """StableVM-style per-class ring buffers (``bank_size`` latents per class) plus a global pool for null rows.

    Each row is scored against its own endpoint and the bank of its class (or the global pool when its label was
    dropped), in the grouped layout of :class:`~.batch.CandidateSet` (or per-query ``[B, 1 + bank_size, ...]``
    with ``grouped=False``); empty slots are masked. The bank is filled from the
    (globally gathered) batch after each step, so all processes hold identical banks; it is part of ``state_dict``.
    """

    def __init__(self, num_classes: int, sample_shape: tuple[int, ...], bank_size: int = 256, grouped: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.grouped = grouped
        self.bank = _RingBuffers(num_classes + 1, bank_size, tuple(sample_shape))

    def _slots(self, batch: FlowBatch) -> torch.Tensor:
        if batch.class_labels is None:
            raise ValueError("ClassMemoryBank needs class_labels in the batch")
        labels = class_label_tensor(batch.class_labels, self.num_classes, null_class=True, allow_empty=True)
        slot = labels.clone()  # the batch's own tensor is not written to
        if batch.null_mask is not None:
            slot[batch.null_mask] = self.num_classes
        return slot

    def forward(self, batch: FlowBatch) -> CandidateSet:
        """Grouped by class (default): the bank itself as [C + 1, K, ...] pools and each row's slot, so the posterior
        scores every class's rows against that class's slice in place (no B x (1 + K) x D gather); with
        ``grouped=False`` the per-query set [B, 1 + K, ...] (same weights)."""
        slot = self._slots(batch)
        bank = self.bank
        if self.grouped:
            slots = torch.arange(self.num_classes + 1, device=slot.device)
            return CandidateSet(
                bank.data, torch.zeros_like(slot), bank.labels, None, bank.valid(slots), group_index=slot
            )
        endpoints, labels, _ = _own_first(batch, bank.data[slot], bank.labels[slot], None)
        own_valid = torch.ones(slot.shape[0], 1, dtype=torch.bool, device=slot.device)
        valid = torch.cat([own_valid, bank.valid(slot)], dim=1)
        self_index = torch.zeros_like(slot)
        return CandidateSet(endpoints, self_index, labels, None, valid, per_query=True)

    def update(self, batch: FlowBatch) -> None:
        pool, _ = _gather_global(batch)
        labels = pool.class_labels.long()
        real = labels < self.num_classes
        self.bank.push(labels[real], pool.x[real], labels[real], None)
        self.bank.push(torch.full_like(labels, self.num_classes), pool.x, labels, None)


class KNNCandidates(CandidateSource):
    """The own endpoint plus its ``k`` precomputed nearest neighbours from a :class:`~.knn.KNNBank`."""

    def __init__(self, bank: KNNBank, k: int | None = None):
        super().__init__()
        self.bank = bank
        self.k = bank.k if k is None else k
        if self.k > bank.k:
            raise ValueError(f"asked for k={self.k} neighbours but the bank at {bank.path} stores only {bank.k}")

    def forward(self, batch: FlowBatch) -> CandidateSet:
        found = batch.neighbours
        if found is None:
            if batch.sample_ids is None:
                raise ValueError("kNN candidates need the dataset index of every sample (FlowBatch.sample_ids)")
            found = self.bank.lookup(batch.sample_ids, self.k, device=batch.x.device)
        elif found.latents.shape[1] < self.k:
            carried = found.latents.shape[1]
            raise ValueError(f"the batch carries {carried} neighbours per sample, fewer than k={self.k}")
        elif found.latents.shape[1] > self.k:
            found = KNNLookup(*(None if v is None else v[:, : self.k] for v in vars(found).values()))
        endpoints, labels, embeds = _own_first(batch, found.latents, found.labels, found.image_embeds)
        self_index = torch.zeros(batch.x.shape[0], dtype=torch.long, device=batch.x.device)
        return CandidateSet(endpoints, self_index, labels, embeds, per_query=True)

    def update(self, batch: FlowBatch) -> None:
        pass

    def loader_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """Neighbours gathered with the batch in the data loader (overlapped with the step by its workers)."""
        return KNNNeighbourDataset(dataset, self.bank, self.k)
