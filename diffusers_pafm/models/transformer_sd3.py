"""Text-conditioned MMDiT: diffusers' ``SD3Transformer2DModel`` at named sizes for a given text encoder width."""

from __future__ import annotations

from diffusers import SD3Transformer2DModel

from .transformer_dit import check_patch_size

__all__ = ["SD3_PRESETS", "build_sd3"]

# name -> (num_attention_heads, attention_head_dim, num_layers)
SD3_PRESETS: dict[str, tuple[int, int, int]] = {
    "test": (2, 8, 1),
    "tiny": (4, 24, 4),
    "small": (6, 64, 12),
    "base": (12, 64, 12),
}


def build_sd3(
    preset: str, in_channels: int, sample_size: int, text_width: int, pooled_dim: int, patch_size: int = 2
) -> SD3Transformer2DModel:
    """A randomly initialised MMDiT taking token states [B, L, text_width] and pooled text [B, pooled_dim]."""
    if preset not in SD3_PRESETS:
        raise ValueError(f"unknown SD3 size {preset!r}; choose one of {sorted(SD3_PRESETS)}")
    heads, head_dim, layers = SD3_PRESETS[preset]
    check_patch_size(sample_size, patch_size)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=sample_size // patch_size,
    )
