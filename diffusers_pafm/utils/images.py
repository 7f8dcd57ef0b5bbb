"""Tensor <-> PIL conversions and image grids shared by the pipelines, the trainers and the evaluation."""

from __future__ import annotations

import torch
from PIL import Image

__all__ = ["density_image", "image_grid", "to_pil"]


def to_pil(x: torch.Tensor) -> Image.Image:
    """One [C, H, W] image in [-1, 1] as an 8-bit PIL image (mode L for one channel, RGB for three)."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def image_grid(images: list[Image.Image], rows: int, cols: int, scale: int = 1, gap: int = 0) -> Image.Image:
    """Paste ``rows * cols`` equally sized PIL images into one grid (upscaled by ``scale``, nearest), ``gap`` white
    pixels between tiles."""
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    white = 255 if images[0].mode == "L" else (255,) * len(images[0].getbands())
    grid = Image.new(images[0].mode, (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), white)
    for i, im in enumerate(images[: rows * cols]):
        tile = im if scale == 1 else im.resize((w, h), Image.NEAREST)
        grid.paste(tile, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return grid


def density_image(points: torch.Tensor, size: int = 96, span: float = 2.5) -> Image.Image:
    """A 2-D histogram of ``points`` [N, 2] on [-span, span]^2 as a ``size`` x ``size`` greyscale image (dark =
    dense, square-root scale; x to the right, y up)."""
    hist = torch.histogramdd(points.detach().float().cpu(), bins=[size, size], range=[-span, span, -span, span]).hist
    hist = (hist / hist.max().clamp(min=1)).sqrt()
    return Image.fromarray((255 * (1 - hist.T.flip(0))).byte().numpy(), mode="L")
