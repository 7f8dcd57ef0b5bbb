"""EncodedDataset: training examples as model-ready arrays (pixels or VAE latents, labels, text and CLIP embeddings).

Saved by ``training/precompute.py`` (or :meth:`EncodedDataset.save`) as one ``.npy`` file per array and reloaded
memory-mapped, so sets larger than RAM train without re-encoding::

    <dir>/x.npy            [N, C, H, W] float: pixels in [-1, 1] ("pixel" space) or scaled VAE latents ("latent")
    <dir>/class_labels.npy [N] int64                     <dir>/text_hidden.npy  [N, L, W] text-encoder token states
    <dir>/text_pooled.npy  [N, E] pooled text embedding  <dir>/clip_text.npy / clip_image.npy  [N, E] CLIP embeddings
    <dir>/null_text_hidden.npy, null_text_pooled.npy     encodings of the empty prompt (caption dropout, CFG)
    <dir>/captions.json    the kept captions             <dir>/meta.json  space, num_classes, VAE scaling, report
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.checkpointing import atomic_directory

__all__ = ["EncodedDataset"]

ARRAYS = ("x", "class_labels", "text_hidden", "text_pooled", "clip_text", "clip_image")
NULL_ARRAYS = ("null_text_hidden", "null_text_pooled")


def _np(value):
    if value is None or isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy()


class EncodedDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded examples; item i is a dict of tensors plus ``sample_ids = i``."""

    def __init__(
        self,
        x,
        class_labels=None,
        text_hidden=None,
        text_pooled=None,
        clip_text=None,
        clip_image=None,
        null_text_hidden=None,
        null_text_pooled=None,
        captions: list[str] | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.arrays = {
            name: _np(value)
            for name, value in zip(ARRAYS, (x, class_labels, text_hidden, text_pooled, clip_text, clip_image))
            if value is not None
        }
        n = len(self.arrays["x"])
        for name, value in self.arrays.items():
            if len(value) != n:
                raise ValueError(f"encoded array {name!r} has {len(value)} rows but x has {n}")
        self.null = {k: _np(v) for k, v in zip(NULL_ARRAYS, (null_text_hidden, null_text_pooled)) if v is not None}
        self.captions = captions
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.arrays["x"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {name: torch.from_numpy(np.array(value[i])) for name, value in self.arrays.items()}
        item["sample_ids"] = torch.tensor(i)
        return item

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.arrays["x"].shape[1:])

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    def null_conditioning(self) -> dict[str, torch.Tensor] | None:
        """Model kwargs of the empty prompt ({"encoder_hidden_states", "pooled_projections"}, batch of 1)."""
        if not self.null:
            return None
        return {
            "encoder_hidden_states": torch.from_numpy(np.array(self.null["null_text_hidden"])),
            "pooled_projections": torch.from_numpy(np.array(self.null["null_text_pooled"])),
        }

    def check(
        self, sample_shape: tuple[int, ...] | None = None, num_classes: int | None = None, chunk: int = 4096
    ) -> None:
        """Raise a clear error for a shape mismatch, class ids out of range or non-finite values."""
        if sample_shape is not None and self.sample_shape != tuple(sample_shape):
            raise ValueError(
                f"training samples have shape {self.sample_shape} (channels, height, width) but the model expects "
                f"{tuple(sample_shape)}; check --resolution, the VAE and the model's in_channels / sample_size"
            )
        labels = self.arrays.get("class_labels")
        if num_classes is not None and labels is not None and len(labels):
            bad = np.flatnonzero((np.asarray(labels) < 0) | (np.asarray(labels) >= num_classes))
            if bad.size:
                raise ValueError(
                    f"class id {int(labels[bad[0]])} at sample {int(bad[0])} is outside [0, {num_classes}) "
                    f"({bad.size} samples); the model has num_classes = {num_classes}"
                )
        for name in ("x", "text_hidden", "text_pooled", "clip_text", "clip_image"):
            value = self.arrays.get(name)
            if value is None:
                continue
            for start in range(0, len(value), chunk):
                block = np.asarray(value[start : start + chunk]).reshape(min(chunk, len(value) - start), -1)
                finite = np.isfinite(block).all(1)
                if not finite.all():
                    rows = (start + np.flatnonzero(~finite)).tolist()
                    what = "latents" if name == "x" and self.meta.get("space") == "latent" else name
                    raise ValueError(f"NaN/inf in {what} of samples {rows[:10]}; re-encode them or drop them")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write every array (and meta/captions) to ``directory`` atomically."""
        with atomic_directory(directory) as tmp:
            self.write_files(tmp)
        return Path(directory)

    def write_files(self, directory: Path) -> None:
        """Write the arrays, ``captions.json`` and ``meta.json`` into an existing folder (not atomic)."""
        for name, value in {**self.arrays, **self.null}.items():
            np.save(directory / f"{name}.npy", np.ascontiguousarray(value))
        if self.captions is not None:
            (directory / "captions.json").write_text(json.dumps(self.captions))
        (directory / "meta.json").write_text(json.dumps({**self.meta, "num_samples": len(self)}, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> "EncodedDataset":
        """Reload a folder written by :meth:`save`; arrays stay memory-mapped on disk."""
        directory = Path(directory)
        if not (directory / "meta.json").is_file() or not (directory / "x.npy").is_file():
            raise FileNotFoundError(f"{directory} is not an encoded dataset (no meta.json / x.npy); run precompute")
        mode = "r" if mmap else None

        def load(name):
            f = directory / f"{name}.npy"
            return np.load(f, mmap_mode=mode, allow_pickle=False) if f.is_file() else None

        captions_file = directory / "captions.json"
        return cls(
            *(load(name) for name in ARRAYS),
            *(load(name) for name in NULL_ARRAYS),
            captions=json.loads(captions_file.read_text()) if captions_file.is_file() else None,
            meta=json.loads((directory / "meta.json").read_text()),
        )

    @staticmethod
    def is_encoded_dir(path: str | os.PathLike) -> bool:
        path = Path(path)
        return path.is_dir() and (path / "meta.json").is_file() and (path / "x.npy").is_file()
