"""One adapter for calling any diffusers transformer as a velocity field v_theta(x_t, t, condition).

It converts time (diffusers transformers take ``timestep = 1000 * t``), passes class labels or text embeddings
under their diffusers names, asks for ``return_dict=False`` and drops learned-sigma output channels. Class labels go
to the transformer only if its ``forward`` takes them (an MMDiT trained with caption-as-class PAFM gets labels for
the condition likelihood alone). It also switches off DiT's built-in label dropout: ``DiTTransformer2DModel`` drops
labels independently inside every block with a hard-coded probability 0.1 in train mode, whereas classifier-free-
guidance dropout belongs in the objective.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.embeddings import LabelEmbedding

from ..paths import TIMESTEP_SCALE, to_timestep

__all__ = ["VelocityModel", "disable_label_dropout", "null_class_id"]


def disable_label_dropout(transformer: torch.nn.Module) -> int:
    """Set ``dropout_prob = 0`` on every diffusers ``LabelEmbedding``; returns how many were changed."""
    changed = 0
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding) and module.dropout_prob > 0:
            module.dropout_prob = 0.0
            changed += 1
    return changed


def null_class_id(transformer: torch.nn.Module) -> int | None:
    """The label id of the null (unconditional) class: ``num_embeds_ada_norm`` for DiT, else ``None``."""
    config = getattr(getattr(transformer, "module", transformer), "config", None)
    return None if config is None else config.get("num_embeds_ada_norm")


class VelocityModel:
    """Callable ``v = model(x_t, t, class_labels=None, **conditioning)`` around a (possibly wrapped) transformer."""

    def __init__(self, transformer: torch.nn.Module, timestep_scale: float = TIMESTEP_SCALE):
        self.transformer = transformer
        self.timestep_scale = timestep_scale
        disable_label_dropout(transformer)
        module = getattr(transformer, "module", transformer)  # DDP / accelerate wrappers
        self.takes_class_labels = "class_labels" in inspect.signature(module.forward).parameters

    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None, **conditioning
    ) -> torch.Tensor:
        kwargs = dict(conditioning)
        if class_labels is not None and self.takes_class_labels:
            kwargs["class_labels"] = class_labels
        out = self.transformer(
            hidden_states=x_t, timestep=to_timestep(t, self.timestep_scale), return_dict=False, **kwargs
        )[0]
        if out.shape[1] != x_t.shape[1]:  # DiT with learned sigma: keep the velocity channels
            out = out[:, : x_t.shape[1]]
        return out
