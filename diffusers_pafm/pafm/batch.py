"""The two types PAFM's objective passes around: a training batch and the candidate endpoints of its rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .knn import KNNLookup

__all__ = ["FlowBatch", "CandidateSet"]


@dataclass
class FlowBatch:
    """What the objective knows about a training batch (all tensors have batch size B first)."""

    x: torch.Tensor
    """clean data / latents [B, ...] in the space the model sees."""
    class_labels: torch.Tensor | None = None
    """[B] long class ids."""
    text_embeds: torch.Tensor | None = None
    """[B, E] CLIP text embeddings of the captions (queries of the CLIP likelihood)."""
    image_embeds: torch.Tensor | None = None
    """[B, E] CLIP image embeddings of ``x`` (carried along with candidates)."""
    sample_ids: torch.Tensor | None = None
    """[B] dataset indices (needed by the kNN source)."""
    null_mask: torch.Tensor | None = None
    """[B] bool: the condition of this row was dropped (classifier-free guidance); path likelihood only."""
    conditioning: dict[str, torch.Tensor] | None = None
    """extra transformer kwargs of each row, e.g. an MMDiT's ``encoder_hidden_states`` / ``pooled_projections``."""
    neighbours: KNNLookup | None = None
    """kNN neighbours gathered by the data loader (:class:`~.knn.KNNNeighbourDataset`); else looked up in the step."""


@dataclass
class CandidateSet:
    """Candidate endpoints with what the condition likelihoods need to score them."""

    endpoints: torch.Tensor
    """[K, ...] shared by the batch or [B, K, ...] per query."""
    self_index: torch.Tensor
    """[B] position of each row's own endpoint along K."""
    labels: torch.Tensor | None = None
    """[K] or [B, K] class ids of the candidates (-1 = unknown)."""
    image_embeds: torch.Tensor | None = None
    """[K, E] or [B, K, E] CLIP image embeddings of the candidates."""
    valid: torch.Tensor | None = None
    """[K] or [B, K] bool; False for empty memory slots (masked with -inf)."""

    per_query: bool = False
    """True for [B, K, ...] endpoints (one set per row), False for a [K, ...] pool shared by the batch."""
    group_index: torch.Tensor | None = None
    """[B] grouped layout (class banks): ``endpoints`` is [G, K, ...] (a view of the bank, nothing gathered),
    ``labels`` / ``valid`` are [G, K], and row i is scored against its own endpoint followed by group
    ``group_index[i]``'s K endpoints - the per-query set [own, *endpoints[group_index[i]]] without building it."""

    @property
    def num_candidates(self) -> int:
        """K (1 + K in the grouped layout: the own endpoint, then the group's)."""
        if self.group_index is not None:
            return 1 + self.endpoints.shape[1]
        return self.endpoints.shape[1] if self.per_query else self.endpoints.shape[0]
