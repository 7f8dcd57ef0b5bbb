"""Procedurally drawn captioned shapes ("a small red circle at the top left"): an offline text-to-image set.

Like real captions, a caption does not fix the image: each draw jitters the centre (up to ``jitter`` of the image
size), the size (up to ``jitter`` relative) and the brightness of the colour, so same-caption images differ and
a likelihood that compares captions with images has something to weigh.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZES = {"small": 0.22, "large": 0.4}
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}


ATTRIBUTES = (tuple(SIZES), tuple(COLORS), SHAPES, tuple(POSITIONS))
"""The caption's four slots, in order: size, colour, shape, position."""


def draw_shape(
    size: str,
    color: str,
    shape: str,
    position: str,
    resolution: int = 32,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    brightness: float = 1.0,
) -> Image.Image:
    """One RGB image of the described shape on a dark grey background (``offset`` in image widths)."""
    image = Image.new("RGB", (resolution, resolution), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    cx, cy = ((c + o) * resolution for c, o in zip(POSITIONS[position], offset))
    r = SIZES[size] * resolution / 2 * 1.6 * scale
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = tuple(int(min(255, c * brightness)) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def make_shapes(
    num_samples: int, resolution: int = 32, seed: int = 0, jitter: float = 0.06
) -> tuple[list[Image.Image], list[str]]:
    """``num_samples`` random (image, caption) pairs; captions read "a {size} {color} {shape} at the {position}".

    ``jitter`` = 0 draws every caption as one fixed image.
    """
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(num_samples):
        size, color, shape, position = (str(rng.choice(values)) for values in ATTRIBUTES)
        offset = tuple(rng.uniform(-jitter, jitter, 2))
        scale = 1 + rng.uniform(-2 * jitter, 2 * jitter)
        brightness = 1 + rng.uniform(-2 * jitter, 2 * jitter)
        images.append(draw_shape(size, color, shape, position, resolution, offset, scale, brightness))
        captions.append(f"a {size} {color} {shape} at the {position}")
    return images, captions


def caption_attributes(captions: list[str]) -> torch.Tensor:
    """[N, 4] attribute ids (size, colour, shape, position; indices into :data:`ATTRIBUTES`) parsed from captions."""
    rows = []
    for caption in captions:
        words = caption.split()
        if len(words) < 7 or words[0] != "a" or words[4:6] != ["at", "the"]:
            raise ValueError(f"not a shapes caption: {caption!r}")
        values = (words[1], words[2], words[3], " ".join(words[6:]))
        try:
            rows.append([options.index(v) for options, v in zip(ATTRIBUTES, values)])
        except ValueError as err:
            raise ValueError(f"unknown attribute in shapes caption {caption!r}") from err
    return torch.tensor(rows, dtype=torch.long)
