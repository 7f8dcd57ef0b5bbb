"""RewardTrainer: reward-tilted one-step generation, VFM's objective with a reward as the data term.

    z ~ q_phi(z | c),  L = -R(f_theta-(z | c), c) / beta + KL(q_phi(z | c) || N(0, I)) + L_MF(theta) / (2 tau^2)

targets p_beta(x | c) ~ p(x | c) exp(R(x, c) / beta) in one step (:class:`~diffusers_pafm.flow_maps.RewardTerm`).
Starts from a trained flow map (``train_vfm.py --stage meanflow``). The context c (``--reward_context``) is the class
label (a class-conditional map on labelled data; the map is conditioned on c too), or the caption of captioned data:
the adapter sees its L2-normalised CLIP text embedding (the data's ``clip_text``, from ``--clip_model``), the reward
the caption itself, and the map samples its unconditional prior (the null label), so p(x | c) = p(x). The MeanFlow
term sees fresh noise only (the adapter's noise is not coupled to data of p_beta), so it keeps the map a flow map of
the data; the reward's gradient trains the adapter alone, through a stop-gradient copy of the map. (Letting it bend
the map too was an option until it was measured: on the checkerboard it moved the map off the data, and on digits it
raised the judge's accuracy at +22 Fréchet distance; ``benchmarks/README.md`` §15 and §17.)

Data flows: labelled / captioned images -> (VAE latents) -> x, c; c -> adapter -> z -> flow map -> (VAE decode)
-> R. Export: a :class:`~diffusers_pafm.RewardTiltedFlowMapPipeline` (with the text encoder for text contexts), with
``reward_report.json`` (reward and drift measured at the end) in the model card.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import FlowMapEulerDiscreteScheduler
from PIL import Image

from ..data import DataConfig, EncodedDataset
from ..evaluation.metrics import mmd
from ..flow_maps import FlowMapModel, RewardTerm, VFMLoss, check_reward, sample_flow_map, stop_gradient
from ..models import ContextNoiseAdapterModel, OpenCLIPTextEncoder
from ..pipelines import RewardTiltedFlowMapPipeline
from ..rewards import REWARD_KINDS, load_reward
from ..utils.hub import render_model_card
from ..utils.images import to_pil
from ..utils.options import ConfigPart, check, option
from .meanflow import (
    FlowMapConfig,
    FlowMapTrainerBase,
    FlowMapTrainingConfig,
    build_flow_map,
    build_meanflow_loss,
    flow_batch,
)

__all__ = ["RewardConfig", "RewardTrainingConfig", "RewardTrainer"]

CONTEXTS = ("class", "text")


@dataclass
class RewardConfig(ConfigPart):
    """The reward, its temperature and the context adapter."""

    reward: str | None = option("the reward R(images in [-1, 1], context): " + " | ".join(REWARD_KINDS), default=None)
    reward_context: str = option(
        'what the adapter and the reward are conditioned on: "class" (the class label) or "text" (the caption; the '
        "adapter sees its CLIP text embedding, the reward the caption)",
        default="class",
    )
    reward_prompts: str = option(
        'a clip reward\'s prompt per class: a template with "{label}" (the class names of the data)',
        default="{label}",
    )
    beta: float = option("reward temperature: the target is p(x | c) exp(R(x, c) / beta)", default=1.0)
    tau: float = option("tolerance of the flow-map term (its weight is 1 / (2 tau^2))", default=1.0)
    adaptive_eps: float = option("c in L / sg(L + c)", default=0.01)
    report_samples: int = option("samples per class for the reward / drift report at the end", default=32)

    def validate(self) -> None:
        super().validate()
        check(self.reward_context in CONTEXTS, "reward_context", self.reward_context, " or ".join(CONTEXTS))
        check(self.beta > 0, "beta", self.beta, "a positive number")
        check(self.tau > 0, "tau", self.tau, "a positive number")
        check(self.adaptive_eps > 0, "adaptive_eps", self.adaptive_eps, "a positive number")
        check(self.report_samples >= 2, "report_samples", self.report_samples, "an integer >= 2")


@dataclass
class RewardTrainingConfig(FlowMapTrainingConfig, DataConfig, FlowMapConfig, RewardConfig):
    """Everything ``training/train_vfm.py --stage reward`` accepts."""

    output_dir: str = option("where checkpoints, logs and the final pipeline go", default="reward-output")


class RewardTrainer(FlowMapTrainerBase):
    """Reward fine-tuning of a flow map and a context noise adapter (module docstring).

    Examples:
        ```py
        >>> from diffusers_pafm import RewardTrainer, RewardTrainingConfig

        >>> config = RewardTrainingConfig(dataset="digits", pretrained_model_name_or_path="flowmap-digits",
        ...                               reward="classifier:digit-classifier", beta=0.1)
        >>> RewardTrainer(config).train()  # doctest: +SKIP
        ```
    """

    config_class = RewardTrainingConfig
    log_keys = ("loss", "reward", "kl")

    def __init__(self, config: RewardTrainingConfig, reward: Callable[..., torch.Tensor] | None = None):
        """``reward``: a Python callable R(images in [-1, 1], class labels) -> [B] used instead of the spec
        ``config.reward`` (which then records its name, ``module:function``, in the config and model card)."""
        if reward is not None:
            if config.reward is not None:
                raise ValueError(f"give the reward once: reward={reward!r} and --reward {config.reward!r}")
            if not callable(reward):
                raise TypeError(f"reward must be a callable R(images, class_labels) -> [B], got {type(reward)}")
            name = getattr(reward, "__qualname__", type(reward).__qualname__)
            config.reward = f"{getattr(reward, '__module__', None) or type(reward).__module__}:{name}"
        elif config.reward is None:
            raise ValueError(f"--reward is required: one of {' | '.join(REWARD_KINDS)} (or reward= in Python)")
        self.user_reward = reward
        super().__init__(config)
        if not config.pretrained_model_name_or_path:
            raise ValueError(
                "--pretrained_model_name_or_path is required: reward fine-tuning starts from a trained flow map "
                "(train one with train_vfm.py --stage meanflow: on labelled data for --reward_context class, on any "
                "data for --reward_context text)"
            )

    @property
    def text_context(self) -> bool:
        return self.config.reward_context == "text"

    def build_dataset(self) -> EncodedDataset:
        dataset = super().build_dataset()
        if self.text_context:
            if not dataset.captions or dataset.arrays.get("clip_text") is None:
                raise ValueError(
                    f"--reward_context text needs captioned data with CLIP text embeddings; --dataset "
                    f"{self.config.dataset} has {'no captions' if not dataset.captions else 'no clip_text'} (use "
                    "captioned data: shapes, an image folder with metadata.jsonl, or parquet with a caption column)"
                )
            if self.encoders.clip_path is None:
                raise ValueError(
                    f"--reward_context text: the CLIP model that embedded the captions of {self.config.dataset} is "
                    "not known (encode the data with --clip_model, or precompute it with training/precompute.py)"
                )
            return dataset
        if dataset.num_classes is None or dataset.arrays.get("class_labels") is None:
            raise ValueError(
                f"--dataset {self.config.dataset} has no class labels; the reward stage conditions on the class "
                "label (use labelled data, e.g. digits, patches or an image folder with class sub-folders)"
            )
        return dataset

    def _reward(self):
        if self.user_reward is not None:
            return self.user_reward
        if self.text_context:
            return load_reward(self.config.reward)  # the context is the caption itself
        names = self.dataset.meta.get("label_names") or [str(i) for i in range(self.dataset.num_classes)]
        prompts = [self.config.reward_prompts.format(label=name) for name in names]
        return load_reward(self.config.reward, prompts)

    def _adapter(self) -> ContextNoiseAdapterModel:
        folder = Path(self.config.pretrained_model_name_or_path)
        context = (
            {"context_dim": self.dataset.arrays["clip_text"].shape[1]}
            if self.text_context
            else {"num_classes": self.dataset.num_classes}
        )
        if (folder / "noise_adapter" / "config.json").is_file():
            adapter = ContextNoiseAdapterModel.from_pretrained(folder, subfolder="noise_adapter", use_safetensors=True)
        else:
            adapter = ContextNoiseAdapterModel(latent_shape=self.dataset.sample_shape, **context)
        ((key, value),) = context.items()
        if adapter.config[key] != value:
            raise ValueError(
                f"the noise adapter of {folder} has {key}={adapter.config[key]}, the data (--reward_context "
                f"{self.config.reward_context}) {value}"
            )
        return adapter

    def build_models(self) -> dict[str, torch.nn.Module]:
        cfg = self.config
        flow_map = build_flow_map(cfg, self.dataset)
        self.text_encoder = None
        if self.text_context:  # saved with the pipeline: it embeds a user's prompt as the data's captions were
            self.text_encoder = OpenCLIPTextEncoder.from_open_clip(self.encoders.clip_path)
            self.text_encoder.requires_grad_(False).to(self.accelerator.device)
        elif flow_map.config.num_embeds_ada_norm != self.dataset.num_classes:
            raise ValueError(
                f"the flow map of {cfg.pretrained_model_name_or_path} has {flow_map.config.num_embeds_ada_norm} "
                f"classes but the data has {self.dataset.num_classes}; the reward's context is the class label"
            )
        self.reward = self._reward()
        if isinstance(self.reward, torch.nn.Module):
            self.reward.to(self.accelerator.device)
        self.meanflow = build_meanflow_loss(cfg, self.dataset, flow_map.config.num_embeds_ada_norm)
        self.loss_fn = VFMLoss(
            tau=cfg.tau,
            alpha=0.0,  # fresh noise only: the adapter's z is not coupled to data of the tilted distribution
            adaptive_eps=cfg.adaptive_eps,
            meanflow=self.meanflow,
            decode=self._decode if self.vae is not None else None,
        )
        self.base_flow_map = copy.deepcopy(flow_map).requires_grad_(False).eval()  # the start, for the report
        return {"noise_adapter": self._adapter(), "transformer": flow_map}

    def compute_loss(self, models, batch):
        cfg = self.config
        x = batch["x"]
        flow_map = models["transformer"]
        unwrapped = self.accelerator.unwrap_model(flow_map)
        if self.text_context:  # adapter: the caption's CLIP embedding; reward: the caption; map: its null label
            context = batch["clip_text"]
            reward_context = [self.dataset.captions[i] for i in batch["sample_ids"].tolist()]
            labels = torch.full((x.shape[0],), unwrapped.config.num_embeds_ada_norm, device=x.device)
        else:
            context = reward_context = labels = batch["class_labels"]
        out = self.loss_fn(
            FlowMapModel(flow_map),
            models["noise_adapter"],
            x,
            RewardTerm(self.reward, reward_context, cfg.beta),
            context,
            class_labels=labels,
            target_model=stop_gradient(unwrapped),
            jvp_model=FlowMapModel(unwrapped),
            generator=self.process_generator,
            flow_batch=flow_batch(batch, labels),
        )
        return out.loss, out.scalars()

    def pipeline(self, models) -> RewardTiltedFlowMapPipeline:
        return RewardTiltedFlowMapPipeline(
            noise_adapter=models["noise_adapter"],
            transformer=models["transformer"],
            scheduler=FlowMapEulerDiscreteScheduler(),
            vae=self.vae,
            text_encoder=self.text_encoder,
        )

    def report_contexts(self) -> tuple[dict[str, Any], list]:
        """The contexts the validation grid and the report use, as pipeline kwargs and as the reward's context:
        every class (first 10 in the grid), or the first 10 distinct captions."""
        if not self.text_context:
            classes = list(range(self.dataset.num_classes))
            return {"class_labels": classes}, classes
        prompts = list(dict.fromkeys(self.dataset.captions))[:10]
        return {"prompt": prompts}, prompts

    @torch.no_grad()
    def validation_images(self, models) -> tuple[list[Image.Image], int]:
        """One row per class (first 10) or per caption (first 10 distinct): 6 one-step draws."""
        pipe = self.pipeline(models)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {name: values[:10] for name, values in self.report_contexts()[0].items()}
        images = pipe(
            **kwargs,
            num_images_per_prompt=6,
            generator=torch.Generator().manual_seed(self.config.seed),
            output_type="pt",
        ).images
        return [to_pil(image * 2 - 1) for image in images], 6

    @torch.no_grad()
    def reward_report(self, models) -> dict[str, float]:
        """Mean reward of one-step draws from the tuned pipeline vs the starting map's one-step samples (N(0, I)
        noise, same contexts and noise), and the prior drift: MMD of the tuned map's N(0, I) samples to the start's.
        Contexts: every class, or the first 10 distinct captions, ``report_samples`` draws each."""
        n, gen = self.config.report_samples, torch.Generator().manual_seed(self.config.seed + 1)
        device = self.accelerator.device
        kwargs, contexts = self.report_contexts()
        flow_map, pipe = models["transformer"], self.pipeline(models)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn((len(contexts) * n, *self.dataset.sample_shape), generator=gen).to(device)
        tilted = pipe(**kwargs, num_images_per_prompt=n, noise=noise, output_type="latent").images
        if self.text_context:  # the flow map samples its unconditional prior; the reward reads the captions
            reward_context = [prompt for prompt in contexts for _ in range(n)]
            labels = torch.full((noise.shape[0],), flow_map.config.num_embeds_ada_norm, device=device)
        else:
            labels = reward_context = torch.arange(len(contexts)).repeat_interleave(n).to(device)
        base = sample_flow_map(FlowMapModel(self.base_flow_map.to(device)), noise, 1, class_labels=labels)
        tuned_prior = sample_flow_map(FlowMapModel(flow_map), noise, 1, class_labels=labels)
        tilted, base, tuned_prior = (self.pixels(v) for v in (tilted, base, tuned_prior))
        reward_tilted = check_reward(self.reward, tilted, reward_context)
        reward_base = check_reward(self.reward, base, reward_context)
        return {
            "reward_one_step": float(reward_tilted.mean()),
            "reward_base_map": float(reward_base.mean()),
            "reward_gain": float((reward_tilted - reward_base).mean()),
            "reward_gain_standard_error": float((reward_tilted - reward_base).std() / labels.numel() ** 0.5),
            "prior_drift_mmd": float(mmd(tuned_prior.flatten(1), base.flatten(1))),
            "samples": labels.numel(),
        }

    def model_card(self, repo_id: str) -> str | None:
        cfg = self.config
        report = getattr(self, "report", None) or {}
        return render_model_card(
            "reward_model_card",
            **self.card_fields(repo_id),
            reward=cfg.reward,
            beta=cfg.beta,
            usage=(
                'pipe(prompt=["a large red circle"], num_images_per_prompt=4'
                if self.text_context
                else "pipe(class_labels=[0, 1], num_images_per_prompt=4"
            ),
            context="a caption (its CLIP text embedding)" if self.text_context else "a class label",
            report="```json\n" + json.dumps(report, indent=2) + "\n```",
        )

    def export(self, models, directory: Path) -> None:
        self.report = self.reward_report(models)
        self.pipeline(models).save_pretrained(directory)
        (directory / "reward_report.json").write_text(json.dumps(self.report, indent=2))
