"""Condition likelihoods log p(y_i | z_j): the second factor of PAFM's posterior weights.

Each returns a ``[B, K]`` fp32 matrix (``-inf`` masks a candidate) or ``None`` (no condition term). Rows whose
condition was dropped for classifier-free guidance (``FlowBatch.null_mask``, or the null class id) get 0: the path
likelihood alone decides their weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import CandidateSet, FlowBatch

__all__ = ["NoCondition", "ClassMatch", "CLIPLikelihood"]


def _null_rows(batch: FlowBatch, null_class_id: int | None = None) -> torch.Tensor:
    null = torch.zeros(batch.x.shape[0], dtype=torch.bool, device=batch.x.device)
    if batch.null_mask is not None:
        null = null | batch.null_mask.to(null.device)
    if null_class_id is not None and batch.class_labels is not None:
        null = null | (batch.class_labels == null_class_id)
    return null


def _broadcast(values: torch.Tensor, candidates: CandidateSet, batch_size: int) -> torch.Tensor:
    """Candidate attribute as [B, K, ...] whether it is shared ([K, ...]) or per query ([B, K, ...])."""
    return values if candidates.per_query else values.unsqueeze(0).expand(batch_size, *values.shape)


class NoCondition(nn.Module):
    """p(y | z) = const: the weights follow the path likelihood alone (STF / EFM / unconditional)."""

    def forward(self, batch: FlowBatch, candidates: CandidateSet) -> torch.Tensor | None:
        return None


class ClassMatch(nn.Module):
    """log p(y_i | z_j) = 0 if class(z_j) = y_i else -inf (ImageNet-style PAFM, StableVM)."""

    def __init__(self, null_class_id: int | None = None):
        super().__init__()
        self.null_class_id = null_class_id

    def forward(self, batch: FlowBatch, candidates: CandidateSet) -> torch.Tensor:
        if batch.class_labels is None or candidates.labels is None:
            raise ValueError("the class-match likelihood needs class_labels for the batch and its candidates")
        b = batch.x.shape[0]
        match = _broadcast(candidates.labels, candidates, b) == batch.class_labels.unsqueeze(1)
        log_p = torch.zeros(match.shape, dtype=torch.float32, device=match.device).masked_fill_(~match, float("-inf"))
        return log_p.masked_fill_(_null_rows(batch, self.null_class_id).unsqueeze(1), 0.0)


class CLIPLikelihood(nn.Module):
    """log p(y_i | z_j) = cos(text_emb(caption_i), image_emb(image_j)) / temperature.

    Embeddings come from an open_clip model and are precomputed for the dataset (``FlowBatch.text_embeds`` for
    the queries, candidate ``image_embeds``). The default temperature 0.01 is CLIP's trained logit scale of 100.
    The z-dependent normaliser of p(y | z) is ignored (it would need all captions).
    """

    def __init__(self, temperature: float = 0.01):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CLIP likelihood temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, batch: FlowBatch, candidates: CandidateSet) -> torch.Tensor:
        if batch.text_embeds is None or candidates.image_embeds is None:
            raise ValueError(
                "the CLIP likelihood needs text_embeds for the batch and image_embeds for the candidates "
                "(precompute them with an open_clip model, see diffusers_pafm.models.clip)"
            )
        text = F.normalize(batch.text_embeds.float(), dim=-1)
        images = F.normalize(_broadcast(candidates.image_embeds, candidates, text.shape[0]).float(), dim=-1)
        log_p = torch.einsum("be,bke->bk", text, images) / self.temperature
        return log_p.masked_fill_(_null_rows(batch).unsqueeze(1), 0.0)
