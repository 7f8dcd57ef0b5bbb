"""From a dataset name to model-ready arrays: pick the encoders (VAE, text encoder, CLIP), then encode once.

Shared by ``PAFMTrainer`` (small sets, encoded in memory at start-up) and ``training/precompute.py`` (large sets,
encoded once to memory-mapped files next to the encoders it used and the faiss kNN index).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.safetensors_only import from_pretrained_safetensors
from .encoded import EncodedDataset
from .encoding import EncodingReport, encode_data_source
from .loading import DataSource, decode_image, load_data_source

__all__ = ["Encoders", "prepare_dataset", "load_vae", "DEFAULT_RESOLUTION"]

DEFAULT_RESOLUTION = {"digits": 16}
TINY_CLIP_MAX_EXAMPLES = 20_000


@dataclass
class Encoders:
    """The frozen models a dataset was encoded with (each optional)."""

    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    clip: Any = None
    """a :class:`~diffusers_pafm.models.clip.CLIPBundle`."""
    clip_path: str | None = None

    def save(self, directory: str | os.PathLike) -> None:
        """``vae/``, ``text_encoder/``, ``tokenizer/`` (diffusers / transformers layouts) and ``clip/`` (open_clip)."""
        directory = Path(directory)
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae")
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(directory / "text_encoder")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / "tokenizer")
        clip_dir = directory / "clip"
        if self.clip_path is not None and Path(self.clip_path).resolve() != clip_dir.resolve():
            shutil.copytree(self.clip_path, directory / "clip", dirs_exist_ok=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Encoders":
        """Inverse of :meth:`save` (missing components stay ``None``)."""
        from diffusers import AutoencoderKL

        from ..models import OpenCLIPTextEncoder
        from ..models.clip import load_clip

        directory = Path(directory)
        encoders = cls()
        if (directory / "vae" / "config.json").is_file():
            encoders.vae = from_pretrained_safetensors(AutoencoderKL, directory / "vae").eval()
        config = directory / "text_encoder" / "config.json"
        if config.is_file() and "OpenCLIPTextEncoder" in config.read_text():
            encoders.text_encoder = OpenCLIPTextEncoder.from_pretrained(directory / "text_encoder")
        elif config.is_file():
            from transformers import AutoModel, AutoTokenizer

            encoders.text_encoder = from_pretrained_safetensors(AutoModel, directory / "text_encoder").eval()
            encoders.tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        if (directory / "clip" / "open_clip_config.json").is_file():
            encoders.clip_path = str(directory / "clip")
            encoders.clip = load_clip(encoders.clip_path)
        return encoders


def load_vae(path: str):
    """An ``AutoencoderKL`` from its folder / Hub id, or from a pipeline folder holding ``vae/``."""
    from diffusers import AutoencoderKL

    subfolder = "vae" if (Path(path) / "vae" / "config.json").is_file() else None
    return from_pretrained_safetensors(AutoencoderKL, path, subfolder=subfolder).eval()


def _captioned_images(source: DataSource, limit: int) -> tuple[list, list[str]]:
    """Up to ``limit`` decodable (image, caption) pairs; unusable ones are left for the encoder to count."""
    images, captions = [], []
    for example in source.examples:
        caption = str(example.get("caption") or "").strip()
        try:
            image = decode_image(example["image"]) if caption else None
        except Exception:  # corrupt: the encoding pass skips and reports it
            image = None
        if image is not None:
            images.append(image)
            captions.append(caption)
        if len(images) >= limit:
            break
    return images, captions


def _clip_for(
    source: DataSource,
    clip_model: str,
    clip_pretrained: str | None,
    work_dir: Path,
    resolution: int,
    clip_train_steps: int,
    seed: int,
    progress: bool,
    is_main: bool,
    wait,
) -> tuple[Any, str]:
    from ..models.clip import clip_fit_fingerprint, load_clip, tiny_clip_is_current, train_tiny_clip

    if clip_model == "tiny":
        clip_dir = work_dir / "clip"
        if is_main:
            images, captions = _captioned_images(source, TINY_CLIP_MAX_EXAMPLES)
            fingerprint = clip_fit_fingerprint(images, captions, clip_train_steps, resolution, seed)
            if not tiny_clip_is_current(clip_dir, fingerprint):
                if clip_dir.exists():
                    print(f"{clip_dir} was fitted on other data or settings (or not to the end): fitting it again")
                train_tiny_clip(images, captions, clip_dir, clip_train_steps, resolution, seed, progress)
        wait()
        clip_model = str(clip_dir)
    return load_clip(clip_model, pretrained=clip_pretrained), clip_model


def prepare_dataset(
    dataset: str,
    *,
    work_dir: str | os.PathLike,
    split: str = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    resolution: int | None = None,
    channels: int | None = None,
    vae: str | None = None,
    text_encoder: str | None = None,
    want_text_encoder: bool = False,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    clip_train_steps: int = 300,
    resize: bool = True,
    center_crop: bool = True,
    strict: bool = False,
    remap_labels: bool = False,
    seed: int = 0,
    progress: bool = True,
    is_main: bool = True,
    wait=lambda: None,
) -> tuple[EncodedDataset, EncodingReport, Encoders]:
    """Load ``dataset``, build the encoders it needs and encode it.

    ``clip_model`` "tiny" fits a tiny CLIP on the (captioned) data into ``work_dir/clip`` first (main process;
    ``wait`` is a barrier for the others). With ``want_text_encoder`` the token/pooled text states come from
    ``text_encoder`` (an open_clip name/folder or a transformers model), by default the CLIP's own text tower.
    """
    from ..models import OpenCLIPTextEncoder, load_text_encoder

    resolution = resolution or DEFAULT_RESOLUTION.get(dataset, 32)
    source = load_data_source(
        dataset,
        split=split,
        image_column=image_column,
        caption_column=caption_column,
        label_column=label_column,
        streaming=streaming,
        max_samples=max_samples,
        resolution=resolution,
        seed=seed,
    )
    encoders = Encoders(vae=load_vae(vae) if vae else None)
    if channels is None:
        channels = 3 if encoders.vae is not None or dataset != "digits" else 1
    if clip_model is None and source.has_captions:
        clip_model = "tiny"
    if clip_model is not None and source.has_captions:
        encoders.clip, encoders.clip_path = _clip_for(
            source,
            clip_model,
            clip_pretrained,
            Path(work_dir),
            resolution,
            clip_train_steps,
            seed,
            progress,
            is_main,
            wait,
        )
    if want_text_encoder and source.has_captions:
        if text_encoder is None and encoders.clip_path is not None:
            encoders.text_encoder = OpenCLIPTextEncoder.from_open_clip(encoders.clip_path, pretrained=clip_pretrained)
        elif text_encoder is not None:
            encoders.text_encoder, encoders.tokenizer = load_text_encoder(text_encoder)
    data, report = encode_data_source(
        source,
        resolution=resolution,
        channels=channels,
        vae=encoders.vae,
        text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer,
        clip=encoders.clip,
        resize=resize,
        center_crop=center_crop,
        progress=progress,
        strict=strict,
        remap_labels=remap_labels,
    )
    return data, report, encoders
