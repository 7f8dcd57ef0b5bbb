"""Natural-image patches cropped from scikit-image's bundled photographs (label = source photograph)."""

from __future__ import annotations

import numpy as np
from PIL import Image

NATURAL_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
)


def make_patches(
    num_samples: int, resolution: int = 32, seed: int = 0, crop: int | None = None, images=NATURAL_IMAGES
) -> tuple[list[Image.Image], list[int]]:
    """``num_samples`` random ``crop``-pixel RGB crops (default 2 x resolution), resized to ``resolution``."""
    import skimage.data

    crop = crop or 2 * resolution
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in images]
    rng = np.random.default_rng(seed)
    patches, labels = [], []
    for _ in range(num_samples):
        label = int(rng.integers(len(photos)))
        photo = photos[label]
        left = int(rng.integers(photo.width - crop + 1))
        top = int(rng.integers(photo.height - crop + 1))
        patch = photo.crop((left, top, left + crop, top + crop)).resize((resolution, resolution), Image.BICUBIC)
        patches.append(patch)
        labels.append(label)
    return patches, labels
