"""Small shared infrastructure: images, VAE latent normalisation, loss outputs, checkpoints, and the Hub edge."""

from .checkpointing import atomic_directory, list_checkpoints, load_state, prune, resolve_checkpoint, save_state
from .hub import (
    ALLOW_PATTERNS,
    HubDownloadMixin,
    model_card_template,
    push_export,
    render_model_card,
)
from .images import density_image, image_grid, to_pil
from .labels import class_label_tensor
from .options import ConfigPart, check, option
from .outputs import LossOutput
from .safetensors_only import SafetensorsOnlyMixin, from_pretrained_safetensors
from .vae import decode_latents, denormalize_latents, normalize_latents, vae_factors

__all__ = [
    "class_label_tensor",
    "density_image",
    "image_grid",
    "to_pil",
    "vae_factors",
    "normalize_latents",
    "denormalize_latents",
    "decode_latents",
    "option",
    "check",
    "ConfigPart",
    "LossOutput",
    "save_state",
    "load_state",
    "atomic_directory",
    "list_checkpoints",
    "resolve_checkpoint",
    "prune",
    "render_model_card",
    "push_export",
    "model_card_template",
    "HubDownloadMixin",
    "from_pretrained_safetensors",
    "SafetensorsOnlyMixin",
    "ALLOW_PATTERNS",
]
