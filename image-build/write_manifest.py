"""Writes OUT/manifest.json for image-build/build.sh: what the image directory holds, with the
size and SHA-256 of every file, the root filesystem's size with and without imprint, and the
kernel command line a site boots it with.

    write_manifest.py OUT SOURCE_DATE_EPOCH BARE_BYTES BASE_BYTES SUITE WHEEL
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

APPEND = "root=LABEL=root rw console=ttyS0"


def sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def manifest(out: Path, epoch: int, bare: int, base: int, suite: str, wheel: str) -> dict[str, object]:
    files = ["base.qcow2", "bare.qcow2", "vmlinuz", "initrd.img", wheel, "packages.txt"]
    return {"suite": suite, "source_date_epoch": epoch, "wheel": wheel,
            "rootfs_bytes": {"bare": bare, "base": base, "imprint": base - bare},
            "files": {f: {"bytes": (out / f).stat().st_size, "sha256": sha256(out / f)} for f in files},
            "append": APPEND}


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print("usage: write_manifest.py OUT SOURCE_DATE_EPOCH BARE_BYTES BASE_BYTES SUITE WHEEL", file=sys.stderr)
        return 2
    out, epoch, bare, base, suite, wheel = argv
    data = manifest(Path(out), int(epoch), int(bare), int(base), suite, wheel)
    with (Path(out) / "manifest.json").open("w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
