"""The TCP port the agent listens on: one number, used by the agent (its default ``--listen``)
and by the site (the port its QEMU user network forwards to the guest)."""

from __future__ import annotations

AGENT_PORT = 7443
