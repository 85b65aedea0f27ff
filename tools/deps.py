"""The versions a test pass runs on: Python, each dependency pyproject.toml declares (with where
it is installed) and what those depend on in turn.

    python tools/deps.py [--require debian|pypi]

``--require debian``: fail unless each declared dependency is Debian's package
(/usr/lib/python3/dist-packages), so the floor pass cannot silently run on a PyPI copy that
shadows it. ``--require pypi``: fail unless each is installed in the venv itself, not Debian's.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEBIAN_SITE = "/usr/lib/python3/dist-packages"


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return match.group(0)


def declared() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [_name(r) for r in project["dependencies"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--require", choices=["debian", "pypi"])
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    wrong = []
    for name in declared():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            print(f"  {name}: NOT INSTALLED")
            wrong.append(f"{name} is not installed")
            continue
        where = str(dist.locate_file(""))
        print(f"  {name} {dist.version} ({where})")
        from_debian = where.rstrip("/").startswith(DEBIAN_SITE)
        if args.require == "debian" and not from_debian:
            wrong.append(f"{name} {dist.version} is not Debian's package (it is in {where})")
        if args.require == "pypi" and from_debian:
            wrong.append(f"{name} {dist.version} is Debian's package, not a PyPI release in the venv")
        below = []
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            sub = _name(requirement)
            try:
                sub_dist = metadata.distribution(sub)
            except metadata.PackageNotFoundError:
                continue  # an environment marker that does not apply here
            debian = " Debian's" if str(sub_dist.locate_file("")).startswith(DEBIAN_SITE) else ""
            below.append(f"{sub} {sub_dist.version}{debian}")
        if below:
            print(f"    with {', '.join(below)}")
    for problem in wrong:
        print(f"deps: {problem}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
