"""Every weight load of the package is safetensors-only: a pickle can run code when it is loaded.

``from_pretrained_safetensors(cls, path)`` is ``cls.from_pretrained(path, use_safetensors=True)``; a folder that
holds only pickled weights (``diffusion_pytorch_model.bin``, ``pytorch_model.bin``, ``*.pt``) is an error that names
the files and says how to convert them. :class:`SafetensorsOnlyMixin` gives the package's own models and pipelines
the same ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["from_pretrained_safetensors", "SafetensorsOnlyMixin", "explain_pickle_only", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _pickled_weights(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)


def _safetensors_name(pickle: Path) -> Path:
    return (
        pickle.with_name("model.safetensors")
        if pickle.name == "pytorch_model.bin"
        else pickle.with_suffix(".safetensors")
    )


def explain_pickle_only(path: str | os.PathLike, subfolder: str | None, error: Exception) -> Exception:
    """An error naming the pickled weights of ``path/subfolder`` and how to convert them, else ``error``."""
    folder = Path(path) / (subfolder or "")
    pickles = _pickled_weights(folder)
    if not pickles:
        return error
    source = folder / pickles[0]
    return OSError(
        f"{folder} holds pickled weights only ({', '.join(pickles[:5])}); diffusers-pafm loads safetensors only "
        "(unpickling can run code). If you trust the file, convert it once:\n"
        '  python -c "import torch; from safetensors.torch import save_file; '
        f"save_file({{k: v.contiguous() for k, v in torch.load('{source}', weights_only=True).items()}}, "
        f"'{_safetensors_name(source)}')\""
    )


def from_pretrained_safetensors(cls: type, path: str | os.PathLike, **kwargs: Any):
    """``cls.from_pretrained(path, use_safetensors=True, **kwargs)`` with a clear error for pickle-only folders."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False: diffusers-pafm loads safetensors weights only")
    kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, EnvironmentError, ValueError) as error:
        raise explain_pickle_only(path, kwargs.get("subfolder"), error) from error


class SafetensorsOnlyMixin:
    """``from_pretrained`` with ``use_safetensors=True`` forced and pickle-only folders explained."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: diffusers-pafm loads safetensors weights only")
        kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, EnvironmentError, ValueError) as error:
            raise explain_pickle_only(pretrained_model_name_or_path, kwargs.get("subfolder"), error) from error
