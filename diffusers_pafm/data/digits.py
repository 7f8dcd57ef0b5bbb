"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), upsampled, as a class-conditional image set."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits_tensors(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, resolution, resolution] in [-1, 1] (bilinear upsampling of the 0..16 grey levels), labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).contiguous(), torch.tensor(digits.target, dtype=torch.long)
