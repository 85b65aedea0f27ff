"""A guest root for `imprint-agent run --root`: proc/cmdline and dev/, the least an agent reads."""

from __future__ import annotations

from pathlib import Path


def make_root(base: Path, name: str, token: str | None) -> Path:
    """proc/cmdline (with the token, if any) and dev/ under base/name."""
    root = base / name
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    cmdline = "console=ttyS0 root=LABEL=root ro"
    if token is not None:
        cmdline += f" imprint.token={token}"
    (root / "proc" / "cmdline").write_text(cmdline + "\n")
    return root
