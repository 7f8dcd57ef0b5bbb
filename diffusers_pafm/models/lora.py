"""LoRA on diffusers transformers with peft, saved and loaded in diffusers' adapter format.

``add_lora`` freezes the base weights and injects adapters through the model's ``PeftAdapterMixin.add_adapter``
(``SD3Transformer2DModel`` has it; use :class:`~diffusers_pafm.models.PeftDiTTransformer2DModel` for DiT).
``save_lora`` writes ``pytorch_lora_weights.safetensors`` with ``save_lora_adapter`` (keys without the
"transformer." prefix, LoRA config in the metadata); pipelines load it with ``pipe.load_lora_weights(folder)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

__all__ = ["add_lora", "save_lora", "load_lora_into", "base_model_copy", "DEFAULT_LORA_TARGETS", "LORA_WEIGHT_NAME"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_LORA_TARGETS = {
    "dit": ATTENTION + ["ff.net.0.proj", "ff.net.2"],
    "sd3": ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


def add_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    adapter_name: str = "default",
) -> list[torch.nn.Parameter]:
    """Freeze ``transformer`` and add a rank-``rank`` adapter; returns the trainable (LoRA) parameters."""
    if not hasattr(transformer, "add_adapter"):
        raise TypeError(
            f"{type(transformer).__name__} has no add_adapter (no PeftAdapterMixin); "
            "for DiT use diffusers_pafm.models.PeftDiTTransformer2DModel"
        )
    if target_modules is None:
        target_modules = DEFAULT_LORA_TARGETS["sd3" if "joint_attention_dim" in transformer.config else "dit"]
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=target_modules)
    transformer.add_adapter(config, adapter_name=adapter_name)
    return [p for p in transformer.parameters() if p.requires_grad]


def save_lora(transformer: torch.nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the adapter as ``<directory>/pytorch_lora_weights.safetensors`` (diffusers format)."""
    transformer.save_lora_adapter(str(directory), adapter_name=adapter_name, weight_name=LORA_WEIGHT_NAME)
    return Path(directory) / LORA_WEIGHT_NAME


def load_lora_into(transformer: torch.nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Overwrite the values of an already added adapter with the weights saved by :func:`save_lora`."""
    state = load_file(str(Path(directory) / LORA_WEIGHT_NAME))
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights in {directory} do not match the model's adapter: {unexpected[:5]}")
    expected = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    if set(expected) != set(state):
        missing = sorted(set(expected) - set(state))[:5]
        raise ValueError(f"LoRA weights in {directory} miss adapter keys {missing}")


def base_model_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of ``transformer`` without its adapters (base weights only), e.g. for a pipeline export."""
    state = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if ".lora_" not in k}
    base = type(transformer).from_config(transformer.config)
    base.load_state_dict(state, strict=True)
    return base.to(next(transformer.parameters()).dtype).eval()
