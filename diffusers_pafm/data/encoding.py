"""Encode a :class:`~.loading.DataSource` once: decode -> resize/crop -> (VAE) -> text encoder -> CLIP.

Corrupt images, empty captions (when the set is captioned) and non-finite latents are skipped and counted in an
:class:`EncodingReport`, never silently dropped. ``resize=False`` makes a size mismatch an error instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..utils.vae import normalize_latents, vae_factors
from .encoded import EncodedDataset
from .loading import DataSource, decode_image

__all__ = ["EncodingReport", "encode_data_source", "image_to_tensor", "dense_class_ids"]

MODES = {1: "L", 3: "RGB"}


@dataclass
class EncodingReport:
    """What happened to every example: kept, or skipped with a reason (first keys of each kind listed)."""

    seen: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_keys: dict[str, list[str]] = field(default_factory=dict)
    damaged_files: dict[str, list[str]] = field(default_factory=dict)
    """shards / files not read to the end ("truncated": the samples after the damage are lost; "unreadable")."""

    def skip(self, reason: str, key: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        keys = self.skipped_keys.setdefault(reason, [])
        if len(keys) < 20:
            keys.append(key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[str]:
        """One line per kind of loss (skipped samples, damaged files); empty when every sample was kept."""
        lines = [
            f"{n} samples skipped as {reason} (e.g. {self.skipped_keys[reason][:3]})"
            for reason, n in self.skipped.items()
        ]
        return lines + [f"{kind} file: {entry}" for kind, entries in self.damaged_files.items() for entry in entries]


def dense_class_ids(labels: list[int], keys: list[str], remap: bool) -> tuple[list[int], list[str] | None]:
    """Class ids as a model needs them: 0..n-1 with none unused. Dense ids pass through; otherwise ``remap`` maps
    the sorted distinct ids to 0..n-1 (returning the original id of each new one, for ``label_map.json``), or it is
    an error naming the largest id and its sample (a model would get max id + 1 classes)."""
    distinct = sorted(set(labels))
    if distinct and distinct[0] < 0:
        raise ValueError(f"class id {distinct[0]} of sample {keys[labels.index(distinct[0])]!r} is negative")
    if not distinct or distinct == list(range(len(distinct))):
        return labels, None
    if remap:
        new_id = {old: new for new, old in enumerate(distinct)}
        return [new_id[y] for y in labels], [str(old) for old in distinct]
    largest = distinct[-1]
    raise ValueError(
        f"class ids are not dense: {len(distinct)} distinct ids but the largest, {largest} (sample "
        f"{keys[labels.index(largest)]!r}), would make a model with {largest + 1} classes; pass --remap_labels to map "
        "the ids to 0..n-1 (written to label_map.json with the pipeline), or fix the label"
    )


def image_to_tensor(
    image: Image.Image, resolution: int, channels: int, resize: bool = True, center_crop: bool = True
) -> torch.Tensor:
    """[channels, resolution, resolution] in [-1, 1]; resizes the shorter side and crops unless ``resize=False``."""
    if channels not in MODES:
        raise ValueError(f"images can be encoded to 1 (L) or 3 (RGB) channels, not {channels}")
    if image.size != (resolution, resolution):
        if not resize:
            raise ValueError(
                f"image of size {image.size[0]}x{image.size[1]} but the model expects {resolution}x{resolution}; "
                "pass --resolution matching the data or allow resizing"
            )
        scale = resolution / min(image.size)
        w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image.convert(MODES[channels]), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.reshape(resolution, resolution, channels)).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_data_source(
    source: DataSource,
    *,
    resolution: int,
    channels: int,
    vae: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    tokenizer: Any = None,
    clip: Any = None,
    use_captions: bool | None = None,
    resize: bool = True,
    center_crop: bool = True,
    batch_size: int = 64,
    progress: bool = True,
    strict: bool = False,
    remap_labels: bool = False,
) -> tuple[EncodedDataset, EncodingReport]:
    """Encode every example of ``source``; returns the dataset and the report of skipped examples.

    ``strict`` makes any skipped sample or damaged file an error; ``remap_labels`` maps sparse class ids to 0..n-1
    (:func:`dense_class_ids`).
    """
    from ..models.text_encoder import encode_prompt

    use_captions = source.has_captions if use_captions is None else use_captions
    if use_captions and not source.has_captions:
        raise ValueError(f"captions were requested but {source.description or 'the dataset'} has none")
    report = EncodingReport(damaged_files={kind: list(entries) for kind, entries in source.damaged_files.items()})
    kept_keys: list[str] = []
    out: dict[str, list[torch.Tensor]] = {}
    labels: list[int] = []
    captions: list[str] = []
    pending: list[tuple[str, Image.Image, torch.Tensor, int | None, str | None]] = []

    def flush():
        if not pending:
            return
        keys, images, pixels, ys, texts = zip(*pending)
        pending.clear()
        x = torch.stack(pixels)
        if vae is not None:
            dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
            x = normalize_latents(vae, dist.mode())
        x = x.float().cpu()
        finite = torch.isfinite(x.flatten(1)).all(1)
        for key, ok in zip(keys, finite.tolist()):
            if not ok:
                report.skip("nonfinite_latent", key)
        keep = [i for i, ok in enumerate(finite.tolist()) if ok]
        if not keep:
            return
        out.setdefault("x", []).append(x[keep])
        if source.has_labels:
            labels.extend(ys[i] for i in keep)
            kept_keys.extend(keys[i] for i in keep)
        if use_captions:
            kept_texts = [texts[i] for i in keep]
            captions.extend(kept_texts)
            if text_encoder is not None:
                hidden, pooled = encode_prompt(kept_texts, text_encoder, tokenizer)
                out.setdefault("text_hidden", []).append(hidden.float().cpu())
                out.setdefault("text_pooled", []).append(pooled.float().cpu())
            if clip is not None:
                out.setdefault("clip_text", []).append(clip.encode_text(kept_texts).cpu())
        if clip is not None:
            out.setdefault("clip_image", []).append(clip.encode_image([images[i] for i in keep]).cpu())
        report.kept += len(keep)

    for example in tqdm(source.examples, total=source.length, desc="encode data", disable=not progress):
        report.seen += 1
        key = example["key"]
        caption = example.get("caption")
        if use_captions and (caption is None or not str(caption).strip()):
            report.skip("empty_caption", key)
            continue
        if source.has_labels and example.get("label") is None:
            report.skip("missing_label", key)
            continue
        try:
            image = decode_image(example["image"])
        except Exception as error:  # PIL raises many types for truncated / non-image bytes
            report.skip("corrupt_image", f"{key}: {type(error).__name__}")
            continue
        pending.append(
            (
                key,
                image,
                image_to_tensor(image, resolution, channels, resize, center_crop),
                example.get("label"),
                None if caption is None else str(caption).strip(),
            )
        )
        if len(pending) == batch_size:
            flush()
    flush()
    if report.kept == 0:
        raise ValueError(f"no usable examples in {source.description or 'the dataset'}: {report.problems()}")
    if strict and report.problems():
        raise ValueError("--strict_data: " + "; ".join(report.problems()))
    label_names = source.label_names
    if source.has_labels and source.num_classes is None:
        labels, label_names = dense_class_ids(labels, kept_keys, remap_labels)

    arrays = {name: torch.cat(chunks) for name, chunks in out.items()}
    null = {}
    if use_captions and text_encoder is not None:
        hidden, pooled = encode_prompt([""], text_encoder, tokenizer)
        null = {"null_text_hidden": hidden.float().cpu(), "null_text_pooled": pooled.float().cpu()}
    meta = {
        "space": "latent" if vae is not None else "pixel",
        "resolution": resolution,
        "num_classes": (source.num_classes or (max(labels) + 1 if labels else None)) if source.has_labels else None,
        "label_names": label_names,
        "source": source.description,
        "report": report.to_dict(),
    }
    if vae is not None:
        scale, shift = vae_factors(vae)
        meta.update(vae_scaling_factor=scale, vae_shift_factor=shift)
    dataset = EncodedDataset(
        class_labels=torch.tensor(labels, dtype=torch.long) if source.has_labels else None,
        captions=captions if use_captions else None,
        meta=meta,
        **arrays,
        **null,
    )
    return dataset, report
