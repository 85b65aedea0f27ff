"""The README's quick look (`bash tools/demo.sh`, i.e. `python tools/demo.py`) runs to the end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "tools" / "demo.py"


def test_demo_binds_both_modes_through_the_sites_relay() -> None:
    # The no-secrets half relays the VM token the way a site does (imprint-site reverse on the
    # console), so a change to the announcement's form cannot leave the demo behind again.
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=240,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo: both modes bound, pinned, survived a restart, and refused a second bind." in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
