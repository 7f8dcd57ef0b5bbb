"""Class labels from users: one parse and one range check for pipelines, adapters and candidate banks."""

from __future__ import annotations

import torch

__all__ = ["class_label_tensor"]


def class_label_tensor(
    class_labels: int | list[int] | torch.Tensor,
    num_classes: int | None,
    *,
    null_class: bool = False,
    allow_empty: bool = False,
    name: str = "class_labels",
) -> torch.Tensor:
    """``class_labels`` (an int, a list or a tensor) as a flat long tensor, each label in [0, num_classes), or in
    [0, num_classes] when ``null_class`` (label num_classes is the unconditional one); ``num_classes=None``: any
    label >= 0 (no label table to check against). Empty (unless ``allow_empty``), out-of-range or non-integral
    labels are a ValueError naming ``name``, the labels and the range: a 2.7 is never silently read as class 2."""
    labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels).flatten()
    if num_classes is None:
        accepted, top = "[0, inf)", None
    else:
        accepted = f"[0, {num_classes}] ({num_classes} = none)" if null_class else f"[0, {num_classes})"
        top = num_classes + int(null_class)
    if labels.is_floating_point() and not torch.equal(labels, labels.round()) or labels.is_complex():
        raise ValueError(f"{name} {labels.tolist()}: labels are integers in {accepted}")
    labels = labels.long()
    out_of_range = (labels < 0) if top is None else (labels < 0) | (labels >= top)
    if (labels.numel() == 0 and not allow_empty) or out_of_range.any():
        raise ValueError(f"{name} {labels.tolist()}: one or more labels in {accepted}")
    return labels
