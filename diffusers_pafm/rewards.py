"""Differentiable rewards R(images, context) -> [B] for reward-tilted one-step generation (:class:`~.RewardTerm`).

Images are [B, C, H, W] in [-1, 1]; the context is what the noise adapter is conditioned on (class labels [B], or
prompts). The target of reward fine-tuning is p_beta(x | c) ~ p(x | c) exp(R(x, c) / beta).

* :class:`ClassifierReward` - log p(c | x) under any torch classifier (logits [B, K], or a list of heads).
* :class:`CLIPReward` - open_clip image-text cosine similarity to the context's prompt, times ``scale``.
* :class:`CLIPHeadReward` - a linear head w . e(x) + b on normalised CLIP image features (aesthetic-style scores),
  weights from a safetensors file.
* any callable ``reward(images, context) -> [B]`` (a ``module:function`` path on the command line).

:func:`load_reward` turns a command-line spec into one: ``classifier:<folder>``, ``clip:<name-or-folder>``,
``clip_head:<clip name-or-folder>,<weights.safetensors>``, or ``package.module:function``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassifierReward", "CLIPReward", "CLIPHeadReward", "load_reward", "REWARD_KINDS"]

REWARD_KINDS = ("classifier:<folder>", "clip:<name-or-folder>", "clip_head:<clip>,<weights.safetensors>", "module:fn")


def _labels(context: Any, batch: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(context, device=device).long().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch)
    if labels.numel() != batch:
        raise ValueError(f"{labels.numel()} class labels for {batch} images; pass one label or one per image")
    return labels


class ClassifierReward(nn.Module):
    """R(x, c) = log softmax(classifier(x))[c], the log-probability of the context class (head ``head`` of a
    multi-head classifier). The classifier is frozen (no gradient to its weights) and kept in eval mode."""

    def __init__(self, classifier: nn.Module, head: int = 0):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True) -> "ClassifierReward":
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, images: torch.Tensor, context: Any) -> torch.Tensor:
        logits = self.classifier(images)
        if isinstance(logits, (list, tuple)):
            logits = logits[self.head]
        labels = _labels(context, images.shape[0], logits.device)
        if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
            raise ValueError(f"class label {int(labels.max())} is outside the classifier's {logits.shape[1]} classes")
        return logits.float().log_softmax(1).gather(1, labels[:, None])[:, 0]

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, head: int = 0) -> "ClassifierReward":
        """A :class:`~diffusers_pafm.evaluation.FeatureClassifier` folder (``save_pretrained``, safetensors)."""
        from .evaluation.feature_networks import FeatureClassifier

        return cls(FeatureClassifier.from_pretrained(folder, use_safetensors=True), head)


class _CLIPImageFeatures(nn.Module):
    """Normalised open_clip image embeddings of images in [-1, 1], differentiably resized and normalised as the
    model's own preprocessing does."""

    def __init__(self, bundle):
        super().__init__()
        self.model = bundle.model.eval().requires_grad_(False)
        self.tokenizer = bundle.tokenizer
        normalize = next(t for t in getattr(bundle.preprocess, "transforms", []) if hasattr(t, "mean"))
        self.register_buffer("mean", torch.tensor(normalize.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalize.std).view(1, 3, 1, 1), persistent=False)
        size = self.model.visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True)
        return F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)


class CLIPReward(_CLIPImageFeatures):
    """R(x, c) = scale * cos(e_image(x), e_text(prompt)): ``context`` is one prompt, a prompt per image, or class
    labels indexing ``prompts``."""

    def __init__(self, bundle, prompts: Sequence[str] | None = None, scale: float = 1.0):
        super().__init__(bundle)
        self.prompts, self.scale = list(prompts) if prompts is not None else None, scale

    def text_features(self, prompts: list[str], device) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.tokenizer(prompts).to(device)
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def forward(self, images: torch.Tensor, context: Any) -> torch.Tensor:
        batch = images.shape[0]
        if isinstance(context, str):
            prompts = [context] * batch
        elif isinstance(context, (list, tuple)) and context and isinstance(context[0], str):
            prompts = list(context)
        else:
            if self.prompts is None:
                raise ValueError("CLIPReward got class labels as context but no prompts= to index")
            prompts = [self.prompts[i] for i in _labels(context, batch, torch.device("cpu")).tolist()]
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images; pass one prompt or one per image")
        text = self.text_features(prompts, images.device)
        return self.scale * (self.image_features(images) * text).sum(-1)


class CLIPHeadReward(_CLIPImageFeatures):
    """R(x) = w . e_image(x) + b, a linear head on normalised CLIP image features (the context is ignored).
    ``weights``: a safetensors file with "weight" ([E] or [1, E]) and optionally "bias" ([] or [1])."""

    def __init__(self, bundle, weights: str | os.PathLike):
        super().__init__(bundle)
        from safetensors.torch import load_file

        path = Path(weights)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ValueError(f"clip_head weights must be an existing .safetensors file, got {path}")
        state = load_file(str(path))
        if "weight" not in state:
            raise ValueError(f"{path} has no 'weight' tensor (found {sorted(state)}); expected weight [E], bias []")
        self.register_buffer("weight", state["weight"].float().reshape(-1))
        self.register_buffer("bias", state.get("bias", torch.zeros(())).float().reshape(()))

    def forward(self, images: torch.Tensor, context: Any = None) -> torch.Tensor:
        features = self.image_features(images)
        if features.shape[-1] != self.weight.numel():
            raise ValueError(f"head of {self.weight.numel()} weights for CLIP features of size {features.shape[-1]}")
        return features @ self.weight + self.bias


def load_reward(spec: str, prompts: Sequence[str] | None = None) -> Callable[..., torch.Tensor]:
    """A reward from a command-line spec (module docstring); ``prompts`` name the classes for a CLIP reward."""
    kind, _, rest = spec.partition(":")
    if kind == "classifier" and rest:
        return ClassifierReward.from_pretrained(rest)
    if kind in ("clip", "clip_head") and rest:
        from .models.clip import load_clip

        if kind == "clip":
            return CLIPReward(load_clip(rest), prompts)
        clip, _, weights = rest.partition(",")
        if not weights:
            raise ValueError(f"--reward {spec!r}: write clip_head:<clip name-or-folder>,<weights.safetensors>")
        return CLIPHeadReward(load_clip(clip), weights)
    if rest and "." not in rest and kind and kind.replace(".", "").replace("_", "").isalnum():
        try:
            module = importlib.import_module(kind)
        except ImportError as error:
            raise ValueError(f"--reward {spec!r}: cannot import module {kind!r} ({error})") from error
        function = getattr(module, rest, None)
        if not callable(function):
            raise ValueError(f"--reward {spec!r}: module {kind!r} has no callable {rest!r}")
        return function
    raise ValueError(f"--reward {spec!r} is not one of {', '.join(REWARD_KINDS)}")
