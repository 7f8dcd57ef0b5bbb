"""Feature networks for the Frechet distance: a small classifier trained in-project, or Inception from a local file.

FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (:func:`~.metrics.frechet_distance`) is only
as meaningful as the features it is computed in, and it must be the same network for every method compared.

* :class:`FeatureClassifier` + :func:`train_feature_classifier`: the offline default, a CNN trained here on the
  benchmark's own labelled data (digits, or the attributes of captioned shapes); its held-out accuracy says how much
  its features can be trusted.
* :class:`InceptionFeatures`: the FID network (torch-fidelity's TF-ported InceptionV3, 2048-d pool features) from a
  local ``.safetensors`` file, for numbers comparable with published FIDs. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..utils.safetensors_only import SafetensorsOnlyMixin

__all__ = ["FeatureClassifier", "train_feature_classifier", "InceptionFeatures"]


class FeatureClassifier(SafetensorsOnlyMixin, ModelMixin, ConfigMixin):
    """CNN for [C, R, R] images in [-1, 1] (R divisible by 4); ``features`` is its ``feature_dim`` penultimate layer.

    One linear head per label column (``head_sizes``), e.g. ``(10,)`` for digits or ``(2, 4, 3, 4)`` for the
    size / colour / shape / position of captioned shapes. ``save_pretrained`` / ``from_pretrained`` (safetensors)
    share it, e.g. as the classifier of a :class:`~diffusers_pafm.rewards.ClassifierReward`.
    """

    @register_to_config
    def __init__(
        self, in_channels: int = 1, resolution: int = 16, head_sizes: tuple[int, ...] = (10,), feature_dim: int = 64
    ):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"FeatureClassifier needs a resolution divisible by 4, got {resolution}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (resolution // 4) ** 2, feature_dim),
            nn.SiLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n) for n in head_sizes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits per head."""
        h = self.body(x)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """[N, H] predicted label per head."""
        chunks = (x[i : i + batch_size] for i in range(0, len(x), batch_size))
        return torch.cat([torch.stack([logits.argmax(1) for logits in self(chunk)], 1) for chunk in chunks])


def train_feature_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    head_sizes: tuple[int, ...] | None = None,
    steps: int = 600,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[FeatureClassifier, float]:
    """Train on 80 % of (images [N, C, R, R], labels [N] or [N, H]) with Gaussian-noise augmentation (std ``noise``).

    Returns the network (eval mode) and its accuracy on the other 20 % (a row counts when every head is right).
    ``head_sizes`` defaults to ``labels.max(0) + 1`` per column.
    """
    labels = labels.long().reshape(len(labels), -1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label rows")
    if head_sizes is None:
        head_sizes = tuple(int(m) + 1 for m in labels.max(0).values)
    if len(head_sizes) != labels.shape[1]:
        raise ValueError(f"{len(head_sizes)} heads for {labels.shape[1]} label columns")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    split = int(0.8 * len(images))
    train, held_out = order[:split], order[split:]
    net = FeatureClassifier(images.shape[1], images.shape[-1], tuple(head_sizes))
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate)
    for _ in range(steps):
        idx = train[torch.randint(0, split, (batch_size,), generator=gen)]
        x = images[idx] + noise * torch.randn(images[idx].shape, generator=gen)
        loss = sum(nn.functional.cross_entropy(logits, labels[idx, h]) for h, logits in enumerate(net(x)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    accuracy = float((net.predict(images[held_out]) == labels[held_out]).all(1).float().mean())
    return net, accuracy


class InceptionFeatures(nn.Module):
    """FID Inception (torch-fidelity's ``FeatureExtractorInceptionV3``, pool3: 2048-d) from a local weights file.

    ``weights_path`` is a ``.safetensors`` state dict. The usual FID weights ship as a pickle
    (``pt_inception-2015-12-05-6726825d.pth``); convert a copy you trust once with
    ``safetensors.torch.save_file(torch.load(path, weights_only=True), "inception.safetensors")``.
    Needs ``pip install torch-fidelity`` (the ``fid`` extra).
    """

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from safetensors.torch import load_file

        path = Path(weights_path)
        if path.suffix != ".safetensors":
            raise ValueError(f"--inception_weights must be a .safetensors file (no pickles are loaded), got {path}")
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ImportError("Inception features need torch-fidelity: pip install 'diffusers-pafm[fid]'") from err
        state = load_file(str(path))
        # torch-fidelity reads its weights with torch.load (a pickle); hand it the safetensors dict instead
        with mock.patch.object(torch, "load", lambda *args, **kwargs: state):
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path))

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """[N, 2048] for images [N, C, H, W] in [-1, 1] (grey images are repeated to RGB; resized to 299 inside)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return torch.cat([self.net(pixels[i : i + batch_size])[0] for i in range(0, len(pixels), batch_size)])
