"""Sharing trained models: render a model card from ``model_cards/`` and push a clean export to the Hub.

Only the export (``model_index.json``, component folders, ``README.md``, validation images) is uploaded; training
state (``checkpoint-*``, logs, temporary folders) never is. Tokens are passed to huggingface_hub and never printed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

__all__ = ["render_model_card", "push_export", "EXPORT_IGNORE_PATTERNS", "model_card_template"]

EXPORT_IGNORE_PATTERNS = ["checkpoint-*", ".*", "logs/*", "logs", "*.jsonl", "*.tmp-*", "encoded_data/*"]


def model_card_template(name: str) -> str:
    """The text of ``model_cards/<name>.md`` (source checkout, or the copy installed under ``share/``)."""
    candidates = [
        Path(__file__).resolve().parent.parent / "model_cards" / f"{name}.md",
        Path(sys.prefix) / "share" / "diffusers-pafm" / "model_cards" / f"{name}.md",
    ]
    for path in candidates:
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"model card template {name!r} not found in {[str(p) for p in candidates]}")


def render_model_card(name: str, **fields: object) -> str:
    """``model_cards/<name>.md`` with its ``{field}`` placeholders filled; a missing field is an error."""
    template = model_card_template(name)
    try:
        return template.format(**fields)
    except KeyError as error:
        raise KeyError(f"model card template {name!r} needs the field {error.args[0]!r}") from None


def push_export(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload diffusers-pafm export",
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` without training state; returns the repo URL."""
    url = create_repo(repo_id, token=token, private=private, exist_ok=True)
    upload_folder(
        repo_id=url.repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message,
        ignore_patterns=EXPORT_IGNORE_PATTERNS,
    )
    return str(url)
