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
import json
import os
import tarfile
from dataclasses import dataclass, field
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
    label_names: list[str] | None = None
    """name of each class id, when the data has them (sub-folder names, a ``ClassLabel``, mapped string labels)."""
    damaged_files: dict[str, list[str]] = field(default_factory=dict)
    """shards / files that could not be read to the end, by kind ("truncated", "unreadable"), each with a reason."""


def _builtin(name: str, num_samples: int | None, resolution: int, seed: int) -> DataSource:
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        grey = (digits.images / 16.0 * 255).round().astype(np.uint8)
        examples = [
            {"key": str(i), "image": Image.fromarray(g, mode="L"), "label": int(y), "caption": None}
            for i, (g, y) in enumerate(zip(grey, digits.target))
        ][:num_samples]
        return DataSource(examples, 10, True, False, len(examples), "scikit-learn digits", [str(i) for i in range(10)])
    if name == "patches":
        from .patches import NATURAL_IMAGES, make_patches

        images, labels = make_patches(num_samples or 2048, resolution=resolution, seed=seed)
        examples = [
            {"key": str(i), "image": im, "label": y, "caption": None} for i, (im, y) in enumerate(zip(images, labels))
        ]
        names = list(NATURAL_IMAGES)
        return DataSource(examples, len(names), True, False, len(examples), "scikit-image patches", names)
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


def scan_tar_shards(files: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Read the headers of each tar shard (cheap: data is skipped by seeking): the readable shards, and the damaged
    ones by kind. "truncated": the archive stops before its end-of-archive marker (two zero blocks), so the samples
    after the cut are lost (the ones before it are still read). "unreadable": not a tar archive (left out)."""
    readable, damaged = [], {}
    for file in files:
        try:
            with tarfile.open(file, "r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as error:
            damaged.setdefault("unreadable", []).append(f"{file}: {error}")
            continue
        readable.append(file)
        end = max((m.offset_data + -(-m.size // 512) * 512 for m in members), default=0)
        with open(file, "rb") as handle:
            handle.seek(end)
            marker = handle.read(1024)
        if len(marker) < 1024 or marker.strip(b"\0"):
            complete = {m.name.rsplit(".", 1)[0] for m in members}
            damaged.setdefault("truncated", []).append(
                f"{file}: cut at byte {os.path.getsize(file)} (no end-of-archive marker); the {len(complete)} samples "
                "before the cut are read, the rest of the shard is lost"
            )
    return readable, damaged


def check_metadata_file(folder: Path) -> None:
    """An image folder's ``metadata.jsonl`` must be UTF-8 JSON lines: name the line that is not."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        return
    for number, line in enumerate(metadata.read_bytes().splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{metadata} line {number} is not UTF-8 (byte {line[error.start : error.start + 1]!r} at column "
                f"{error.start + 1}); save the file as UTF-8"
            ) from None
        if text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{metadata} line {number} is not JSON: {error.msg} at column {error.colno}"
                ) from None


def _not_a_precompute_folder(path: Path) -> None:
    if any(path.glob("*.npy")) and not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"{path} holds .npy arrays but no meta.json: a precompute.py folder that was not written to the end "
            "(precompute writes meta.json last, in one rename); run training/precompute.py again"
        )


def _hf_dataset(dataset: str, split: str, streaming: bool):
    import datasets

    path = Path(dataset)
    if path.is_dir():
        _not_a_precompute_folder(path)
        files = sorted(glob.glob(str(path / "*.tar"))) or sorted(glob.glob(str(path / "*.parquet")))
        if not files:
            check_metadata_file(path)
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming), {}
    else:
        files = (
            sorted(glob.glob(dataset)) if any(c in dataset for c in "*?[") else ([dataset] if path.is_file() else [])
        )
    if files:
        builder = "webdataset" if files[0].endswith(".tar") else "parquet" if files[0].endswith(".parquet") else None
        if builder is None:
            raise ValueError(f"cannot tell the format of {files[0]!r}: expected .tar (webdataset) or .parquet shards")
        damaged = {}
        if builder == "webdataset":
            files, damaged = scan_tar_shards(files)
            if not files:
                raise ValueError(f"no readable tar shard in {dataset!r}: {damaged['unreadable']}")
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
        return ds, damaged
    if os.sep in dataset and not path.exists():
        raise FileNotFoundError(f"dataset path {dataset!r} does not exist")
    if "/" not in dataset:
        raise ValueError(
            f"unknown dataset {dataset!r}: use one of the built-in sets {BUILTIN_DATASETS}, a folder of images, "
            "webdataset .tar / .parquet shards, or a Hub dataset id (owner/name)"
        )
    return datasets.load_dataset(dataset, split=split, streaming=streaming), {}


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

    ds, damaged = _hf_dataset(dataset, split, streaming)
    columns = list(ds.column_names or ds.features or [])
    image_col = _pick(columns, image_column, IMAGE_COLUMNS, "image", required=True)
    caption_col = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", required=False)
    label_col = _pick(columns, label_column, LABEL_COLUMNS, "label", required=False)
    features = ds.features or {}
    image_feature = features.get(image_col)
    if isinstance(image_feature, datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: corrupt files are counted
    elif isinstance(image_feature, datasets.Value) and image_feature.dtype not in ("binary", "large_binary", "string"):
        raise ValueError(
            f"image column {image_col!r} of {dataset!r} holds {image_feature.dtype} values; expected encoded image "
            f"bytes, an Image feature or image file paths (pick another with --image_column; columns: {columns})"
        )
    label_names = None
    label_feature = features.get(label_col) if label_col is not None else None
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        if streaming:
            raise ValueError(
                f"label column {label_col!r} of {dataset!r} holds strings; mapping them to class ids needs every "
                "value: run without --streaming (training/precompute.py maps them and writes label_map.json)"
            )
        ds = ds.class_encode_column(label_col)  # sorted names -> ids 0..n-1
        label_feature = ds.features[label_col]
    elif isinstance(label_feature, datasets.Value) and not label_feature.dtype.startswith(("int", "uint")):
        raise ValueError(
            f"label column {label_col!r} of {dataset!r} holds {label_feature.dtype} values; class labels must be "
            "integers or strings (pick another with --label_column)"
        )
    num_classes = None
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes, label_names = label_feature.num_classes, list(label_feature.names)
    if max_samples is not None:
        ds = ds.take(max_samples) if streaming else ds.select(range(min(max_samples, len(ds))))
    length = None if streaming else len(ds)
    return DataSource(
        _IterableRows(ds, image_col, caption_col, label_col),
        num_classes,
        label_col is not None,
        caption_col is not None,
        length,
        f"{dataset} (columns: {columns}; image={image_col!r}, caption={caption_col!r}, label={label_col!r})",
        label_names,
        damaged,
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
