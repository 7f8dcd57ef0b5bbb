"""The training engine shared by every trainer of this package (PAFM now, flow maps / VFM later).

One loop, written once, in diffusers' training-script order::

    Accelerator -> seed -> models (subclass) -> data (subclass) -> optimizer, get_scheduler, EMAModel -> prepare
    -> resume -> [ accumulate: loss (subclass) -> backward -> clip -> step ] -> log -> checkpoint -> validate
    -> export pipeline (subclass) -> model card -> push

What makes runs reproducible and resumable exactly:

* **Data order** is a function of (seed, step): every epoch is a seeded permutation; global batch g of the epoch
  is ``perm[g*G:(g+1)*G]`` with G = per-process batch x processes, and process r takes its r-th slice. Resuming at
  step s starts at micro-batch s x accumulation: no batches are replayed or skipped.
* **Randomness** (time, noise, condition dropout) comes from one CPU ``torch.Generator`` seeded identically on
  every process and drawn for the *global* batch, each process keeping its slice: a 2-process run draws the same
  numbers as a 1-process run with the same global batch, and the generator state is identical on all processes.
* **Checkpoints** ``checkpoint-<step>/`` hold the trainable models in diffusers format (``<name>/`` via
  ``save_pretrained``, or ``<name>_lora/`` for adapters) and ``training_state.{safetensors,json}`` (optimizer,
  LR scheduler, EMA, generator, step, the loss module's buffers). No pickle. Written atomically; the oldest
  beyond ``checkpoints_total_limit`` are deleted only after the new one is complete.
* **Exporting a checkpoint**: resume it with ``--max_train_steps`` at its step (into another ``--output_dir``): no
  step runs, and the export (the EMA weights under ``--use_ema``), its report and model card are written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from ..data import DataConfig, EncodedDataset, Encoders, prepare_dataset
from ..models.lora import load_lora_into, save_lora
from ..utils.checkpointing import atomic_directory, load_state, prune, resolve_checkpoint, save_state
from ..utils.images import image_grid
from ..utils.options import ConfigPart, check, option
from ..utils.safetensors_only import from_pretrained_safetensors
from .stability import StepGuard

__all__ = ["TrainingConfig", "DataConfig", "Trainer", "GlobalBatchSampler", "TrainingResult"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingConfig(ConfigPart):
    """Options shared by every trainer; names follow diffusers' training scripts."""

    output_dir: str = option("where checkpoints, logs and the final pipeline go", default="pafm-output")
    seed: int = option("seed for model init, data order, time and noise", default=0)
    max_train_steps: int = option("number of optimizer steps", default=1000)
    train_batch_size: int = option("batch size per process (global batch = this x processes)", default=64)
    gradient_accumulation_steps: int = option("micro-batches per optimizer step", default=1)
    learning_rate: float = option("peak learning rate", default=1e-4)
    lr_scheduler: str = option('diffusers get_scheduler name: "constant", "cosine", "linear", ...', default="constant")
    lr_warmup_steps: int = option("linear warm-up steps", default=0)
    adam_beta1: float = option("AdamW beta1", default=0.9)
    adam_beta2: float = option("AdamW beta2", default=0.999)
    adam_weight_decay: float = option("AdamW weight decay", default=0.0)
    adam_epsilon: float = option("AdamW epsilon", default=1e-8)
    max_grad_norm: float = option("gradient clipping norm (0 = off)", default=1.0)
    max_skipped_steps: int = option(
        "steps with a non-finite or spiking gradient that may be skipped (counted in the log as skipped_steps) "
        "before the run stops with an error naming the step and the loss terms; 0 = stop at the first",
        default=0,
    )
    grad_spike_factor: float = option(
        "a gradient norm above this x the median of the last 50 steps counts as a spike (0 = off)", default=1e4
    )
    mixed_precision: str | None = option('"no", "fp16" or "bf16" (default: accelerate config)', default=None)
    allow_tf32: bool = option("allow TF32 matmuls on Ampere+ GPUs", default=False)
    gradient_checkpointing: bool = option("trade compute for memory in the transformer", default=False)
    checkpointing_steps: int = option("save a resumable checkpoint every N steps", default=500)
    checkpoints_total_limit: int | None = option("keep at most this many checkpoints", default=None)
    resume_from_checkpoint: str | None = option('"latest" or a checkpoint folder', default=None)
    allow_schedule_change: bool = option(
        "resume with a new learning rate / scheduler / length: the schedule restarts from the resumed step",
        default=False,
    )
    use_ema: bool = option("keep an EMA of the trainable weights (exported instead of the raw ones)", default=False)
    ema_decay: float = option("EMA decay (with diffusers' warm-up)", default=0.9999)
    validation_steps: int | None = option("write a validation PNG grid every N steps", default=None)
    report_to: str = option('"tensorboard", "wandb", "all" or "none"', default="tensorboard")
    logging_dir: str = option("tracker folder inside output_dir", default="logs")
    dataloader_num_workers: int = option("DataLoader worker processes", default=0)
    push_to_hub: bool = option("upload the final export (never checkpoints) to the Hub", default=False)
    hub_model_id: str | None = option("Hub repo id (default: the output_dir name)", default=None)
    hub_token: str | None = option("Hub token (default: the logged-in one); never printed", default=None)
    hub_private: bool = option("create the Hub repo as private", default=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "hub_token"}

    def validate(self) -> None:
        super().validate()
        positive = "a positive integer"
        check(
            self.max_train_steps >= 1,
            "max_train_steps",
            self.max_train_steps,
            f"{positive} (0 would export an untrained model)",
        )
        check(self.train_batch_size >= 1, "train_batch_size", self.train_batch_size, positive)
        check(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            positive,
        )
        check(self.checkpointing_steps >= 1, "checkpointing_steps", self.checkpointing_steps, positive)
        check(
            self.validation_steps is None or self.validation_steps >= 0,
            "validation_steps",
            self.validation_steps,
            f"{positive}, or 0 / unset for none",
        )
        limit = self.checkpoints_total_limit
        check(limit is None or limit >= 1, "checkpoints_total_limit", limit, f"{positive} or unset")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")
        check(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "0 or more")
        check(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in (0, 1)")
        check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "0 (off) or a positive number")
        check(self.max_skipped_steps >= 0, "max_skipped_steps", self.max_skipped_steps, "0 or more")
        check(
            self.grad_spike_factor == 0 or self.grad_spike_factor > 1,
            "grad_spike_factor",
            self.grad_spike_factor,
            "0 (off) or a number > 1",
        )
        precisions = (None, "no", "fp16", "bf16")
        check(self.mixed_precision in precisions, "mixed_precision", self.mixed_precision, '"no", "fp16" or "bf16"')
        check(
            self.mixed_precision != "fp16" or torch.cuda.is_available(),
            "mixed_precision",
            self.mixed_precision,
            'fp16 autocast needs a CUDA GPU (on CPU it would silently train in fp32); use "bf16" or "no"',
        )
        logs = Path(self.logging_dir)
        check(
            not logs.is_absolute() and ".." not in logs.parts and str(logs) not in ("", "."),
            "logging_dir",
            self.logging_dir,
            "a sub-folder name inside --output_dir (it is never uploaded)",
        )


@dataclass
class TrainingResult:
    """What ``Trainer.train()`` returns."""

    global_step: int
    output_dir: Path
    losses: list[float]
    export_dir: Path | None = None
    hub_url: str | None = None
    stopped: bool = False
    """True when SIGTERM / SIGINT ended the run early (after a checkpoint; nothing was exported)."""

    def summary(self) -> str:
        """One line for the scripts: the steps this run trained (``losses`` holds one per step run) and the export."""
        if not self.losses:
            return f"no step to train (at step {self.global_step}): exported as it is to {self.export_dir}"
        first = self.global_step - len(self.losses) + 1
        steps = f"steps {first}-{self.global_step}" if first > 1 else f"{self.global_step} steps"
        return f"trained {steps}; pipeline saved to {self.export_dir}"


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Infinite per-process batch sampler whose global batches depend only on (seed, micro-batch index)."""

    def __init__(
        self, num_samples: int, batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0
    ):
        self.num_samples, self.batch_size, self.seed, self.start = num_samples, batch_size, seed, start
        self.num_processes, self.process_index = num_processes, process_index
        self.global_batch = batch_size * num_processes
        self.per_epoch = num_samples // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {self.global_batch} "
                f"({batch_size} per process x {num_processes} processes); lower --train_batch_size"
            )

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self):
        micro, epoch, perm = self.start, None, None
        while True:
            e, g = divmod(micro, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            lo = g * self.global_batch + self.process_index * self.batch_size
            yield perm[lo : lo + self.batch_size].tolist()
            micro += 1


class Trainer:
    """The engine. Subclasses implement the hooks below; :meth:`train` runs everything else.

    Hooks: ``build_dataset`` (a map-style dataset of dicts; called first), ``build_models`` (trainable
    ``nn.Module``s by name),
    ``compute_loss`` (loss tensor + scalars for one local micro-batch), ``validation_images`` (PIL images),
    ``export`` (save the sampling pipeline) and ``model_card`` (README text). Optional: ``extra_state`` (objects
    with ``state_dict`` / ``load_state_dict`` to checkpoint, e.g. memory banks), ``loader_dataset`` (wrap the
    dataset for the loader, e.g. to gather kNN neighbours there), ``lora_models`` (names trained as LoRA adapters).
    """

    config_class = TrainingConfig
    log_keys: tuple[str, ...] = ("loss",)

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.accelerator: Accelerator | None = None
        self.models: dict[str, torch.nn.Module] = {}
        self.generator = torch.Generator()
        """shared by all processes (draws for the global batch)."""
        self.process_generator = torch.Generator()
        """different on every process (per-sample randomness that need not match across process counts)."""
        self.global_step = 0
        self.guard = StepGuard(
            config.max_skipped_steps,
            config.grad_spike_factor,
            scaler_handles_nonfinite=config.mixed_precision == "fp16",
        )
        """refuses optimizer steps with a non-finite or spiking gradient (:mod:`.stability`)."""

    # ---- hooks ---------------------------------------------------------------------------------------------
    def build_models(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def build_dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def compute_loss(self, models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor]):
        """(loss with gradient, dict of float scalars) for the local micro-batch ``batch``."""
        raise NotImplementedError

    def validation_images(self, models: dict[str, torch.nn.Module]) -> tuple[list[Image.Image], int]:
        """(images, columns) for a validation grid; default none."""
        return [], 1

    def export(self, models: dict[str, torch.nn.Module], directory: Path) -> None:
        raise NotImplementedError

    def model_card(self, repo_id: str) -> str | None:
        return None

    def card_fields(self, repo_id: str) -> dict[str, str]:
        """The model-card fields every template shares: license, dataset, names and the run's config as JSON."""
        cfg = self.config
        training = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("output_dir", "logging_dir")}
        return {
            "license": "apache-2.0",
            "dataset": str(getattr(cfg, "dataset", "")),
            "model_name": repo_id,
            "repo_id": repo_id,
            "training_config": "```json\n" + json.dumps(training, indent=2) + "\n```",
        }

    def extra_state(self) -> dict[str, Any]:
        return {}

    def loader_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """The dataset the training loader reads (called after ``build_models``); default ``dataset`` itself.
        Trainers whose objective gathers per-item data (kNN neighbours) wrap it here, so the gather runs in the
        loader's workers."""
        return dataset

    lora_models: tuple[str, ...] = ()

    def prepare_data(self, **encoders: Any) -> tuple[EncodedDataset, Encoders]:
        """Encode ``config.dataset`` once (or reload a ``precompute.py`` folder); writes ``data_report.json``.

        ``encoders`` go to :func:`~diffusers_pafm.data.prepare_dataset` (text encoder, CLIP model, ...).
        """
        cfg, acc = self.config, self.accelerator
        if EncodedDataset.is_encoded_dir(cfg.dataset):
            return EncodedDataset.load(cfg.dataset), Encoders.load(cfg.dataset)
        dataset, report, loaded = prepare_dataset(
            **cfg.prepare_kwargs(),
            work_dir=cfg.output_dir,
            seed=cfg.seed,
            progress=acc.is_local_main_process,
            is_main=acc.is_main_process,
            wait=acc.wait_for_everyone,
            **encoders,
        )
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        for line in report.problems():
            acc.print(
                f"data: {line} (details in {cfg.output_dir}/data_report.json; --strict_data makes this an error)"
            )
        return dataset, loaded

    # ---- randomness drawn for the global batch -------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.config.train_batch_size * self.accelerator.num_processes

    def local_slice(self, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor drawn for the global batch (moved to the training device)."""
        b, r = self.config.train_batch_size, self.accelerator.process_index
        return values[r * b : (r + 1) * b].to(self.accelerator.device)

    # ---- engine --------------------------------------------------------------------------------------------
    def _setup_accelerator(self) -> None:
        cfg = self.config
        out = Path(cfg.output_dir)
        report_to = None if cfg.report_to in ("none", "", None) else cfg.report_to
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # else each CPU process trains alone, silently
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        )
        if self.accelerator.num_processes != world_size:
            raise RuntimeError(
                f"{world_size} processes were launched but accelerate sees {self.accelerator.num_processes}: they "
                "would train independently. On CPU use ACCELERATE_USE_CPU=true with --multi_gpu (not --cpu)."
            )
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise NotImplementedError(
                f"{self.accelerator.distributed_type} shards weights and optimizer state, which this trainer's "
                "safetensors checkpoints do not handle yet; use DDP (training/accelerate_configs/multi_gpu.yaml)"
            )
        if self.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob(".checkpoint-*.tmp-*"):  # left by a run killed while writing a checkpoint
                shutil.rmtree(stale, ignore_errors=True)
                logger.warning("removed the incomplete checkpoint folder %s", stale)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(cfg.seed)
        self.generator.manual_seed(cfg.seed)
        self.process_generator.manual_seed(cfg.seed + 1_000_003 * (self.accelerator.process_index + 1))

    def _unwrapped(self) -> dict[str, torch.nn.Module]:
        return {name: self.accelerator.unwrap_model(m) for name, m in self.models.items()}

    def _trainable(self, models: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
        return [p for m in models.values() for p in m.parameters() if p.requires_grad]

    def parameter_groups(self, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
        """Optimizer parameter groups (hook): one group at ``--learning_rate`` unless a trainer needs several."""
        return [{"params": self._trainable(models)}]

    def _state(self, process_generators: torch.Tensor) -> dict[str, Any]:
        state = {
            "process_generators": process_generators,
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "extra": {name: obj.state_dict() for name, obj in self.extra_state().items()},
            "run_config": run_signature(self.config),
            "step_guard": self.guard.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<global_step>`` atomically (main process), then prune old ones."""
        acc, cfg = self.accelerator, self.config
        path = Path(cfg.output_dir) / f"checkpoint-{self.global_step}"
        process_generators = acc.gather(self.process_generator.get_state().unsqueeze(0).to(acc.device)).cpu()
        if acc.is_main_process:
            with atomic_directory(path) as tmp:
                for name, model in self._unwrapped().items():
                    if name in self.lora_models:
                        save_lora(model, tmp / f"{name}_lora")
                    else:
                        model.save_pretrained(tmp / name)
                save_state(self._state(process_generators), tmp / "training_state")
            prune(cfg.output_dir, cfg.checkpoints_total_limit)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore models, optimizer, scheduler, EMA, generator, step and extra state from ``path``."""
        for name, model in self._unwrapped().items():
            if name in self.lora_models:
                load_lora_into(model, path / f"{name}_lora")
                continue
            folder = path / name
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"checkpoint {path} has no {name}/ model folder")
            weights = from_pretrained_safetensors(type(model), folder, low_cpu_mem_usage=False).state_dict()
            model.load_state_dict(weights)
        state = load_state(path / "training_state")
        self.global_step = int(state["global_step"])
        new_schedule = self._check_resume(path, state.get("run_config"), self.global_step)
        self.optimizer.load_state_dict(state["optimizer"])
        if new_schedule:
            for group in self.optimizer.param_groups:  # the new schedule, fast-forwarded to the resumed step
                group["lr"] = group["initial_lr"] = self.config.learning_rate
            self.lr_scheduler = get_scheduler(
                self.config.lr_scheduler,
                self.optimizer,
                num_warmup_steps=self.config.lr_warmup_steps,
                num_training_steps=self.config.max_train_steps,
            )
            for _ in range(self.global_step):
                self.lr_scheduler.step()
            self.accelerator.print(
                f"--allow_schedule_change: the learning-rate schedule restarts from step {self.global_step} with "
                f"{', '.join(f'--{k} {getattr(self.config, k)}' for k in SCHEDULE_OPTIONS)}"
            )
        else:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        process_generators = state["process_generators"]
        if process_generators.shape[0] != self.accelerator.num_processes:
            raise ValueError(
                f"checkpoint {path} was written by {process_generators.shape[0]} processes; resume it with the same "
                f"number (this run has {self.accelerator.num_processes})"
            )
        # a copy: Generator.set_state ignores a view's storage offset, so on rank 1 a row view gave bytes that were
        # not its state ("Invalid mt19937 state" on resuming a 2-process run)
        self.process_generator.set_state(process_generators[self.accelerator.process_index].clone())
        torch.set_rng_state(state["torch_rng"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"--use_ema is set but checkpoint {path} has no EMA state")
            self.ema.load_state_dict(state["ema"])
        for name, obj in self.extra_state().items():
            obj.load_state_dict(state["extra"][name])
        if "step_guard" in state:
            self.guard.load_state_dict(state["step_guard"])

    def _check_resume(self, path: Path, saved: dict[str, Any] | None, step: int) -> bool:
        """Refuse a resume whose options differ from the checkpoint's in a way that cannot be honoured exactly;
        returns whether the learning-rate schedule must be rebuilt (``--allow_schedule_change``). ``--max_train_steps``
        equal to the checkpoint's step exports that checkpoint: no step runs, so no schedule is used."""
        if step > self.config.max_train_steps:
            raise ValueError(
                f"checkpoint {path} is at step {step}, past --max_train_steps {self.config.max_train_steps}: pass "
                f"--max_train_steps {step} to export it as it is, or more to train on"
            )
        if saved is None:
            logger.warning("checkpoint %s records no run config (older version); options are not compared", path)
            return False
        current = run_signature(self.config)
        differences = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))}
        differences = {k: v for k, v in differences.items() if v[0] != v[1]}
        constant = self.config.lr_scheduler in ("constant", "constant_with_warmup")
        if set(differences) == {"max_train_steps"} and (constant or step == self.config.max_train_steps):
            return False  # a constant schedule does not depend on the run's length; at its step nothing is trained
        schedule = {k: v for k, v in differences.items() if k in SCHEDULE_OPTIONS}
        others = {k: v for k, v in differences.items() if k not in SCHEDULE_OPTIONS}
        listing = "; ".join(f"--{k}: checkpoint {a!r}, now {b!r}" for k, v in differences.items() for a, b in [v])
        if others:
            raise ValueError(
                f"cannot resume {path} exactly: {listing}. Resume with the checkpoint's values, or start a new run "
                "in another --output_dir"
            )
        if schedule and not self.config.allow_schedule_change:
            raise ValueError(
                f"resuming {path} with another learning-rate schedule: {listing}. Pass --allow_schedule_change to "
                "restart the schedule from the resumed step, or resume with the checkpoint's values"
            )
        return bool(schedule)

    def _log_path(self) -> Path:
        return Path(self.config.output_dir) / "train_log.jsonl"

    def _step_logs(self) -> list[Path]:
        """The run's JSON-lines logs keyed by ``step`` (a trainer that writes another one adds it)."""
        return [self._log_path()]

    def _truncate_log(self, step: int) -> None:
        """Keep only the lines of steps <= ``step`` in every step log (a resumed run rewrites the steps after its
        checkpoint; a new run in a used folder starts them empty)."""
        if not self.accelerator.is_main_process:
            return
        for path in filter(Path.is_file, self._step_logs()):
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    @contextlib.contextmanager
    def _sampling_models(self) -> Iterator[dict[str, torch.nn.Module]]:
        """The unwrapped models in eval mode with the EMA weights swapped in; training state restored on exit."""
        models = self._unwrapped()
        if self.ema is not None:
            self.ema.store(self._trainable(models))
            self.ema.copy_to(self._trainable(models))
        for m in models.values():
            m.eval()
        try:
            yield models
        finally:
            for m in models.values():
                m.train()
            if self.ema is not None:
                self.ema.restore(self._trainable(models))

    def validate(self) -> Path | None:
        """Write ``validation/step-<N>.png`` (EMA weights if any) and log it to the trackers."""
        acc = self.accelerator
        path = None
        if acc.is_main_process:
            with self._sampling_models() as models:
                images, cols = self.validation_images(models)
            if images:
                rows = math.ceil(len(images) / cols)
                path = Path(self.config.output_dir) / "validation" / f"step-{self.global_step}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                scale = max(1, 128 // images[0].size[0])
                image_grid(images, rows, cols, scale).save(path)
                for tracker in acc.trackers:
                    if tracker.name == "tensorboard":
                        array = np.stack([np.asarray(im.convert("RGB")) for im in images])
                        tracker.writer.add_images("validation", array, self.global_step, dataformats="NHWC")
        acc.wait_for_everyone()
        return path

    def train(self) -> TrainingResult:
        """Run the whole job; returns the step reached, the logged losses and where the export went."""
        cfg = self.config
        self._setup_accelerator()
        acc = self.accelerator
        dataset = self.build_dataset()
        self.models = self.build_models()
        dataset = self.loader_dataset(dataset)
        for model in self.models.values():
            model.train()
            if cfg.gradient_checkpointing:
                model.enable_gradient_checkpointing()
        groups = [group for group in self.parameter_groups(self.models) if group["params"]]
        params = [p for group in groups for p in group["params"]]
        if not params:
            raise ValueError("no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_train_steps,
        )
        self.ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True) if cfg.use_ema else None
        names = list(self.models)
        prepared = acc.prepare(*self.models.values(), self.optimizer)
        self.models, self.optimizer = dict(zip(names, prepared[:-1])), prepared[-1]
        if self.ema is not None:
            self.ema.to(acc.device)

        if cfg.resume_from_checkpoint:
            path = resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
            if path is None:
                acc.print(f"no checkpoint found in {cfg.output_dir}; starting a new run")
            else:
                self.load_checkpoint(path)
                acc.print(f"resumed from {path} at step {self.global_step}")
        self._truncate_log(self.global_step)
        if acc.is_main_process:
            acc.init_trackers("diffusers_pafm", config=_tracker_config(cfg.to_dict()))

        sampler = GlobalBatchSampler(
            len(dataset),
            cfg.train_batch_size,
            acc.num_processes,
            acc.process_index,
            cfg.seed,
            start=self.global_step * cfg.gradient_accumulation_steps,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.dataloader_num_workers)
        batches = iter(loader)
        losses: list[float] = []
        bar = tqdm(
            total=cfg.max_train_steps,
            initial=self.global_step,
            desc="train",
            disable=not acc.is_local_main_process,
            mininterval=1.0,
        )
        start = time.perf_counter()
        log_file = self._log_path().open("a") if acc.is_main_process else None
        stop = _StopRequest()
        try:
            while self.global_step < cfg.max_train_steps:
                sums: dict[str, float] = {}
                for _ in range(cfg.gradient_accumulation_steps):
                    batch = {k: v.to(acc.device) for k, v in next(batches).items()}
                    with acc.accumulate(*self.models.values()):
                        with acc.autocast():
                            loss, scalars = self.compute_loss(self.models, batch)
                        acc.backward(loss)
                        if acc.sync_gradients:  # gradients are synchronised here: every process decides alike
                            norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                            if self.guard.check(norm, self.global_step + 1, scalars):
                                self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    for k, v in scalars.items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.gradient_accumulation_steps
                lr = self.lr_scheduler.get_last_lr()[0]
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.step(self._trainable(self._unwrapped()))
                self.global_step += 1
                # one all-reduce per step: the logged means and whether any process received a stop signal
                values = [*sums.values(), float(stop.signal_name is not None)]
                reduced = acc.reduce(torch.tensor(values, device=acc.device), reduction="mean").tolist()
                means, stop_requested = reduced[:-1], reduced[-1] > 0
                record = {
                    "step": self.global_step,
                    **dict(zip(sums, means)),
                    **({"skipped_steps": self.guard.skipped} if self.guard.skipped else {}),
                    "lr": lr,
                    "seconds": round(time.perf_counter() - start, 3),
                }
                losses.append(record["loss"])
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                acc.log({k: v for k, v in record.items() if k != "step"}, step=self.global_step)
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in self.log_keys if k in record}, refresh=False)
                saved = self.global_step % cfg.checkpointing_steps == 0
                if saved:
                    self.save_checkpoint()
                if cfg.validation_steps and self.global_step % cfg.validation_steps == 0:
                    self.validate()
                if stop_requested and self.global_step < cfg.max_train_steps:
                    path = Path(cfg.output_dir) / f"checkpoint-{self.global_step}"
                    if not saved:
                        path = self.save_checkpoint()
                    signal_name = stop.signal_name or "a signal on another process"
                    acc.print(
                        f"stopped by {signal_name} after step {self.global_step}: checkpoint {path}; continue "
                        "with --resume_from_checkpoint latest"
                    )
                    acc.end_training()
                    return TrainingResult(self.global_step, Path(cfg.output_dir), losses, stopped=True)
        finally:
            stop.restore()
            bar.close()
            if log_file is not None:
                log_file.close()

        result = TrainingResult(self.global_step, Path(cfg.output_dir), losses)
        result.export_dir = self.save_export()
        if cfg.push_to_hub and acc.is_main_process:
            from ..utils.hub import push_export

            result.hub_url = push_export(result.export_dir, self.repo_id, token=cfg.hub_token, private=cfg.hub_private)
            acc.print(f"pushed {result.export_dir} to {result.hub_url}")
        acc.wait_for_everyone()
        acc.end_training()
        return result

    @property
    def repo_id(self) -> str:
        return self.config.hub_model_id or Path(self.config.output_dir).resolve().name

    def save_export(self, directory: str | os.PathLike | None = None) -> Path:
        """Save the sampling pipeline (EMA weights if any) and its model card to ``directory`` (default output_dir)."""
        acc = self.accelerator
        directory = Path(directory or self.config.output_dir)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with self._sampling_models() as models:
                self.export(models, directory)
            names = getattr(getattr(self, "dataset", None), "meta", {}).get("label_names")
            if names:  # what each class id stands for (sub-folder, ClassLabel name, or the original sparse id)
                (directory / "label_map.json").write_text(json.dumps(dict(enumerate(names)), indent=2))
            card = self.model_card(self.repo_id)
            if card is not None:
                (directory / "README.md").write_text(card)
        acc.wait_for_everyone()
        return directory


class _StopRequest:
    """SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) set a flag instead of killing the step; the loop reduces
    it with the step's logged means, so that every process stops after the same step."""

    def __init__(self):
        self.signal_name: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


FREE_OPTIONS = {
    "output_dir",
    "logging_dir",
    "report_to",
    "validation_steps",
    "validation_prompts",
    "validation_inference_steps",
    "guidance_scale",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "allow_schedule_change",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_private",
    "dataloader_num_workers",
    "strict_data",
    "max_skipped_steps",
    "grad_spike_factor",
}
"""options a resumed run may change freely: they do not shape the training trajectory"""
SCHEDULE_OPTIONS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps")


def run_signature(config: TrainingConfig) -> dict[str, Any]:
    """The options that shape a run's trajectory (stored in every checkpoint, compared on resume)."""
    return {
        k: v
        for k, v in config.to_dict().items()
        if k not in FREE_OPTIONS and isinstance(v, (int, float, str, bool, type(None)))
    }


def _tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """Tracker hyper-parameters must be scalars: None becomes "none", others are stringified."""
    return {
        k: ("none" if v is None else v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in config.items()
    }
