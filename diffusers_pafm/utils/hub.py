"""The Hub edge: render a model card, push a clean export, and download pipelines of this package.

Only the export (``model_index.json``, component folders, ``README.md``, validation images) is uploaded; training
state (``checkpoint-*``, logs, temporary folders) never is. Tokens are passed to huggingface_hub and never printed.

diffusers' own ``DiffusionPipeline.download`` refuses third-party components ("<component>/<module>.py ... is not a
module in 'diffusers/pipelines'") before it looks at anything else. Pipelines of this package inherit
:class:`HubDownloadMixin`, which fetches the repository's weights and configs with ``snapshot_download`` instead
(safetensors only: no pickles, no code), so ``FlowMatchingPipeline.from_pretrained("<owner>/<repo>")`` works.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from huggingface_hub import create_repo, snapshot_download, upload_folder

from .safetensors_only import SafetensorsOnlyMixin

__all__ = [
    "render_model_card",
    "push_export",
    "model_card_template",
    "HubDownloadMixin",
    "export_allow_patterns",
    "ALLOW_PATTERNS",
]


def model_card_template(name: str) -> str:
    """The text of the packaged template ``diffusers_pafm/model_cards/<name>.md`` (read with importlib.resources)."""
    template = resources.files("diffusers_pafm").joinpath("model_cards", f"{name}.md")
    if not template.is_file():
        available = sorted(p.name[:-3] for p in resources.files("diffusers_pafm").joinpath("model_cards").iterdir())
        raise FileNotFoundError(f"model card template {name!r} not found; available: {available}")
    return template.read_text(encoding="utf-8")


def render_model_card(name: str, **fields: object) -> str:
    """``model_cards/<name>.md`` with its ``{field}`` placeholders filled; a missing field is an error."""
    template = model_card_template(name)
    try:
        return template.format(**fields)
    except KeyError as error:
        raise KeyError(f"model card template {name!r} needs the field {error.args[0]!r}") from None


COMPONENT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")
"""what a component folder may upload: configs, safetensors weights, tokenizer vocabularies"""


def export_allow_patterns(folder: str | os.PathLike) -> list[str]:
    """The allow-list of an export: ``model_index.json``, ``README.md``, a LoRA adapter, validation PNGs, and the
    configs / safetensors of the pipeline's components (those of ``model_index.json``, else the sub-folders holding
    a ``config.json``). Nothing else in the folder (logs, data reports, run configs, checkpoints) is uploaded."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        components = [name for name in json.loads(index.read_text()) if not name.startswith("_")]
    else:
        components = sorted(d.name for d in folder.iterdir() if (d / "config.json").is_file())
    patterns = [
        "model_index.json",
        "README.md",
        "label_map.json",
        "pytorch_lora_weights.safetensors",
        "validation/*.png",
    ]
    return patterns + [f"{name}/{pattern}" for name in components for pattern in COMPONENT_FILES]


def push_export(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload diffusers-pafm export",
) -> str:
    """Create ``repo_id`` if needed and upload the allow-listed export of ``folder`` (:func:`export_allow_patterns`);
    returns the repo URL."""
    url = create_repo(repo_id, token=token, private=private, exist_ok=True)
    upload_folder(
        repo_id=url.repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message,
        allow_patterns=export_allow_patterns(folder),
    )
    return str(url)


ALLOW_PATTERNS = [
    "model_index.json",
    "README.md",
    "*/*.json",
    "*/*.safetensors",
    "*/*.txt",
    "*/*.model",
]


class HubDownloadMixin(SafetensorsOnlyMixin):
    """Overrides ``DiffusionPipeline.download`` with ``snapshot_download`` restricted to configs and safetensors, and
    loads every component with ``use_safetensors=True`` (:class:`~.safetensors_only.SafetensorsOnlyMixin`)."""

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        return snapshot_download(
            pretrained_model_name,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")),
            allow_patterns=ALLOW_PATTERNS,
        )
