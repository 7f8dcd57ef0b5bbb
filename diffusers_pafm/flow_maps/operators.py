"""Linear degradation operators y = A x + sigma eta for inverse problems, batched, with seeded randomness.

Each operator is built for a batch (``build_operator(name, x_shape, generator)``) and holds its per-sample random
parameters (masks, boxes, blur kernels). It provides ``A`` (``__call__``), the exact adjoint ``transpose`` (so that
<A x, y> = <x, A^T y>) and ``pseudo_inverse``: an image-space view of y used as the noise adapter's input and for
display (masked image, nearest-upsampled low-res image, the blurred image itself).

Registry (``OPERATORS``): denoise, random_inpaint, box_inpaint, super_resolution_2x, super_resolution_4x,
gaussian_blur, motion_blur. Blurs use circular padding, which keeps the adjoint exact.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["DegradationOperator", "OPERATORS", "build_operator", "MatrixOperator", "Measurement"]


class DegradationOperator:
    """Base class: identity (denoising). Subclasses override ``__call__`` / ``transpose`` / ``pseudo_inverse``."""

    name = "denoise"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.transpose(y)

    def to(self, device) -> "DegradationOperator":
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device))
        return self

    def select(self, index: torch.Tensor) -> "DegradationOperator":
        """The operator restricted to the samples ``index`` (per-sample parameters are indexed)."""
        new = object.__new__(type(self))
        for key, value in vars(self).items():
            setattr(new, key, value[index] if isinstance(value, torch.Tensor) and value.ndim >= 1 else value)
        return new


class MaskOperator(DegradationOperator):
    """y = m * x with a per-sample binary mask (1 = observed), shared across channels."""

    def __init__(self, mask: torch.Tensor, name: str):
        self.mask, self.name = mask, name

    def __call__(self, x):
        return self.mask.to(x.dtype) * x

    def transpose(self, y):
        return self.mask.to(y.dtype) * y


def _random_inpaint(shape, generator) -> DegradationOperator:
    b, _, h, w = shape
    missing = 0.3 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    mask = (torch.rand(b, 1, h, w, generator=generator) >= missing).float()
    return MaskOperator(mask, "random_inpaint")


def _box_inpaint(shape, generator) -> DegradationOperator:
    b, _, h, w = shape
    mask = torch.ones(b, 1, h, w)
    for i in range(b):  # box side in [h/4, h/2), inside a margin of h/16
        bh, bw = (int(s // 4 + torch.randint(max(s // 4, 1), (1,), generator=generator)) for s in (h, w))
        top = int(torch.randint(h // 16, max(h - h // 16 - bh, h // 16 + 1), (1,), generator=generator))
        left = int(torch.randint(w // 16, max(w - w // 16 - bw, w // 16 + 1), (1,), generator=generator))
        mask[i, :, top : top + bh, left : left + bw] = 0
    return MaskOperator(mask, "box_inpaint")


class SuperResolution(DegradationOperator):
    """y = avg_pool_k(x); transpose = nearest upsampling / k^2 (exact adjoint); pseudo-inverse = nearest."""

    def __init__(self, factor: int):
        self.factor, self.name = factor, f"super_resolution_{factor}x"

    def __call__(self, x):
        return F.avg_pool2d(x, self.factor)

    def transpose(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2

    def pseudo_inverse(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")


class Blur(DegradationOperator):
    """y = k * x (per-sample kernel [B, s, s], circular padding); the adjoint correlates with the flipped kernel."""

    def __init__(self, kernel: torch.Tensor, name: str):
        self.kernel, self.name = kernel, name

    def _conv(self, x, kernel):
        b, c, h, w = x.shape
        s = kernel.shape[-1]
        padded = F.pad(x.reshape(1, b * c, h, w), (s // 2,) * 4, mode="circular")
        weight = kernel.to(x.dtype).repeat_interleave(c, 0).unsqueeze(1)  # [B*C, 1, s, s]
        return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)

    def __call__(self, x):
        return self._conv(x, self.kernel.flip(-1, -2))  # conv2d correlates: flip for a true convolution

    def transpose(self, y):
        return self._conv(y, self.kernel)

    def pseudo_inverse(self, y):
        return y


def _gaussian_kernel(size: int, std: float) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(ax**2) / (2 * std**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def _gaussian_blur(shape, generator, size: int | None = None, std: float | None = None) -> DegradationOperator:
    h = shape[-1]
    size = size or (h // 4) * 2 + 1  # 61x61 / std 3 at 256 px scales to 9x9 / std ~0.4 at 32 px; keep it visible
    std = std or max(h / 32, 1.0)
    return Blur(_gaussian_kernel(size, std).expand(shape[0], size, size).clone(), "gaussian_blur")


def _motion_blur(shape, generator, size: int | None = None) -> DegradationOperator:
    """A random straight motion streak per sample (angle uniform, length size), normalised to sum 1."""
    h = shape[-1]
    size = size or (h // 4) * 2 + 1
    kernels = torch.zeros(shape[0], size, size)
    steps = torch.linspace(-(size // 2), size // 2, 4 * size)
    for i in range(shape[0]):
        angle = float(torch.rand(1, generator=generator)) * math.pi
        xs = (steps * math.cos(angle)).round().long() + size // 2
        ys = (steps * math.sin(angle)).round().long() + size // 2
        kernels[i, ys, xs] = 1.0
    return Blur(kernels / kernels.sum((1, 2), keepdim=True), "motion_blur")


OPERATORS: dict[str, Callable[..., DegradationOperator]] = {
    "denoise": lambda shape, generator: DegradationOperator(),
    "random_inpaint": _random_inpaint,
    "box_inpaint": _box_inpaint,
    "super_resolution_2x": lambda shape, generator: SuperResolution(2),
    "super_resolution_4x": lambda shape, generator: SuperResolution(4),
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
}


def build_operator(
    name: str, shape: tuple[int, ...], generator: torch.Generator | None = None, **kwargs
) -> DegradationOperator:
    """The operator ``name`` for images of ``shape`` [B, C, H, W], its randomness drawn from ``generator``."""
    if name not in OPERATORS:
        raise ValueError(f"unknown degradation {name!r}; choose one of {sorted(OPERATORS)}")
    return OPERATORS[name](tuple(shape), generator, **kwargs)


class MatrixOperator(DegradationOperator):
    """y = x H^T for vectors x [B, d] and a fixed matrix H [m, d] (e.g. observe the first coordinate)."""

    def __init__(self, matrix: torch.Tensor, name: str = "linear"):
        self.matrix, self.name = matrix, name

    def __call__(self, x):
        return x @ self.matrix.to(x.dtype).T

    def transpose(self, y):
        return y @ self.matrix.to(y.dtype)

    def select(self, index):
        return self


class Measurement:
    """Observations y_i = A_i x_i + sigma eta_i of a batch whose samples may use different operators (task groups).

    ``groups`` is a list of (sample indices, operator restricted to them, y of those samples).
    """

    def __init__(self, batch_size: int, groups: list[tuple[torch.Tensor, DegradationOperator, torch.Tensor]]):
        self.batch_size, self.groups = batch_size, groups

    @classmethod
    def simulate(
        cls,
        x: torch.Tensor,
        task_ids: torch.Tensor,
        tasks: list[str] | list[DegradationOperator],
        sigma: float,
        generator: torch.Generator | None = None,
    ) -> "Measurement":
        """Draw operators (task ``tasks[task_ids[i]]`` for sample i) and noisy observations of ``x``."""
        groups = []
        for task in task_ids.unique().tolist():
            index = (task_ids == task).nonzero().flatten()
            spec = tasks[task]
            op = (
                spec.select(index)
                if isinstance(spec, DegradationOperator)
                else build_operator(spec, (len(index), *x.shape[1:]), generator)
            )
            op = op.to(x.device)
            clean = op(x[index])
            noise = torch.randn(clean.shape, generator=generator, device=generator.device if generator else "cpu")
            groups.append((index, op, clean + sigma * noise.to(clean.device, clean.dtype)))
        return cls(x.shape[0], groups)

    def residual(self, x_hat: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """[B] (y - A x_hat)^2 per sample: the mean over measurement dimensions, or their ``"sum"``."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        rows = torch.empty(self.batch_size, device=x_hat.device, dtype=torch.float32)
        for index, op, y in self.groups:
            squares = (y - op(x_hat[index])).float().pow(2).flatten(1)
            rows[index] = squares.sum(1) if reduction == "sum" else squares.mean(1)
        return rows

    def pseudo_inverse(self, like: torch.Tensor) -> torch.Tensor:
        """The image-space view A^+ y of every sample (the noise adapter's input), shaped like ``like``."""
        out = torch.empty_like(like)
        for index, op, y in self.groups:
            out[index] = op.pseudo_inverse(y).to(out.dtype)
        return out
