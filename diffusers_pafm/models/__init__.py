"""Models: diffusers transformers at named sizes (DiT with LoRA support, MMDiT) and text encoders."""

from .flow_map_mlp import MLPFlowMapModel
from .noise_adapter import MLPNoiseAdapterModel, NoiseAdapterModel, NoiseAdapterOutput
from .text_encoder import OpenCLIPTextEncoder, encode_prompt, load_text_encoder
from .transformer_dit import DIT_PRESETS, PeftDiTTransformer2DModel, build_dit
from .transformer_flow_map import FlowMapTransformer2DModel
from .transformer_sd3 import SD3_PRESETS, build_sd3

__all__ = [
    "PeftDiTTransformer2DModel",
    "FlowMapTransformer2DModel",
    "MLPFlowMapModel",
    "DIT_PRESETS",
    "build_dit",
    "SD3_PRESETS",
    "build_sd3",
    "OpenCLIPTextEncoder",
    "NoiseAdapterModel",
    "MLPNoiseAdapterModel",
    "NoiseAdapterOutput",
    "encode_prompt",
    "load_text_encoder",
]
