"""systemd readiness notification (sd_notify) without libsystemd."""

from __future__ import annotations

import os
import socket

from imprint.safetext import printable

STATUS_LIMIT = 400


def notify(message: str) -> bool:
    """Send ``message`` (newline-separated assignments, e.g. "READY=1") to $NOTIFY_SOCKET; False
    when not under systemd. ``message`` is the caller's own text: outside text goes through
    :func:`notify_status`, where it cannot add an assignment (a newline and "READY=1")."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    # Like sd_notify(3): a notification that cannot be delivered is reported, never fatal.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def notify_status(status: str, *, ready: bool = False) -> bool:
    """STATUS= (rendered to one bounded printable line), after READY=1 when ``ready``."""
    line = f"STATUS={printable(status, STATUS_LIMIT)}"
    return notify(f"READY=1\n{line}" if ready else line)
