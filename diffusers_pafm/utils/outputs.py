"""The base of every loss output: tensors with a ``scalars()`` view for logging."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["LossOutput"]


@dataclass
class LossOutput:
    """A loss and its diagnostics; ``scalars()`` gives the batch mean of every tensor field as a float."""

    loss: torch.Tensor

    def scalars(self) -> dict[str, float]:
        return {
            f.name: float(getattr(self, f.name).detach().float().mean())
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
