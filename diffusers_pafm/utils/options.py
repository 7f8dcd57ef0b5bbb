"""``option(help, default=...)``: a dataclass field with its ``--help`` text (read by ``HfArgumentParser``)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["option", "ConfigPart", "check"]


def option(text: str, **kwargs) -> Any:
    """A dataclass field whose command-line help is ``text``."""
    return field(metadata={"help": text}, **kwargs)


def check(ok: bool, flag: str, value: Any, accepted: str) -> None:
    """Raise ``ValueError("--flag value: accepted")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"--{flag} {value!r}: {accepted}")


class ConfigPart:
    """Base of the config parts: ``validate()`` checks the options of every part (cooperatively, along the MRO)
    when the config is built, so a bad value fails before any model or data is touched."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check this part's options; subclasses call ``super().validate()`` first."""
