"""Running the training scripts as a user would (subprocesses, real ``accelerate launch``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "training" / "train_pafm.py")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def run(args: list[str], env: dict | None = None, timeout: int = 300, check: bool = True):
    """Run ``python <args>`` (or an accelerate command when args[0] == "accelerate") from the repo root."""
    cmd = [ACCELERATE, *args[1:]] if args[0] == "accelerate" else [sys.executable, *args]
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # every process of the run (launcher and workers, which torchrun puts in sessions of their own) prints
            # where its threads are (faulthandler on SIGABRT), then all are killed
            family = [process, *psutil.Process(process.pid).children(recursive=True)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    member.send_signal(signal.SIGABRT)
            try:
                stdout, stderr = process.communicate(timeout=30)
            finally:
                for member in family:
                    with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                        member.kill()
            raise AssertionError(
                f"{' '.join(cmd)} ran past {timeout} s; its stacks:\n{stdout[-3000:]}\n{stderr[-12000:]}"
            )
    result = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launch(script: str, *args: str) -> list[str]:
    """Real 2-process DDP on CPU with the documented config (``--cpu --num_processes 2`` would run ONE process)."""
    config = str(ROOT / "training" / "accelerate_configs" / "cpu_2_processes.yaml")
    port = str(free_port())
    return ["accelerate", "launch", "--config_file", config, "--main_process_port", port, script, *args]


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]


def tiny_vae(path, sample_size: int = 32):
    """A random-init 2-block AutoencoderKL (4 latent channels, downsampling 2x), saved to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size,
    )
    vae.save_pretrained(path)
    return vae
