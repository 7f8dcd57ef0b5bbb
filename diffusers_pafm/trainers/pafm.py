"""PAFMTrainer: train or fine-tune a diffusers transformer with FM / STF / EFM / StableVM / PAFM.

Data flows one way::

    dataset (built-in, image folder, shards) -> encode once (VAE latents, text-encoder states, CLIP embeddings)
    -> global batch -> candidates -> posterior weights -> target -> loss -> optimizer

* ``--model dit``: class-conditional ``DiTTransformer2DModel`` (labels dropped in the objective, SiT-style).
* ``--model sd3``: text-conditioned ``SD3Transformer2DModel`` with a real text encoder (open_clip by name / local
  folder, or a transformers model); captions dropped to the empty prompt in the objective.
* Pixel space for small images, latent space with ``--vae`` (a diffusers ``AutoencoderKL`` folder).
* ``--condition_likelihood clip`` weights candidates by CLIP similarity between the row's caption and each candidate
  image (CLIP from ``--clip_model``; offline default: a tiny CLIP fitted on the training set first).

Usable from a notebook: ``PAFMTrainer(PAFMTrainingConfig(dataset="digits", max_train_steps=100)).train()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image

from ..data import DataConfig, EncodedDataset, EncoderConfig
from ..models import PeftDiTTransformer2DModel, build_dit, build_sd3
from ..models.lora import add_lora, base_model_copy, save_lora
from ..models.velocity_model import VelocityModel
from ..pafm.batch import FlowBatch
from ..pafm.config import PosteriorConfig
from ..pafm.knn import KNNLookup
from ..pafm.presets import make_loss
from ..pipelines import FlowMatchingPipeline
from ..time_sampling import TimeSampler
from ..utils.options import check, option
from ..utils.safetensors_only import from_pretrained_safetensors
from .engine import Trainer, TrainingConfig

__all__ = ["PAFMTrainingConfig", "PAFMTrainer"]


@dataclass
class PAFMTrainingConfig(TrainingConfig, DataConfig, EncoderConfig, PosteriorConfig):
    """Everything ``training/train_pafm.py`` accepts (engine options + data, model and objective)."""

    output_dir: str = option("where checkpoints, logs and the final pipeline go", default="pafm-output")
    # model
    model: str = option('"dit" (class-conditional) or "sd3" (text-conditioned MMDiT)', default="dit")
    model_size: str = option("test | tiny | small | base (ignored with a pretrained model)", default="tiny")
    patch_size: int = option("transformer patch size", default=2)
    num_classes: int | None = option("number of classes (default: from the dataset)", default=None)
    pretrained_model_name_or_path: str | None = option("start from this transformer / pipeline folder", default=None)
    # objective (the posterior options come from PosteriorConfig)
    fm_mix: float = option("lambda in lambda * FM + (1 - lambda) * PAFM", default=0.0)
    class_dropout: float = option("condition dropout for classifier-free guidance", default=0.1)
    weighting_scheme: str = option("time density: logit_normal | uniform | mode", default="logit_normal")
    logit_mean: float = option("logit-normal mean", default=0.0)
    logit_std: float = option("logit-normal std", default=1.0)
    mode_scale: float = option("mode-sampling scale", default=1.29)
    # LoRA
    lora_rank: int = option("train a LoRA adapter of this rank instead of all weights (0 = full)", default=0)
    lora_alpha: float | None = option("LoRA alpha (default: rank)", default=None)
    # validation
    validation_prompts: str | None = option('prompts separated by "|" (default: first dataset captions)', default=None)
    validation_inference_steps: int = option("Euler steps for validation images", default=25)
    guidance_scale: float = option("classifier-free guidance scale for validation", default=2.0)

    def validate(self) -> None:
        super().validate()
        check(self.model in ("dit", "sd3"), "model", self.model, 'one of "dit", "sd3"')
        check(0 <= self.class_dropout < 1, "class_dropout", self.class_dropout, "a probability in [0, 1)")
        check(0 <= self.fm_mix <= 1, "fm_mix", self.fm_mix, "a number in [0, 1]")
        check(self.lora_rank >= 0, "lora_rank", self.lora_rank, "0 (full fine-tuning) or a positive rank")
        check(self.num_classes is None or self.num_classes >= 1, "num_classes", self.num_classes, "a positive integer")


class PAFMTrainer(Trainer):
    """The PAFM family on diffusers transformers; see the module docstring.

    Examples:
        ```py
        >>> from diffusers_pafm import PAFMTrainer, PAFMTrainingConfig

        >>> config = PAFMTrainingConfig(dataset="digits", objective="pafm", max_train_steps=200, output_dir="OUT")
        >>> result = PAFMTrainer(config).train()  # doctest: +SKIP
        >>> result.export_dir  # doctest: +SKIP
        PosixPath('OUT')
        ```
    """

    config_class = PAFMTrainingConfig
    log_keys = ("loss", "ess")

    def __init__(self, config: PAFMTrainingConfig):
        super().__init__(config)
        self.vae = self.text_encoder = self.tokenizer = None
        self.dataset: EncodedDataset | None = None
        self.lora_models = ("transformer",) if config.lora_rank > 0 else ()

    # ---- data ----------------------------------------------------------------------------------------------
    def build_dataset(self) -> EncodedDataset:
        cfg = self.config
        if cfg.model not in ("dit", "sd3"):
            raise ValueError(f"unknown --model {cfg.model!r}; choose 'dit' or 'sd3'")
        dataset, encoders = self.prepare_data(want_text_encoder=cfg.model == "sd3")
        if cfg.model == "sd3" and dataset.arrays.get("text_hidden") is None:
            raise ValueError(
                f"--model sd3 needs captions, but none were found in {dataset.meta.get('source') or cfg.dataset}; "
                "name the caption column with --caption_column, or use --model dit for class labels"
            )
        self.vae, self.text_encoder, self.tokenizer = encoders.vae, encoders.text_encoder, encoders.tokenizer
        self.dataset = dataset
        return dataset

    # ---- models and objective ------------------------------------------------------------------------------
    def build_models(self) -> dict[str, torch.nn.Module]:
        cfg, data = self.config, self.dataset
        channels, size = data.sample_shape[0], data.sample_shape[-1]
        if cfg.pretrained_model_name_or_path:
            folder = Path(cfg.pretrained_model_name_or_path)
            sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
            cls = SD3Transformer2DModel if cfg.model == "sd3" else PeftDiTTransformer2DModel
            transformer = from_pretrained_safetensors(cls, cfg.pretrained_model_name_or_path, subfolder=sub)
        elif cfg.model == "sd3":
            hidden, pooled = data.arrays["text_hidden"], data.arrays["text_pooled"]
            transformer = build_sd3(cfg.model_size, channels, size, hidden.shape[-1], pooled.shape[-1], cfg.patch_size)
        else:
            num_classes = cfg.num_classes or data.num_classes
            if num_classes is None:
                labels = data.arrays.get("class_labels")
                if labels is None:
                    raise ValueError(f"--model dit needs class labels, but dataset {cfg.dataset!r} has none")
                num_classes = int(labels.max()) + 1
            transformer = build_dit(cfg.model_size, channels, size, num_classes, cfg.patch_size)
        config = transformer.config
        model_classes = config.get("num_embeds_ada_norm") if cfg.model == "dit" else None
        data.check(
            sample_shape=(config.in_channels, config.sample_size, config.sample_size), num_classes=model_classes
        )
        if cfg.lora_rank > 0:
            add_lora(transformer, cfg.lora_rank, cfg.lora_alpha)
        self.loss_fn = self._build_loss(model_classes).to(self.accelerator.device)
        return {"transformer": transformer}

    def _build_loss(self, num_classes: int | None):
        cfg = self.config
        text = self.config.model == "sd3"
        condition = cfg.condition_likelihood
        if condition is None and cfg.objective in ("pafm", "stablevm"):
            condition = "clip" if text else "class"
        self.caption_ids = None
        if condition == "caption":
            if not text or not self.dataset.captions:
                raise ValueError("--condition_likelihood caption needs captioned data and --model sd3")
            self.caption_ids, num_classes = caption_classes(self.dataset.captions)
            condition = "class"
        loss = make_loss(
            cfg.objective,
            **cfg.posterior_kwargs(self.dataset, cfg.dataset, num_classes, condition),
            temperature=cfg.temperature,
            target_ess=cfg.target_ess,
            fm_mix=cfg.fm_mix,
            form=cfg.loss_form,
            class_dropout=cfg.class_dropout,
            null_conditioning=self.dataset.null_conditioning() if text else None,
            time_sampler=TimeSampler(cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale),
        )
        return loss

    def extra_state(self) -> dict[str, Any]:
        return {"loss": self.loss_fn}

    def loader_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        candidates = self.loss_fn.candidates  # None for plain FM
        return dataset if candidates is None else candidates.loader_dataset(dataset)

    def compute_loss(self, models, batch):
        """One micro-batch: randomness drawn for the global batch (process-count invariant), then PAFMLoss."""
        x = batch["x"]
        g = self.global_batch_size
        t = self.local_slice(self.loss_fn.time_sampler(g, generator=self.generator))
        noise = self.local_slice(torch.randn((g, *x.shape[1:]), generator=self.generator)).to(x.dtype)
        drop = (
            self.local_slice(self.loss_fn.draw_dropout(g, self.generator)) if self.loss_fn.class_dropout > 0 else None
        )
        conditioning = None
        if "text_hidden" in batch and self.config.model == "sd3":
            conditioning = {"encoder_hidden_states": batch["text_hidden"], "pooled_projections": batch["text_pooled"]}
        labels = batch.get("class_labels") if self.config.model == "dit" else None
        if self.caption_ids is not None:
            if self.caption_ids.device != x.device:  # once, not every step
                self.caption_ids = self.caption_ids.to(x.device)
            labels = self.caption_ids[batch["sample_ids"]]
        flow_batch = FlowBatch(
            x=x,
            class_labels=labels,
            text_embeds=batch.get("clip_text"),
            image_embeds=batch.get("clip_image"),
            sample_ids=batch["sample_ids"],
            conditioning=conditioning,
            neighbours=KNNLookup.from_batch(batch),
        )
        out = self.loss_fn(VelocityModel(models["transformer"]), flow_batch, t=t, noise=noise, drop=drop)
        scalars = out.scalars()
        scalars.pop("t")
        return out.loss, scalars

    # ---- sampling, export, card ----------------------------------------------------------------------------
    def pipeline(self, transformer: torch.nn.Module) -> FlowMatchingPipeline:
        return FlowMatchingPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
        )

    def _validation_conditions(self) -> dict[str, Any]:
        if self.config.model == "sd3":
            prompts = self.config.validation_prompts
            prompts = prompts.split("|") if prompts else list(dict.fromkeys(self.dataset.captions or []))[:4]
            return {"prompt": prompts}
        classes = self.dataset.num_classes or self.models["transformer"].config.get("num_embeds_ada_norm") or 1
        return {"class_labels": list(range(min(classes, 10)))}

    def validation_images(self, models) -> tuple[list[Image.Image], int]:
        pipe = self.pipeline(models["transformer"])
        pipe.set_progress_bar_config(disable=True)
        cols = 4
        images = pipe(
            **self._validation_conditions(),
            num_images_per_prompt=cols,
            num_inference_steps=self.config.validation_inference_steps,
            guidance_scale=self.config.guidance_scale,
            generator=torch.Generator().manual_seed(self.config.seed),
        ).images
        return images, cols

    def export(self, models, directory: Path) -> None:
        transformer = models["transformer"]
        if self.lora_models:
            save_lora(transformer, directory)
            transformer = base_model_copy(transformer)
        self.pipeline(transformer).save_pretrained(directory)

    def model_card(self, repo_id: str) -> str:
        from ..utils.hub import render_model_card

        cfg = self.config
        text = cfg.model == "sd3"
        conditions = self._validation_conditions()
        call = f"prompt={conditions['prompt'][:2]!r}" if text else f"class_labels={conditions['class_labels'][:3]!r}"
        lora = (
            f'\npipe.load_lora_weights("{repo_id}")  # LoRA adapter (pytorch_lora_weights.safetensors)'
            if self.lora_models
            else ""
        )
        return render_model_card(
            "pafm_model_card",
            **self.card_fields(repo_id),
            base_model_yaml=f"base_model: {base}\n" if (base := cfg.pretrained_model_name_or_path) else "",
            pipeline_tag="text-to-image" if text else "unconditional-image-generation",
            model_type=f"{'text-conditioned MMDiT' if text else 'class-conditional DiT'} ({cfg.model_size})",
            objective=cfg.objective,
            candidates=cfg.candidates or "the preset's",
            condition_likelihood=cfg.condition_likelihood or ("CLIP" if text else "class-match"),
            usage_call=call,
            lora_usage=lora,
            metrics=f"Final training loss: see `train_log.jsonl`; steps: {self.global_step}.",
        )


def caption_classes(captions: list[str]) -> tuple[torch.Tensor, int]:
    """Caption-as-class: ids [N] numbering the distinct captions in order of appearance, and their count."""
    ids: dict[str, int] = {}
    labels = [ids.setdefault(caption, len(ids)) for caption in captions]
    return torch.tensor(labels, dtype=torch.long), len(ids)
