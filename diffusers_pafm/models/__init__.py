"""Models: diffusers transformers at named sizes (DiT with LoRA, MMDiT), flow maps, noise adapters, CLIP and text
encoders, the velocity-model adapter and LoRA helpers."""

from .clip import CLIPBundle, fit_clip, load_clip, save_clip, tiny_clip_config, train_tiny_clip
from .flow_map_mlp import LinearFlowMapModel, MLPFlowMapModel
from .lora import DEFAULT_LORA_TARGETS, LORA_WEIGHT_NAME, add_lora, base_model_copy, load_lora_into, save_lora
from .noise_adapter import ContextNoiseAdapterModel, MLPNoiseAdapterModel, NoiseAdapterModel, NoiseAdapterOutput
from .text_encoder import OpenCLIPTextEncoder, encode_prompt, load_text_encoder
from .transformer_dit import DIT_PRESETS, PeftDiTTransformer2DModel, build_dit
from .transformer_flow_map import FlowMapTransformer2DModel
from .transformer_sd3 import SD3_PRESETS, build_sd3
from .velocity_model import VelocityModel, disable_label_dropout, null_class_id

__all__ = [
    "PeftDiTTransformer2DModel",
    "FlowMapTransformer2DModel",
    "MLPFlowMapModel",
    "LinearFlowMapModel",
    "DIT_PRESETS",
    "build_dit",
    "SD3_PRESETS",
    "build_sd3",
    "OpenCLIPTextEncoder",
    "NoiseAdapterModel",
    "MLPNoiseAdapterModel",
    "ContextNoiseAdapterModel",
    "NoiseAdapterOutput",
    "encode_prompt",
    "load_text_encoder",
    "VelocityModel",
    "disable_label_dropout",
    "null_class_id",
    "CLIPBundle",
    "load_clip",
    "save_clip",
    "tiny_clip_config",
    "fit_clip",
    "train_tiny_clip",
    "add_lora",
    "save_lora",
    "load_lora_into",
    "base_model_copy",
    "DEFAULT_LORA_TARGETS",
    "LORA_WEIGHT_NAME",
]
