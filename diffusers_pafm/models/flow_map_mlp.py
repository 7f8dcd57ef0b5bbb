"""Two-time flow maps for vector data (toy problems): an MLP on [x, t, t - r] -> average velocity u(x, t, r), and a
map linear in x (Gaussian data, where the exact flow map is affine and references are closed forms)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..utils.safetensors_only import SafetensorsOnlyMixin

__all__ = ["MLPFlowMapModel", "LinearFlowMapModel"]


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


class LinearFlowMapModel(SafetensorsOnlyMixin, ModelMixin, ConfigMixin):
    """u(x, t, r) = B(t, t - r) x + c(t, t - r): linear in x, with B, c from an MLP of the two times (last layer
    zero-initialised: u = 0, the map f(z) = z of N(0, I) data). Its one-step map f(z) = z - u(z, 1, 0) is affine,
    so the push-forward of a Gaussian q is Gaussian in closed form: exact references for Gaussian data."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden_dim: int = 64, timestep_scale: float = 1000.0):
        super().__init__()
        self.coefficients = nn.Sequential(
            nn.Linear(2, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, dim * dim + dim),
        )
        nn.init.zeros_(self.coefficients[-1].weight)
        nn.init.zeros_(self.coefficients[-1].bias)

    def forward(self, hidden_states, timestep, r_timestep, class_labels=None, return_dict: bool = True):
        t, r = timestep / self.config.timestep_scale, r_timestep / self.config.timestep_scale
        coefficients = self.coefficients(torch.stack([t, t - r], 1).to(hidden_states.dtype))
        d = self.config.dim
        matrix, offset = coefficients[:, : d * d].view(-1, d, d), coefficients[:, d * d :]
        out = torch.einsum("nij,nj->ni", matrix, hidden_states) + offset
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    @torch.no_grad()
    def one_step_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of the one-step map f(z) = z - u(z, 1, 0) = W z + b, read off at z = 0 and the unit vectors."""
        d = self.config.dim
        z = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(self.device, self.dtype)
        scale = self.config.timestep_scale
        u = self(z, torch.full((d + 1,), scale, device=z.device), torch.zeros(d + 1, device=z.device)).sample
        f = z - u
        return (f[1:] - f[0]).T, f[0]
