"""Backends for the framework tests (one that works, and each way one can fail) and a crash
injected between write and rename."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from imprint.backends import BackendContext, BackendError, BackendResult, check_keys, get_typed

SAMPLES = {
    "note": "tests.backend_samples:note",
    "refuses": "tests.backend_samples:refuses",
    "crashes": "tests.backend_samples:crashes",
    "returns-junk": "tests.backend_samples:returns_junk",
    "not-callable": "tests.backend_samples:not_callable",
    "unimportable": "tests.no_such_module:apply",
}


def note(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    """Writes config["text"] to /etc/note (0640) and reports it."""
    check_keys(config, ("text", "mode"), "note")
    text = get_typed(config, "text", str, "note")
    if text is None:
        raise BackendError("note.text is required")
    mode = get_typed(config, "mode", int, "note", default=0o640)
    ctx.ensure_dir(ctx.path("/etc"), mode=0o755, fix_existing=False)
    ctx.write_file(ctx.path("/etc/note"), text.encode(), mode=mode)
    return ctx.result(f"note is {len(text)} bytes", length=len(text))


def refuses(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    raise BackendError("refuses.reason: this backend always refuses")


def crashes(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    raise RuntimeError("a bug in the backend")


def returns_junk(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    return {"ok": True}  # type: ignore[return-value]


not_callable = 42


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # the power goes: after fsync, before rename
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
    import json
    from imprint import backends
    from imprint.guest.distro import Distro
    backends.BUILTIN.update(json.loads(sys.argv[3]))
    print(backends.run_backend(Distro(Path(sys.argv[1])), sys.argv[4], json.loads(sys.argv[5])))
""")


def crash_between_write_and_rename(root: Path, filename: str, backend: str, config: dict[str, object]) -> None:
    """Run one backend in a process that is SIGKILLed just before it renames ``filename``."""
    proc = subprocess.run([sys.executable, "-c", CRASH, str(root), filename, json.dumps(SAMPLES), backend,
                           json.dumps(config)], capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
