"""In the VM: write the message to /etc/motd.d/imprint (0644, root), once."""

from __future__ import annotations

from typing import Any

from imprint.backends import BackendContext, BackendError, BackendResult

PATH = "/etc/motd.d/imprint"


def apply(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    text: str = config["text"]
    if any(not c.isprintable() and c != "\n" for c in text):
        raise BackendError("motd.text holds a control character; a terminal would run it")
    ctx.ensure_dir(ctx.path("/etc/motd.d"), mode=0o755, uid=0, gid=0, fix_existing=False, parents=True)
    data = f"{text.rstrip()}\n-- {config['vm']}, set by its owner through imprint\n".encode()
    ctx.write_file(ctx.path(PATH), data, mode=0o644, uid=0, gid=0)
    return ctx.result(f"motd is {len(data)} bytes", path=PATH, length=len(data))
