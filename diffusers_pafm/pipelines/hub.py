"""Hub download for pipelines whose components live in this package (not in ``diffusers.pipelines``).

diffusers' own ``DiffusionPipeline.download`` refuses third-party components ("<component>/<module>.py ... is not a
module in 'diffusers/pipelines'") before it looks at anything else. Pipelines of this package inherit this mixin,
which fetches the repository's weights and configs with ``huggingface_hub.snapshot_download`` instead (safetensors
only: no pickles, no code), so ``FlowMatchingPipeline.from_pretrained("<owner>/<repo>")`` works.
"""

from __future__ import annotations

from huggingface_hub import snapshot_download

__all__ = ["HubDownloadMixin", "ALLOW_PATTERNS"]

ALLOW_PATTERNS = [
    "model_index.json",
    "README.md",
    "*/*.json",
    "*/*.safetensors",
    "*/*.txt",
    "*/*.model",
]


class HubDownloadMixin:
    """Overrides ``DiffusionPipeline.download`` with ``snapshot_download`` restricted to configs and safetensors."""

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
