"""Training data: built-in offline sets, ``datasets``-based loaders, one-time encoding to model-ready arrays."""

from .config import DataConfig, EncoderConfig
from .digits import load_digits_tensors
from .encoded import EncodedDataset
from .encoding import EncodingReport, encode_data_source, image_to_tensor
from .loading import BUILTIN_DATASETS, DataSource, decode_image, load_data_source
from .patches import make_patches
from .prepare import DEFAULT_RESOLUTION, Encoders, load_vae, prepare_dataset
from .shapes import ATTRIBUTES as SHAPE_ATTRIBUTES
from .shapes import caption_attributes, draw_shape, make_shapes

__all__ = [
    "DataConfig",
    "EncoderConfig",
    "load_digits_tensors",
    "make_shapes",
    "draw_shape",
    "caption_attributes",
    "SHAPE_ATTRIBUTES",
    "make_patches",
    "DataSource",
    "load_data_source",
    "decode_image",
    "BUILTIN_DATASETS",
    "EncodedDataset",
    "EncodingReport",
    "encode_data_source",
    "image_to_tensor",
    "Encoders",
    "prepare_dataset",
    "load_vae",
    "DEFAULT_RESOLUTION",
]
