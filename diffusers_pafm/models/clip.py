"""open_clip models for the CLIP condition likelihood: load by ``pretrained=`` name or local folder, embed, save.

Real use: ``load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k")``. Offline (tests, demo) a random-init or
in-project-trained tiny model saved with :func:`save_clip` reloads with ``load_clip("/path/to/dir")`` through
open_clip's ``local-dir:`` schema (``open_clip_config.json`` + ``open_clip_model.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..utils.safetensors_only import PICKLE_SUFFIXES, explain_pickle_only

__all__ = [
    "CLIPBundle",
    "load_clip",
    "save_clip",
    "tiny_clip_config",
    "fit_clip",
    "train_tiny_clip",
    "clip_fit_fingerprint",
    "tiny_clip_is_current",
]

FIT_FILE = "fit.json"


def tiny_clip_config(image_size: int = 32, embed_dim: int = 64, width: int = 64, layers: int = 2) -> dict[str, Any]:
    """A ~3.4 M-parameter CLIP config (ViT image tower, 16-token text tower) for offline tests and demos."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }


@dataclass
class CLIPBundle:
    """An open_clip model with its image preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any

    @torch.no_grad()
    def encode_text(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings [N, E]."""
        device = next(self.model.parameters()).device
        out = [
            self.model.encode_text(self.tokenizer(captions[i : i + batch_size]).to(device))
            for i in range(0, len(captions), batch_size)
        ]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: list | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings [N, E] from PIL images or an already preprocessed [N, 3, H, W] tensor."""
        device = next(self.model.parameters()).device
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(im) for im in images])
        out = [
            self.model.encode_image(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)
        ]
        return F.normalize(torch.cat(out).float(), dim=-1)


def load_clip(name_or_path: str | os.PathLike, pretrained: str | None = None, device: str = "cpu") -> CLIPBundle:
    """open_clip model by architecture name (+ ``pretrained`` tag or weights file) or from a local folder."""
    import open_clip

    name = str(name_or_path)
    if Path(name).is_dir():
        if pretrained is not None:
            raise ValueError(
                f"CLIP folder {name} holds its own weights, so --clip_pretrained {pretrained!r} would be ignored; "
                "pass either the folder or an architecture name with --clip_pretrained"
            )
        if not (Path(name) / "open_clip_model.safetensors").is_file():
            error = FileNotFoundError(f"{name} is not a CLIP folder (no open_clip_model.safetensors)")
            raise explain_pickle_only(name, None, error)
        name = f"local-dir:{name}"
    elif pretrained is not None and Path(pretrained).suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"--clip_pretrained {pretrained!r} is a pickle; diffusers-pafm loads safetensors only "
            "(convert it with safetensors.torch.save_file, or pass an open_clip pretrained tag)"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    return CLIPBundle(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name))


def save_clip(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    directory: str | os.PathLike,
    mean: float = 0.5,
    std: float = 0.5,
) -> Path:
    """Save an open_clip ``CLIP`` so that ``load_clip(directory)`` (open_clip's ``local-dir:``) reloads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [mean] * 3, "std": [std] * 3}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


def fit_clip(
    model: torch.nn.Module,
    images: torch.Tensor,
    captions: list[str],
    tokenizer: Any,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Contrastive training (open_clip's ``ClipLoss``) of a small CLIP on preprocessed images [N, 3, H, W]."""
    import open_clip

    generator = torch.Generator().manual_seed(seed)
    tokens = tokenizer(captions)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="fit CLIP", disable=not progress):
        idx = torch.randperm(len(images), generator=generator)[:batch_size]
        out = model(images[idx], tokens[idx])
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        loss = loss_fn(*out[:3])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def clip_fit_fingerprint(images: list, captions: list[str], steps: int, image_size: int, seed: int) -> str:
    """sha256 of what a tiny CLIP was fitted on (pixels, captions, steps, size, seed): a folder is reused only for
    the same data and settings."""
    digest = hashlib.sha256(json.dumps([captions, steps, image_size, seed]).encode())
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()


def tiny_clip_is_current(directory: str | os.PathLike, fingerprint: str) -> bool:
    """Whether ``directory`` holds a tiny CLIP fitted (to the end) on the data of ``fingerprint``."""
    fit = Path(directory) / FIT_FILE
    return fit.is_file() and json.loads(fit.read_text()).get("fingerprint") == fingerprint


def train_tiny_clip(
    images: list,
    captions: list[str],
    directory: str | os.PathLike,
    steps: int = 300,
    image_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Create a :func:`tiny_clip_config` CLIP, fit it on (PIL image, caption) pairs, save it; returns the folder.

    The offline stand-in for a released CLIP: reload with ``load_clip(directory)``. The folder appears only once
    the fit has finished (one rename), with ``fit.json`` recording what it was fitted on
    (:func:`clip_fit_fingerprint`), so a killed fit or another dataset never leaves a CLIP that looks usable.
    """
    import open_clip

    from ..utils.checkpointing import atomic_directory

    torch.manual_seed(seed)
    config = tiny_clip_config(image_size=image_size)
    with atomic_directory(directory) as tmp:
        bundle = load_clip(save_clip(open_clip.CLIP(**config), config, tmp))
        pixels = torch.stack([bundle.preprocess(im) for im in images])
        losses = fit_clip(bundle.model, pixels, captions, bundle.tokenizer, steps=steps, seed=seed, progress=progress)
        save_clip(bundle.model, config, tmp)
        fit = {
            "fingerprint": clip_fit_fingerprint(images, captions, steps, image_size, seed),
            "final_loss": losses[-1],
        }
        (tmp / FIT_FILE).write_text(json.dumps({**fit, "examples": len(images), "steps": steps}, indent=2))
    return Path(directory)
