"""How a benchmark reports: where it ran, and one JSON file per run with its configuration and runtime."""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "write_results"]


def environment() -> dict[str, str]:
    """Where a benchmark ran: today's date and the hardware (GPU name if CUDA is used, else CPU threads) + torch."""
    if torch.cuda.is_available():
        hardware = f"{torch.cuda.get_device_name()} GPU"
    else:
        hardware = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"hardware": f"{hardware}, torch {torch.__version__}", "date": datetime.date.today().isoformat()}


def write_results(
    output_dir: str | Path, name: str, results: dict[str, Any], config: dict[str, Any], start: float
) -> Path:
    """Write ``results`` with ``config`` (the run's options), the seconds since ``start`` (``time.perf_counter()``)
    and :func:`environment` to ``output_dir/<name>.json`` (pictures are the caller's); say so, return the path."""
    path = Path(output_dir) / f"{name}.json"
    results = {**results, "config": config, "seconds": round(time.perf_counter() - start, 1), **environment()}
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path} in {results['seconds']} s")
    return path
