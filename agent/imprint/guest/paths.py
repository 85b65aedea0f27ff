"""Every guest path imprint touches, in one place, resolved under a root prefix (``--root``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GuestPaths:
    root: Path = Path("/")

    def under(self, absolute: str) -> Path:
        """``absolute`` (a guest path like /proc/cmdline) inside this root."""
        return self.root / absolute.lstrip("/")

    @property
    def cmdline(self) -> Path:
        return self.under("/proc/cmdline")

    @property
    def state_dir(self) -> Path:
        return self.under("/var/lib/imprint")

    @property
    def console(self) -> Path:
        return self.under("/dev/console")
