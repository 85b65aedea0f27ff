"""The owner's profile loader (owner/apply.py load_profile) on an arbitrary file.

The bytes are written to a file in this process's temporary directory (the runner gives each run
a private one) and loaded as `imprint bind --profile` / `imprint apply` would. Only UsageError (the
CLI's exit 2 with a one-line message) may leave; what loads is tables of backends.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from imprint.owner.apply import load_profile
from imprint.owner.errors import UsageError

INSTRUMENT = ["tomllib"]  # the parser under test is the standard library's
_DIR = tempfile.TemporaryDirectory(prefix="fuzz-profile-")
_PATH = Path(_DIR.name) / "profile.toml"


def test_one_input(data: bytes) -> None:
    _PATH.write_bytes(data)
    try:
        profile = load_profile(_PATH)
    except UsageError:
        return
    assert profile and all(isinstance(section, dict) for section in profile.values())
