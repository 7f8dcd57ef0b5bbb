"""Two-time flow map for vector data (toy problems): an MLP on [x, t, t - r] -> average velocity u(x, t, r)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..utils.safetensors_only import SafetensorsOnlyMixin

__all__ = ["MLPFlowMapModel"]


class MLPFlowMapModel(SafetensorsOnlyMixin, ModelMixin, ConfigMixin):
    """Same call signature as :class:`FlowMapTransformer2DModel` (timesteps on diffusers' 0..1000 scale)."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden_dim: int = 256, num_layers: int = 4, timestep_scale: float = 1000.0):
        super().__init__()
        layers, width = [], dim + 2
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, hidden_states, timestep, r_timestep, class_labels=None, return_dict: bool = True):
        t = timestep / self.config.timestep_scale
        h = t - r_timestep / self.config.timestep_scale
        out = self.net(
            torch.cat([hidden_states, t[:, None].to(hidden_states.dtype), h[:, None].to(hidden_states.dtype)], 1)
        )
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
