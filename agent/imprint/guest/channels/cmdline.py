"""Kernel command line: ``imprint.token=<token>`` in /proc/cmdline."""

from __future__ import annotations

from imprint import tokens
from imprint.guest.channels import ChannelBroken
from imprint.guest.channels._common import read_bounded
from imprint.guest.distro import Distro

PARAMETER = "imprint.token"
# The kernel's limit is 2 KiB on x86 (COMMAND_LINE_SIZE), up to 4 KiB elsewhere.
MAX_CMDLINE = 64 * 1024


def read(paths: Distro) -> tokens.Token | None:
    raw = read_bounded("cmdline", paths.cmdline, MAX_CMDLINE, ": not a kernel command line")
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace")
    values = [word.partition("=")[2] for word in text.split() if word.partition("=")[0] == PARAMETER]
    if not values:
        return None
    if len(set(values)) > 1:
        raise ChannelBroken("cmdline", f"{PARAMETER} is given {len(values)} times with different values")
    try:
        return tokens.parse(values[0])
    except tokens.TokenError as exc:
        raise ChannelBroken("cmdline", f"{PARAMETER}: {exc}") from None
