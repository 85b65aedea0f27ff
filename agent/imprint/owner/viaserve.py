"""Requests to a VM through the owner's running listener (`imprint serve`, owner/serve.py).

A VM that dialled the listener keeps its control connection there, and nothing else can reach
it when it has no inbound port. So a pinned request (PinnedClient) asks the listener first, over
its Unix socket in the owner home; the listener sends the request on the VM's connection,
whose TLS it authenticated against the pin, and hands back the agent's raw answer, which the
caller reads by the same rules as a direct one. No listener, or the VM not connected to it:
``None``, and the caller dials the VM itself.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from imprint.owner.errors import Unreachable
from imprint.owner.home import OwnerHome

_MAX_REPLY = 4 << 20  # the agent's answer (at most 1 MiB) as JSON text, escaped


def ask(home_dir: Path, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """One request to the listener; None when none is running in this home."""
    path = OwnerHome(home_dir).serve_socket
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a listener that died left its socket: nobody is there
        sock.sendall(json.dumps(message).encode() + b"\n")
        line = sock.makefile("rb").readline(_MAX_REPLY + 1)
    except TimeoutError:
        raise Unreachable(f"the owner's listener (imprint serve) did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise Unreachable(f"the owner's listener (imprint serve) failed: {exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise Unreachable("the owner's listener (imprint serve) answered something that is not a JSON object")
    return reply


def request(home_dir: Path, vm: str, method: str, path: str, body: bytes | None,
            timeout: float, session: str | None = None) -> tuple[int, bytes, str, str | None] | None:
    """(status, answer body, the VM's peer address, its Imprint-Session answer) of a request
    sent through the listener; None when no listener runs or ``vm`` is not connected to it."""
    reply = ask(home_dir, {"op": "request", "vm": vm, "method": method, "path": path,
                           "body": body.decode() if body is not None else None, "timeout": timeout,
                           "session": session}, timeout + 1.0)
    if reply is None or reply.get("error") == "not-connected":
        return None
    if not reply.get("ok"):
        detail = str(reply.get("detail") or reply.get("error"))[:300]
        raise Unreachable(f"{method} {path} through the owner's listener to {vm}: {detail}")
    status, answer, peer, answered = reply.get("status"), reply.get("answer"), reply.get("peer"), reply.get("session")
    if not (isinstance(status, int) and isinstance(answer, str) and (answered is None or isinstance(answered, str))):
        raise Unreachable("the owner's listener answered without a status and body")
    return status, answer.encode(), str(peer), answered


def vm_token_given(home_dir: Path) -> bool:
    """Tell a running listener a VM token was given (a waiting VM binds now); False if none runs."""
    try:
        return ask(home_dir, {"op": "vm-token-given"}, 5.0) is not None
    except Unreachable:
        return False


def connected(home_dir: Path) -> list[str] | None:
    """The VMs connected to the running listener; None when none runs."""
    reply = ask(home_dir, {"op": "connected"}, 5.0)
    if reply is None:
        return None
    vms = reply.get("vms")
    return [str(v) for v in vms] if isinstance(vms, list) else []


def await_connected(home_dir: Path, vms: list[str], timeout: float) -> list[str] | None:
    """The connected VMs once every one of ``vms`` is connected to the running listener, or
    ``timeout`` passed (the listener waits, woken by each connection); None when none runs."""
    reply = ask(home_dir, {"op": "await-connected", "vms": vms, "timeout": timeout}, timeout + 5.0)
    if reply is None:
        return None
    connected = reply.get("vms")
    return [str(v) for v in connected] if isinstance(connected, list) else []
