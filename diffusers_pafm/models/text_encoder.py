"""Text encoders for text-conditioned MMDiT training and sampling: token states + pooled vector per prompt.

Two kinds, both saved and reloaded by diffusers pipelines:

* :class:`OpenCLIPTextEncoder` - the text tower of an open_clip ``CLIP`` as a diffusers ``ModelMixin`` (config =
  open_clip's ``model_cfg``, tokenizer = open_clip's built-in BPE tokenizer, so no tokenizer files are needed).
  Build it from a released model with ``OpenCLIPTextEncoder.from_open_clip("ViT-B-32", pretrained=...)`` or from a
  local open_clip folder; tokens = final-layer states [B, L, width], pooled = projected CLIP text embedding [B, E]
  (SD3 uses CLIP the same way).
* any ``transformers`` encoder with its tokenizer (``load_text_encoder("<name or folder>")``): tokens =
  ``last_hidden_state``, pooled = ``text_embeds`` / ``pooler_output`` / the attention-masked mean of the tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..utils.safetensors_only import SafetensorsOnlyMixin, from_pretrained_safetensors

__all__ = ["OpenCLIPTextEncoder", "encode_prompt", "load_text_encoder"]


class OpenCLIPTextEncoder(SafetensorsOnlyMixin, ModelMixin, ConfigMixin):
    """Text tower of an open_clip ``CLIP`` (``model_cfg`` as in open_clip; the vision tower is dropped)."""

    @register_to_config
    def __init__(self, model_cfg: dict, context_length: int | None = None):
        super().__init__()
        from open_clip.model import CLIP

        if model_cfg.get("custom_text"):
            raise ValueError("OpenCLIPTextEncoder supports open_clip CLIP models with the built-in text tower only")
        cfg = {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
        clip = CLIP(**cfg)
        del clip.visual  # text only
        self.clip = clip
        self.context_length = context_length or model_cfg["text_cfg"].get("context_length", 77)

    @classmethod
    def from_open_clip(cls, name_or_path: str | os.PathLike, pretrained: str | None = None) -> "OpenCLIPTextEncoder":
        """From an open_clip name (+ ``pretrained`` tag/file) or a local folder written by ``save_clip``."""
        import open_clip

        from .clip import load_clip

        if Path(name_or_path).is_dir():
            model_cfg = json.loads((Path(name_or_path) / "open_clip_config.json").read_text())["model_cfg"]
        else:
            model_cfg = open_clip.get_model_config(str(name_or_path))
            if model_cfg is None:
                raise ValueError(f"unknown open_clip model {name_or_path!r}; see open_clip.list_models()")
        encoder = cls(model_cfg=model_cfg)
        state = load_clip(name_or_path, pretrained=pretrained).model.state_dict()
        encoder.clip.load_state_dict({k: v for k, v in state.items() if not k.startswith("visual.")})
        return encoder.eval()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        from open_clip.tokenizer import SimpleTokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer(prompts)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states [B, L, width], pooled projected embedding [B, E]) of tokenised prompts."""
        from open_clip.transformer import text_global_pool

        clip = self.clip
        x = clip.token_embedding(input_ids) + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        pooled = text_global_pool(x, input_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            proj = clip.text_projection
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return x, pooled


@torch.no_grad()
def encode_prompt(
    prompts: list[str], text_encoder: torch.nn.Module, tokenizer: Any | None = None, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states [B, L, W], pooled_projections [B, E]) of ``prompts`` for an MMDiT."""
    device = text_encoder.device if hasattr(text_encoder, "device") else next(text_encoder.parameters()).device
    if isinstance(text_encoder, OpenCLIPTextEncoder):
        return text_encoder(text_encoder.tokenize(list(prompts)).to(device))
    if tokenizer is None:
        raise ValueError("a transformers text encoder needs its tokenizer")
    max_length = max_length or min(getattr(tokenizer, "model_max_length", 77), 512)
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).to(device)
    out = text_encoder(**tokens)
    hidden = out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return hidden, pooled


def load_text_encoder(name_or_path: str | os.PathLike, pretrained: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(text_encoder, tokenizer): an open_clip name / local open_clip folder, else a transformers model + tokenizer."""
    path = Path(name_or_path)
    is_open_clip_dir = path.is_dir() and (path / "open_clip_config.json").is_file()
    if is_open_clip_dir or (not path.exists() and _is_open_clip_name(str(name_or_path))):
        return OpenCLIPTextEncoder.from_open_clip(name_or_path, pretrained=pretrained), None
    from transformers import AutoModel, AutoTokenizer

    model = from_pretrained_safetensors(AutoModel, name_or_path).eval()
    return model, AutoTokenizer.from_pretrained(name_or_path)


def _is_open_clip_name(name: str) -> bool:
    import open_clip

    return name in open_clip.list_models()
