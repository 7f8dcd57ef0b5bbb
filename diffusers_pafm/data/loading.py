"""Where training examples come from: built-in offline sets, local image folders, CC12M-style shards, the Hub.

Every source becomes a :class:`DataSource`: an iterable of ``{"key", "image", "label", "caption"}`` examples (images
still undecoded where possible, so that a corrupt file is detected, skipped and counted by the encoder instead of
crashing the loader) plus what is known about labels and captions.

=====================  ============================================================================================
``dataset``            source
=====================  ============================================================================================
``digits``             scikit-learn's 8x8 digits (1797, 10 classes), class-conditional
``patches``            natural-image crops of scikit-image photographs (label = photograph, 7 classes)
``shapes``             procedurally drawn shapes with captions ("a small red circle at the top left")
a folder of images     ``datasets`` "imagefolder" (labels from sub-folders, captions from ``metadata.jsonl``)
``*.tar`` shards       ``datasets`` "webdataset" (img2dataset / CC12M layout: ``<key>.jpg`` + ``<key>.txt``)
``*.parquet`` files    ``datasets`` "parquet" (image bytes column + caption column)
anything else          a Hub dataset id for ``datasets.load_dataset``
=====================  ============================================================================================

``streaming=True`` iterates shards without materialising them (for sets larger than memory; encode them once with
``training/precompute.py``).
"""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

__all__ = ["DataSource", "load_data_source", "BUILTIN_DATASETS"]

BUILTIN_DATASETS = ("digits", "patches", "shapes")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
CAPTION_COLUMNS = ("text", "txt", "caption", "prompt")
LABEL_COLUMNS = ("label", "labels", "cls", "class")


@dataclass
class DataSource:
    """Training examples and what is known about them."""

    examples: Iterable[dict[str, Any]]
    """dicts with "key" (str), "image" (PIL image, bytes, a path or a ``datasets`` {"bytes", "path"} dict),
    "label" (int or None) and "caption" (str or None)."""
    num_classes: int | None
    has_labels: bool
    has_captions: bool
    length: int | None = None
    """number of examples (None when streaming)."""
    description: str = ""


def _builtin(name: str, num_samples: int | None, resolution: int, seed: int) -> DataSource:
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        grey = (digits.images / 16.0 * 255).round().astype(np.uint8)
        examples = [
            {"key": str(i), "image": Image.fromarray(g, mode="L"), "label": int(y), "caption": None}
            for i, (g, y) in enumerate(zip(grey, digits.target))
        ][:num_samples]
        return DataSource(examples, 10, True, False, len(examples), "scikit-learn digits")
    if name == "patches":
        from .patches import NATURAL_IMAGES, make_patches

        images, labels = make_patches(num_samples or 2048, resolution=resolution, seed=seed)
        examples = [
            {"key": str(i), "image": im, "label": y, "caption": None} for i, (im, y) in enumerate(zip(images, labels))
        ]
        return DataSource(examples, len(NATURAL_IMAGES), True, False, len(examples), "scikit-image patches")
    from .shapes import make_shapes

    images, captions = make_shapes(num_samples or 2048, resolution=resolution, seed=seed)
    examples = [
        {"key": str(i), "image": im, "label": None, "caption": c} for i, (im, c) in enumerate(zip(images, captions))
    ]
    return DataSource(examples, None, False, True, len(examples), "procedural captioned shapes")


def _pick(
    columns: list[str], requested: str | None, defaults: tuple[str, ...], what: str, required: bool
) -> str | None:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{what} column {requested!r} is not in the dataset; its columns are {columns}")
        return requested
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise ValueError(f"no {what} column found among {columns}; name it with --{what}_column")
    return found


def _hf_dataset(dataset: str, split: str, streaming: bool):
    import datasets

    path = Path(dataset)
    if path.is_dir():
        tars = sorted(glob.glob(str(path / "*.tar")))
        parquets = sorted(glob.glob(str(path / "*.parquet")))
        if tars:
            return datasets.load_dataset("webdataset", data_files={split: tars}, split=split, streaming=streaming)
        if parquets:
            return datasets.load_dataset("parquet", data_files={split: parquets}, split=split, streaming=streaming)
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming)
    files = sorted(glob.glob(dataset)) if any(ch in dataset for ch in "*?[") else ([dataset] if path.is_file() else [])
    if files:
        builder = "webdataset" if files[0].endswith(".tar") else "parquet" if files[0].endswith(".parquet") else None
        if builder is None:
            raise ValueError(f"cannot tell the format of {files[0]!r}: expected .tar (webdataset) or .parquet shards")
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
    if os.sep in dataset and not path.exists():
        raise FileNotFoundError(f"dataset path {dataset!r} does not exist")
    if "/" not in dataset:
        raise ValueError(
            f"unknown dataset {dataset!r}: use one of the built-in sets {BUILTIN_DATASETS}, a folder of images, "
            "webdataset .tar / .parquet shards, or a Hub dataset id (owner/name)"
        )
    return datasets.load_dataset(dataset, split=split, streaming=streaming)


def _iterate(ds, image_col: str, caption_col: str | None, label_col: str | None) -> Iterator[dict[str, Any]]:
    for i, row in enumerate(ds):
        yield {
            "key": str(row.get("__key__", i)),
            "image": row[image_col],
            "label": None if label_col is None or row[label_col] is None else int(row[label_col]),
            "caption": None if caption_col is None else row[caption_col],
        }


def load_data_source(
    dataset: str,
    *,
    split: str = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    resolution: int = 32,
    seed: int = 0,
) -> DataSource:
    """Open ``dataset`` (see the module docstring) without decoding its images."""
    if dataset in BUILTIN_DATASETS:
        return _builtin(dataset, max_samples, resolution, seed)
    import datasets

    ds = _hf_dataset(dataset, split, streaming)
    columns = list(ds.column_names or ds.features or [])
    image_col = _pick(columns, image_column, IMAGE_COLUMNS, "image", required=True)
    caption_col = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", required=False)
    label_col = _pick(columns, label_column, LABEL_COLUMNS, "label", required=False)
    features = ds.features or {}
    if isinstance(features.get(image_col), datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: corrupt files are counted
    num_classes = None
    if label_col is not None and isinstance(features.get(label_col), datasets.ClassLabel):
        num_classes = features[label_col].num_classes
    if max_samples is not None:
        ds = ds.take(max_samples) if streaming else ds.select(range(min(max_samples, len(ds))))
    length = None if streaming else len(ds)
    return DataSource(
        _IterableRows(ds, image_col, caption_col, label_col),
        num_classes,
        label_col is not None,
        caption_col is not None,
        length,
        f"{dataset} (columns: image={image_col!r}, caption={caption_col!r}, label={label_col!r})",
    )


class _IterableRows:
    """Re-iterable view of a ``datasets`` dataset as example dicts."""

    def __init__(self, ds, image_col, caption_col, label_col):
        self.ds, self.cols = ds, (image_col, caption_col, label_col)

    def __iter__(self):
        return _iterate(self.ds, *self.cols)


def decode_image(value: Any) -> Image.Image:
    """A PIL image from a PIL image, raw bytes, a path or a ``datasets`` {"bytes", "path"} dict (raises if corrupt)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    else:
        raise TypeError(f"cannot read an image from {type(value).__name__}")
    image.load()
    return image
