"""Class-conditional DiT: diffusers' ``DiTTransformer2DModel`` plus ``PeftAdapterMixin`` (LoRA), and size presets.

diffusers' DiT lacks the peft mixin, so ``add_adapter`` / ``save_lora_adapter`` / ``load_lora_adapter`` are missing;
this subclass adds them and nothing else (same config, same weights: a plain DiT checkpoint loads into it).
``ModelMixin`` and ``ConfigMixin`` are imported by name so that pipelines saved with it reload.
"""

from __future__ import annotations

from diffusers import ConfigMixin, DiTTransformer2DModel, ModelMixin  # noqa: F401  (bases looked up by name on load)
from diffusers.loaders import PeftAdapterMixin

from ..utils.safetensors_only import SafetensorsOnlyMixin

__all__ = ["PeftDiTTransformer2DModel", "DIT_PRESETS", "build_dit"]

# name -> (num_attention_heads, attention_head_dim, num_layers); "S"/"B" follow DiT/SiT-S and -B (width 384 / 768)
DIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "test": (2, 8, 2),
    "tiny": (4, 24, 4),
    "small": (6, 64, 12),
    "base": (12, 64, 12),
}


class PeftDiTTransformer2DModel(SafetensorsOnlyMixin, DiTTransformer2DModel, PeftAdapterMixin):
    """``DiTTransformer2DModel`` with diffusers' LoRA adapter methods."""


def check_patch_size(sample_size: int, patch_size: int) -> None:
    """A transformer tiles its sample_size x sample_size input into patch_size x patch_size patches."""
    if patch_size < 1 or sample_size % patch_size:
        multiple = max(patch_size, 1)
        raise ValueError(
            f"--patch_size {patch_size} does not divide the model input size {sample_size} (--resolution, after the "
            f"VAE's downsampling); use a resolution giving a multiple of {multiple} "
            f"(e.g. {max(multiple, sample_size // multiple * multiple)}), or another --patch_size"
        )


def build_dit(
    preset: str, in_channels: int, sample_size: int, num_classes: int, patch_size: int = 2
) -> PeftDiTTransformer2DModel:
    """A randomly initialised class-conditional DiT (null class id = ``num_classes``) of a named size."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT size {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    heads, head_dim, layers = DIT_PRESETS[preset]
    check_patch_size(sample_size, patch_size)
    return PeftDiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    )
