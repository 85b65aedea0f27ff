"""What a channel builder makes: the artefact file and how a site attaches it (shared by
:mod:`imprint.site.seeds` and :mod:`imprint.site.isoseeds`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Artefact:
    channel: str
    path: Path
    qemu_args: list[str] = field(default_factory=list)
    kernel_cmdline: str | None = None
    note: str = ""


Builder = Callable[[str, Path], Artefact]
