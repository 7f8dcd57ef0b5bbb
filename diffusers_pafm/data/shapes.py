"""Procedurally drawn captioned shapes ("a small red circle at the top left"): an offline text-to-image set."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZES = {"small": 0.22, "large": 0.4}
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}


def draw_shape(size: str, color: str, shape: str, position: str, resolution: int = 32) -> Image.Image:
    """One RGB image of the described shape on a dark grey background."""
    image = Image.new("RGB", (resolution, resolution), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    cx, cy = (c * resolution for c in POSITIONS[position])
    r = SIZES[size] * resolution / 2 * 1.6
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image


def make_shapes(num_samples: int, resolution: int = 32, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """``num_samples`` random (image, caption) pairs; captions read "a {size} {color} {shape} at the {position}"."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(num_samples):
        size = rng.choice(list(SIZES))
        color = rng.choice(list(COLORS))
        shape = rng.choice(SHAPES)
        position = rng.choice(list(POSITIONS))
        images.append(draw_shape(size, color, shape, position, resolution))
        captions.append(f"a {size} {color} {shape} at the {position}")
    return images, captions
