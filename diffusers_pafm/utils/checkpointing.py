"""Training checkpoints without pickle: nested state dicts as safetensors + JSON, folders written atomically.

``save_state(state, path)`` writes ``path.safetensors`` (every tensor, keyed by its position in the nested
structure) and ``path.json`` (everything else, tensors replaced by ``{"__tensor__": key}``); ``load_state`` puts
the two back together. This covers ``optimizer.state_dict()``, LR-scheduler and ``EMAModel`` states, RNG states
and module buffers, so resuming never unpickles anything.

A checkpoint folder ``<output_dir>/checkpoint-<step>`` is first written to a hidden temporary sibling and renamed
into place only once complete (``atomic_directory``): a crash or ``kill -9`` mid-write leaves the previous
checkpoint untouched and ``latest`` never points at a half-written folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_state", "load_state", "atomic_directory", "list_checkpoints", "resolve_checkpoint", "prune"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state keys must be str or int, got {list(obj)} at {prefix!r}")
        return {"__dict__": [[k, _split(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a safetensors checkpoint")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state(state: Any, path: str | os.PathLike) -> None:
    """Write a nested state (str/int-keyed dicts, lists, tuples, tensors, scalars) to ``path.{safetensors,json}``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    save_file({k or "_": v for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(skeleton))


def load_state(path: str | os.PathLike) -> Any:
    """Inverse of :func:`save_state` (tensors are loaded on CPU)."""
    path = Path(path)
    for suffix in (".json", ".safetensors"):
        if not path.with_suffix(suffix).is_file():
            raise FileNotFoundError(f"checkpoint state file {path.with_suffix(suffix)} is missing")
    tensors = load_file(str(path.with_suffix(".safetensors")))
    if "_" in tensors:
        tensors[""] = tensors.pop("_")
    return _join(json.loads(path.with_suffix(".json").read_text()), tensors)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders under ``output_dir``, oldest first (temporary folders are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if p.is_dir()]


def resolve_checkpoint(output_dir: str | os.PathLike, which: str) -> Path | None:
    """``"latest"`` -> newest checkpoint under ``output_dir`` (``None`` if there is none), else the given path."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(which)
    if not path.is_dir():
        path = Path(output_dir) / which
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {which!r}: no such checkpoint folder")
    return path


def prune(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``keep`` remain; returns the removed folders."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    removed = found[: max(len(found) - keep, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed
