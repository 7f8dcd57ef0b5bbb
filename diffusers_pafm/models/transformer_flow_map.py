"""Two-time flow-map DiT u_theta(x_t, t, r): the average velocity from time t to time r (diffusers sigma convention).

x_r = x_t - (t - r) u_theta(x_t, t, r); the one-step map from noise is x_0 = z - u_theta(z, 1, 0). At r = t the
average velocity is the instantaneous one, so a flow-matching DiT is the flow map's r = t slice.

The model is diffusers' ``DiTTransformer2DModel`` (same modules, same weight names) plus an *interval embedding*
of h = t - r (sinusoidal 1000 h -> MLP, output layer zero-initialised) added to every block's adaLN-Zero
conditioning and to the final layer's. Initialised from an FM DiT (``FlowMapTransformer2DModel.from_pretrained`` on
a DiT folder, or :meth:`from_flow_matching`), it equals that DiT for every r until training moves the interval
embedding.

``prediction_type="sample"`` (for maps trained from scratch on pixels) reads the network output as the endpoint
x_hat = x_0 instead of u, and returns u = (x_t - x_hat) / max(t, min_sample_time), so that x_r = (r/t) x_t +
(1 - r/t) x_hat and the one-step map is x_0 = x_hat: the network does not have to copy the noise through
(x-prediction). Measurements on image patches are in the README.

``time_embedding_scale`` sets what the sinusoidal time embedders see: s t (timesteps stay 1000 t at the interface).
1000 is diffusers' DiT (needed to start from an FM DiT); 1 is raw t as in SiT and the official MeanFlow / VFM code.
An embedding of 1000 t varies fast in t, so d u / d t and with it the MeanFlow target v - (t - r) du/dt become
large and noisy for a map trained from scratch; raw t keeps them small.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (bases looked up by name on load)
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..paths import TIMESTEP_SCALE, sample_to_velocity
from .transformer_dit import PeftDiTTransformer2DModel

__all__ = ["FlowMapTransformer2DModel"]

PREDICTION_TYPES = ("velocity", "sample")


class FlowMapTransformer2DModel(PeftDiTTransformer2DModel):
    """Class-conditional two-time DiT (null class id = ``num_embeds_ada_norm``); LoRA-capable."""

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        timestep_scale: float = TIMESTEP_SCALE,
        prediction_type: str = "velocity",
        min_sample_time: float = 0.05,
        time_embedding_scale: float = TIMESTEP_SCALE,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        if norm_type != "ada_norm_zero":
            raise ValueError("the flow map needs DiT's ada_norm_zero blocks")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if not 0.0 < min_sample_time <= 1.0:
            raise ValueError(f"min_sample_time must be in (0, 1], got {min_sample_time}")
        if not time_embedding_scale > 0.0:
            raise ValueError(f"time_embedding_scale must be positive, got {time_embedding_scale}")
        dim = num_attention_heads * attention_head_dim
        self.interval_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.interval_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        torch.nn.init.zeros_(self.interval_embedder.linear_2.weight)
        torch.nn.init.zeros_(self.interval_embedder.linear_2.bias)

    def _block(self, block, hidden_states: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """DiT's ``BasicTransformerBlock`` (ada_norm_zero, self-attention + MLP) with a given conditioning vector."""
        norm1 = block.norm1
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1.linear(norm1.silu(emb)).chunk(6, dim=1)
        normed = norm1.norm(hidden_states) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        hidden_states = hidden_states + gate_msa[:, None] * block.attn1(normed)
        normed = block.norm3(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden_states + gate_mlp[:, None] * block.ff(normed)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        r_timestep: torch.Tensor,
        class_labels: torch.LongTensor,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple:
        """u(x_t, t, r); ``timestep`` = 1000 t and ``r_timestep`` = 1000 r (diffusers' timestep scale), t >= r."""
        dtype, x_t = hidden_states.dtype, hidden_states
        to_embedding = self.config.time_embedding_scale / self.config.timestep_scale  # 1 for diffusers DiTs
        t_embedded, r_embedded = timestep * to_embedding, r_timestep * to_embedding
        interval = self.interval_embedder(self.interval_proj(t_embedded - r_embedded).to(dtype))
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        hidden_states = self.pos_embed(hidden_states)
        for block in self.transformer_blocks:
            emb = block.norm1.emb(t_embedded, class_labels, hidden_dtype=dtype) + interval
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(self._block, block, hidden_states, emb)
            else:
                hidden_states = self._block(block, hidden_states, emb)

        conditioning = self.transformer_blocks[0].norm1.emb(t_embedded, class_labels, hidden_dtype=dtype) + interval
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)
        p, c = self.patch_size, self.out_channels
        hidden_states = hidden_states.reshape(-1, height, width, p, p, c)
        output = torch.einsum("nhwpqc->nchpwq", hidden_states).reshape(-1, c, height * p, width * p)
        if self.config.prediction_type == "sample":  # output = x_hat: u = (x_t - x_hat) / t, t clamped away from 0
            t = (timestep / self.config.timestep_scale).clamp(min=self.config.min_sample_time)
            output = sample_to_velocity(x_t, t.to(output.dtype), output)
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)

    @classmethod
    def from_flow_matching(
        cls,
        transformer: torch.nn.Module,
        prediction_type: str = "velocity",
        time_embedding_scale: float = TIMESTEP_SCALE,
    ) -> "FlowMapTransformer2DModel":
        """A flow map whose r = t slice (and, before training, every r) is the given FM ``DiTTransformer2DModel``.

        ``prediction_type="sample"`` takes the DiT's architecture and weights but reads its output as x_hat: use it
        for a randomly initialised DiT (a trained FM DiT predicts velocity, so the map would no longer equal it).
        """
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        flow_map = cls(**{**config, "prediction_type": prediction_type, "time_embedding_scale": time_embedding_scale})
        missing, unexpected = flow_map.load_state_dict(transformer.state_dict(), strict=False)
        if unexpected or any(not k.startswith("interval_") for k in missing):
            raise ValueError(f"not a compatible DiT: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return flow_map

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a flow map, or initialise one from a flow-matching DiT folder (``config.json`` of a DiT)."""
        lookup = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download")
        config = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in lookup if k in kwargs})
        kwargs.setdefault("use_safetensors", True)
        if config.get("_class_name") == cls.__name__:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        dtype = kwargs.pop("torch_dtype", None)
        dit = PeftDiTTransformer2DModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        flow_map = cls.from_flow_matching(dit)
        return flow_map if dtype is None else flow_map.to(dtype)
