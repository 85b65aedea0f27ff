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

from imprint.backends import BackendContext, BackendError, BackendResult
from imprint.backends.plugin import Backend
from imprint.backends.schema import Int, Obj, Str

# As entry points would register them (name -> "module:attribute" of a Backend).
SAMPLES = {
    "note": "tests.backend_samples:NOTE",
    "refuses": "tests.backend_samples:REFUSES",
    "crashes": "tests.backend_samples:CRASHES",
    "returns-junk": "tests.backend_samples:RETURNS_JUNK",
    "not-callable": "tests.backend_samples:NOT_CALLABLE",
    "not-a-backend": "tests.backend_samples:not_a_backend",
    "misnamed": "tests.backend_samples:NOTE",
    "unimportable": "tests.no_such_module:BACKEND",
}


def registered_with_samples(found: dict[str, set[str]]) -> dict[str, set[str]]:
    """The installed backends and the samples (what ``imprint.backends.registered`` would find
    if the samples were installed)."""
    return {**found, **{name: {value} for name, value in SAMPLES.items()}}


def note(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    """Writes config["text"] to /etc/note (0640) and reports it."""
    text: str = config["text"]
    mode: int = config.get("mode", 0o640)
    ctx.ensure_dir(ctx.path("/etc"), mode=0o755, fix_existing=False)
    ctx.write_file(ctx.path("/etc/note"), text.encode(), mode=mode)
    return ctx.result(f"note is {len(text)} bytes", length=len(text))


def refuses(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    raise BackendError("refuses.reason: this backend always refuses")


def crashes(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    raise RuntimeError("a bug in the backend")


def returns_junk(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    return {"ok": True}  # type: ignore[return-value]


not_a_backend = 42

NOTE = Backend(name="note", guest=lambda: note, schema=Obj({"text": Str(required=True), "mode": Int()}))
REFUSES = Backend(name="refuses", guest=lambda: refuses)
CRASHES = Backend(name="crashes", guest=lambda: crashes)
RETURNS_JUNK = Backend(name="returns-junk", guest=lambda: returns_junk)
NOT_CALLABLE = Backend(name="not-callable", guest=lambda: 42)  # type: ignore[arg-type,return-value]


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
    from tests.backend_samples import registered_with_samples
    installed = backends.registered
    backends.registered = lambda: registered_with_samples(installed())
    print(backends.run_backend(Distro(Path(sys.argv[1])), sys.argv[4], json.loads(sys.argv[5])))
""")


def crash_between_write_and_rename(root: Path, filename: str, backend: str, config: dict[str, object]) -> None:
    """Run one backend in a process that is SIGKILLed just before it renames ``filename``."""
    proc = subprocess.run([sys.executable, "-c", CRASH, str(root), filename, "-", backend,
                           json.dumps(config)], capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
