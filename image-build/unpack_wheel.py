"""Installs a pure-Python wheel into a system by unpacking it, for image-build/bake-existing.sh:
the files under SITE (below ROOT), and each console script as /usr/local/bin/NAME, run by the
system's /usr/bin/python3. pip would do the same plus RECORD; an image needs no pip.

    unpack_wheel.py WHEEL ROOT SITE

Runs on the target's python3 too (Packer uploads it next to bake-existing.sh): standard
library only.
"""

from __future__ import annotations

import configparser
import sys
import zipfile
from pathlib import Path

SCRIPT = "#!/usr/bin/python3\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"


def console_scripts(entry_points: str) -> list[tuple[str, str, str]]:
    """(name, module, function) of each [console_scripts] entry of an entry_points.txt."""
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    if not parser.has_section("console_scripts"):
        return []
    found = []
    for name, spec in parser.items("console_scripts"):
        module, func = (part.strip() for part in spec.split(":"))
        found.append((name, module, func))
    return found


def unpack(wheel: Path, root: Path, site: str) -> list[str]:
    """Unpack ``wheel`` into ROOT/SITE and write its console scripts; returns their names."""
    target = root / site.lstrip("/")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
        eps = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(eps[0]).decode() if eps else ""
    written = []
    for name, module, func in console_scripts(text):
        script = root / "usr/local/bin" / name
        script.write_text(SCRIPT.format(module=module, func=func))
        script.chmod(0o755)
        written.append(name)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: unpack_wheel.py WHEEL ROOT SITE", file=sys.stderr)
        return 2
    wheel, root, site = argv
    for name in unpack(Path(wheel), Path(root), site):
        print(f"bake-existing: wrote /usr/local/bin/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
