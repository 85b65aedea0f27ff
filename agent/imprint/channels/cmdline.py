"""Kernel command line: ``imprint.token=<token>`` in /proc/cmdline (site: a fragment to append)."""

from __future__ import annotations

from pathlib import Path

from imprint import tokens
from imprint.channels.channel import (
    Artefact,
    Channel,
    ChannelBroken,
    SiteArtefact,
    parse_token,
    read_bounded,
    write_private,
)
from imprint.guest.distro import Distro

NAME = "cmdline"
PARAMETER = "imprint.token"
# The kernel's limit is 2 KiB on x86 (COMMAND_LINE_SIZE), up to 4 KiB elsewhere.
MAX_CMDLINE = 64 * 1024


def read(paths: Distro) -> tokens.Token | None:
    raw = read_bounded(NAME, paths.cmdline, MAX_CMDLINE, ": not a kernel command line")
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace")
    values = [word.partition("=")[2] for word in text.split() if word.partition("=")[0] == PARAMETER]
    if not values:
        return None
    if len(set(values)) > 1:
        raise ChannelBroken(NAME, f"{PARAMETER} is given {len(values)} times with different values")
    return parse_token(NAME, values[0], PARAMETER)


def build(token: str, out: Path) -> Artefact:
    fragment = f"{PARAMETER}={token}"
    write_private(out, (fragment + "\n").encode())
    return Artefact(NAME, out, kernel_cmdline=fragment,
                    note="append the fragment to the kernel command line (it is world-readable in the guest)")


CHANNEL = Channel(NAME, read, artefacts=(SiteArtefact("", build),))
