"""Noise adapters q_phi(z | y, task) = N(mu, diag exp(logvar)): VFM's amortised posterior over the flow map's noise.

* :class:`NoiseAdapterModel` - images: a conv encoder of the observation's image-space view A^+ y (diffusers
  ``ResnetBlock2D`` blocks whose second norm is FiLM-modulated by a task embedding, ``time_embedding_norm=
  "scale_shift"``), stride-2 downsampling until the flow map's latent size, and a **zero-initialised** output conv:
  q starts at N(0, I) (KL = 0) whatever the input.
* :class:`MLPNoiseAdapterModel` - vectors (toy problems): MLP y -> (mu, logvar), last layer zero-initialised.
* :class:`ContextNoiseAdapterModel` - q_phi(z | c) for a context instead of an observation (reward-tilted
  generation): a table of one Gaussian per class label, or an MLP of a context embedding; zero-initialised.

Both clamp logvar to [logvar_min, logvar_max] and return a :class:`NoiseAdapterOutput`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..utils.labels import class_label_tensor
from ..utils.safetensors_only import SafetensorsOnlyMixin

__all__ = ["NoiseAdapterModel", "MLPNoiseAdapterModel", "ContextNoiseAdapterModel", "NoiseAdapterOutput"]


@dataclass
class NoiseAdapterOutput(BaseOutput):
    """The Gaussian q(z | y) = N(mean, diag exp(logvar)) (``return_dict=False``: the tuple (mean, logvar))."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(
        self,
        generator: torch.Generator | list[torch.Generator] | None = None,
        temperature: float = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z = mean + temperature * exp(logvar / 2) * eps (reparameterised: differentiable in mean / logvar), with
        eps = ``noise`` or a standard-normal draw from ``generator``."""
        if noise is None:
            noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(
                f"noise of shape {tuple(noise.shape)}; the adapter's q has shape {tuple(self.mean.shape)}"
            )
        return self.mean + temperature * torch.exp(0.5 * self.logvar) * noise.to(self.mean.device, self.mean.dtype)

    def kl(self, reduction: str = "mean") -> torch.Tensor:
        """KL(q || N(0, I)) per sample: 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1), or that sum / dimensions."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - self.logvar - 1).flatten(1)
        return kl.sum(1) if reduction == "sum" else kl.mean(1)


def zero_init_mlp(in_dim: int, hidden_dim: int, num_layers: int, out_dim: int) -> nn.Sequential:
    """``num_layers`` Linear + SiLU layers, then a zero-initialised Linear to ``out_dim``: q starts at N(0, I)."""
    layers, width = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
        width = hidden_dim
    out = nn.Linear(width, out_dim)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def _split(out: torch.Tensor, lo: float, hi: float, return_dict: bool) -> NoiseAdapterOutput | tuple:
    mean, logvar = out.chunk(2, dim=1)
    logvar = logvar.clamp(lo, hi)
    return NoiseAdapterOutput(mean=mean, logvar=logvar) if return_dict else (mean, logvar)


class NoiseAdapterModel(SafetensorsOnlyMixin, ModelMixin, ConfigMixin):
    """Conv noise adapter for images; ``forward(observation, task_ids)`` with observation = A^+ y [B, C, H, W]."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        latent_channels: int = 3,
        latent_size: int = 32,
        block_out_channels: list[int] | tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        num_tasks: int = 6,
        task_embed_dim: int = 128,
        norm_num_groups: int = 8,
        logvar_min: float = -10.0,
        logvar_max: float = 2.0,
    ):
        super().__init__()
        if sample_size % latent_size:
            raise ValueError(f"sample_size {sample_size} must be a multiple of latent_size {latent_size}")
        self.task_embedding = nn.Embedding(num_tasks, task_embed_dim)
        self.task_mlp = nn.Sequential(
            nn.Linear(task_embed_dim, task_embed_dim), nn.SiLU(), nn.Linear(task_embed_dim, task_embed_dim)
        )
        channels = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks, size, c_in = [], sample_size, channels[0]
        for i, c_out in enumerate(channels):
            for _ in range(layers_per_block):
                blocks.append(self._resnet(c_in, c_out))
                c_in = c_out
            if size > latent_size:
                blocks.append(Downsample2D(c_in, use_conv=True, name="op"))
                size //= 2
        while size > latent_size:
            blocks.append(Downsample2D(c_in, use_conv=True, name="op"))
            size //= 2
        blocks += [self._resnet(c_in, c_in), self._resnet(c_in, c_in)]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _resnet(self, c_in: int, c_out: int) -> ResnetBlock2D:
        cfg = self.config
        return ResnetBlock2D(
            in_channels=c_in,
            out_channels=c_out,
            temb_channels=cfg.task_embed_dim,
            groups=cfg.norm_num_groups,
            time_embedding_norm="scale_shift",
        )

    def forward(
        self, observation: torch.Tensor, task_ids: torch.Tensor, return_dict: bool = True
    ) -> NoiseAdapterOutput | tuple:
        task = self.task_mlp(self.task_embedding(task_ids.long()))
        h = self.conv_in(observation)
        for block in self.blocks:
            h = block(h, task) if isinstance(block, ResnetBlock2D) else block(h)
        out = self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
        return _split(out, self.config.logvar_min, self.config.logvar_max, return_dict)


class MLPNoiseAdapterModel(SafetensorsOnlyMixin, ModelMixin, ConfigMixin):
    """MLP noise adapter for vectors: y [B, observation_dim] (+ one-hot task) -> q over z [B, latent_dim]."""

    @register_to_config
    def __init__(
        self,
        observation_dim: int = 1,
        latent_dim: int = 2,
        hidden_dim: int = 256,
        num_layers: int = 4,
        num_tasks: int = 1,
        logvar_min: float = -10.0,
        logvar_max: float = 2.0,
    ):
        super().__init__()
        width = observation_dim + (num_tasks if num_tasks > 1 else 0)
        self.net = zero_init_mlp(width, hidden_dim, num_layers, 2 * latent_dim)

    def forward(
        self, observation: torch.Tensor, task_ids: torch.Tensor | None = None, return_dict: bool = True
    ) -> NoiseAdapterOutput | tuple:
        inputs = observation
        if self.config.num_tasks > 1:
            inputs = torch.cat(
                [observation, nn.functional.one_hot(task_ids.long(), self.config.num_tasks).to(observation.dtype)], 1
            )
        return _split(self.net(inputs), self.config.logvar_min, self.config.logvar_max, return_dict)


class ContextNoiseAdapterModel(SafetensorsOnlyMixin, ModelMixin, ConfigMixin):
    """q_phi(z | c) = N(mu(c), diag exp(logvar(c))) over noise of ``latent_shape`` for a context c.

    ``num_classes``: c is a class label [B] and q is a free Gaussian per class (so any per-class Gaussian in z is
    reachable); ``context_dim``: c is an embedding [B, context_dim] (e.g. a CLIP text embedding) mapped by an MLP.
    Both start at N(0, I), the flow map's own prior. ``forward(context, task_ids=None)``: ``task_ids`` is accepted
    and ignored, so that the VFM objective calls every adapter alike.
    """

    @register_to_config
    def __init__(
        self,
        latent_shape: list[int] | tuple[int, ...] = (3, 32, 32),
        num_classes: int | None = None,
        context_dim: int | None = None,
        hidden_dim: int = 256,
        num_layers: int = 2,
        logvar_min: float = -10.0,
        logvar_max: float = 2.0,
    ):
        super().__init__()
        if (num_classes is None) == (context_dim is None):
            raise ValueError("ContextNoiseAdapterModel needs exactly one of num_classes (labels) or context_dim")
        dim = 2 * math.prod(latent_shape)
        if num_classes is not None:
            self.table = nn.Embedding(num_classes, dim)
            nn.init.zeros_(self.table.weight)
        else:
            self.net = zero_init_mlp(context_dim, hidden_dim, num_layers, dim)

    def forward(
        self, context: torch.Tensor, task_ids: torch.Tensor | None = None, return_dict: bool = True
    ) -> NoiseAdapterOutput | tuple:
        cfg = self.config
        if cfg.num_classes is not None:
            labels = class_label_tensor(context, cfg.num_classes, allow_empty=True, name="class labels")
            out = self.table(labels.to(self.device))
        else:
            if context.ndim != 2 or context.shape[1] != cfg.context_dim:
                raise ValueError(f"context of shape {tuple(context.shape)}; expected [B, {cfg.context_dim}]")
            out = self.net(context.to(self.dtype))
        out = out.view(out.shape[0], 2 * cfg.latent_shape[0], *cfg.latent_shape[1:])
        return _split(out, cfg.logvar_min, cfg.logvar_max, return_dict)
