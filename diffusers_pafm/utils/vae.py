"""The one place where VAE latents are normalised: z_model = (z_vae - shift_factor) * scaling_factor.

``shift_factor`` is optional (SD3/Flux VAEs have it, SD1/SDXL VAEs do not), ``scaling_factor`` defaults to 1.
"""

from __future__ import annotations

import torch

__all__ = ["vae_factors", "normalize_latents", "denormalize_latents", "decode_latents"]


def vae_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a diffusers VAE config, with 1 and 0 for missing or ``None`` entries."""
    config = vae.config
    scale = getattr(config, "scaling_factor", None) if not isinstance(config, dict) else config.get("scaling_factor")
    shift = getattr(config, "shift_factor", None) if not isinstance(config, dict) else config.get("shift_factor")
    return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> model space: (z - shift) * scale."""
    scale, shift = vae_factors(vae)
    return (latents - shift) * scale


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model space -> VAE latents: z / scale + shift."""
    scale, shift = vae_factors(vae)
    return latents / scale + shift


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (roughly) from model-space latents, decoded in the VAE's dtype and returned in fp32."""
    return vae.decode(denormalize_latents(vae, latents).to(vae.dtype)).sample.float()
