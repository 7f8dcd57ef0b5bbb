"""The data part of every training config, defined once: where the images come from and how they are encoded.

:class:`DataConfig` is mixed into the trainers' configs and ``training/precompute.py``; :class:`EncoderConfig` adds
the text encoder and CLIP model a dataset is encoded with. ``prepare_kwargs()`` maps both to
:func:`~.prepare.prepare_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..utils.options import ConfigPart, check, option

__all__ = ["DataConfig", "EncoderConfig"]


@dataclass
class DataConfig(ConfigPart):
    """Where the training images come from and how they are encoded (see ``diffusers_pafm.data``)."""

    dataset: str = option(
        "digits | patches | shapes | an image folder | .tar / .parquet shards | a folder from precompute.py | "
        "a Hub dataset id",
        default="digits",
    )
    dataset_split: str = option("split to train on", default="train")
    image_column: str | None = option("image column (default: image/jpg/png)", default=None)
    caption_column: str | None = option("caption column (default: text/txt/caption)", default=None)
    label_column: str | None = option("class label column (default: label)", default=None)
    max_train_samples: int | None = option("use only the first N examples", default=None)
    streaming: bool = option("stream the dataset while encoding it (large shard sets)", default=False)
    resolution: int | None = option("image size (default: 16 for digits, else 32)", default=None)
    center_crop: bool = option("center-crop after resizing (else top-left)", default=True)
    no_resize: bool = option("refuse images whose size differs from --resolution instead of resizing", default=False)
    vae: str | None = option(
        "AutoencoderKL folder (or pipeline folder with vae/) for latent-space training", default=None
    )
    strict_data: bool = option(
        "make any skipped sample or damaged shard an error (default: skip, count and name them in data_report.json)",
        default=False,
    )
    remap_labels: bool = option(
        "map sparse integer class ids to 0..n-1 (written to label_map.json with the pipeline) instead of refusing",
        default=False,
    )

    def validate(self) -> None:
        super().validate()
        samples = self.max_train_samples
        check(samples is None or samples >= 1, "max_train_samples", samples, "a positive integer or unset")
        check(self.resolution is None or self.resolution >= 1, "resolution", self.resolution, "a positive integer")

    def prepare_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~.prepare.prepare_dataset` these options (and :class:`EncoderConfig`'s,
        when mixed in) stand for."""
        kwargs = {
            "dataset": self.dataset,
            "split": self.dataset_split,
            "image_column": self.image_column,
            "caption_column": self.caption_column,
            "label_column": self.label_column,
            "streaming": self.streaming,
            "max_samples": self.max_train_samples,
            "resolution": self.resolution,
            "vae": self.vae,
            "resize": not self.no_resize,
            "center_crop": self.center_crop,
            "strict": self.strict_data,
            "remap_labels": self.remap_labels,
        }
        if isinstance(self, EncoderConfig):
            kwargs.update({f.name: getattr(self, f.name) for f in fields(EncoderConfig)})
        return kwargs


@dataclass
class EncoderConfig(ConfigPart):
    """The frozen encoders of text-conditioned data."""

    text_encoder: str | None = option(
        "open_clip name / folder or transformers model for the MMDiT's token states (default: the CLIP text tower)",
        default=None,
    )
    clip_model: str | None = option(
        'open_clip name or folder for CLIP embeddings; "tiny" fits a tiny CLIP on the data (default with captions)',
        default=None,
    )
    clip_pretrained: str | None = option("open_clip pretrained tag or weights file", default=None)
    clip_train_steps: int = option("steps for the in-project tiny CLIP", default=300)

    def validate(self) -> None:
        super().validate()
        check(self.clip_train_steps >= 1, "clip_train_steps", self.clip_train_steps, "a positive integer")
