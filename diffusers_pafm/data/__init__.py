"""Built-in offline datasets made from data bundled in PyPI wheels or drawn procedurally."""

from .digits import load_digits_tensors
from .shapes import draw_shape, make_shapes

__all__ = ["load_digits_tensors", "make_shapes", "draw_shape"]
