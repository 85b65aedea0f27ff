"""Deadlines that tests shorten without patching code (and that an operator may, too).

A module keeps its deadline as its own constant; the production value is the default given
here, and an environment variable IMPRINT_<WHAT>_SECONDS, read once when the module is
imported, replaces it. The variables:

    IMPRINT_AGENT_HANDSHAKE_SECONDS  guest/server.py   TLS handshake, from the accept (10)
    IMPRINT_AGENT_REQUEST_SECONDS    guest/control.py  the next control request, waited for and read (30)
    IMPRINT_OWNER_CONNECT_SECONDS    owner/bind.py     TCP connect and TLS handshake of a bind (10)
    IMPRINT_OWNER_REQUEST_SECONDS    owner/client.py   a whole pinned request and its answer (10)
    IMPRINT_SERVE_HANDSHAKE_SECONDS  owner/serve.py    a dialled-in TLS handshake (10)
    IMPRINT_SERVE_EXCHANGE_SECONDS   owner/serve.py    a dialled-in bind, but for the wait for a VM token (20)
    IMPRINT_SERVE_WAIT_SECONDS       owner/serve.py    a no-secrets VM waiting for its VM token (600)
    IMPRINT_AGENT_CONNECT_SECONDS    guest/dialer.py   the agent's connect and TLS handshake to its owner (10)
    IMPRINT_AGENT_RECONNECT_SECONDS  guest/dialer.py   the first window of the agent's reconnection backoff (10)
    IMPRINT_AGENT_RECONNECT_CAP_SECONDS  guest/dialer.py   the window's cap (300)

A value that is not a positive, finite number of seconds is refused, naming the variable:
a deadline is never silently dropped.
"""

from __future__ import annotations

import math
import os


class BadTimeout(ValueError):
    """An IMPRINT_*_SECONDS variable that is not a positive, finite number of seconds."""


def seconds(variable: str, default: float) -> float:
    """The value of environment ``variable`` in seconds, or ``default`` when it is unset."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadTimeout(f"{variable}: {text[:40]!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise BadTimeout(f"{variable}: {text[:40]!r} is not a positive, finite number of seconds")
    return value
