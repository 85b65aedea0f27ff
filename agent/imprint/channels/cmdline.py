"""Kernel command line: ``imprint.token=<token>`` in /proc/cmdline (site: a fragment to append).

The owner addresses go beside it as ``imprint.owner=HOST:PORT[,HOST:PORT...]`` (the canonical
list form has no spaces, so it is one kernel parameter); an ``imprint.owner`` without an
``imprint.token`` is a broken channel.
"""

from __future__ import annotations

from pathlib import Path

from imprint.channels.channel import (
    Artefact,
    Channel,
    ChannelBroken,
    Offer,
    Owners,
    SiteArtefact,
    encode_owners,
    offer,
    parse_owners,
    parse_token,
    read_bounded,
    write_private,
)
from imprint.guest.distro import Distro

NAME = "cmdline"
PARAMETER = "imprint.token"
OWNER_PARAMETER = "imprint.owner"
# The kernel's limit is 2 KiB on x86 (COMMAND_LINE_SIZE), up to 4 KiB elsewhere.
MAX_CMDLINE = 64 * 1024


def _value(words: list[str], parameter: str) -> str | None:
    values = [word.partition("=")[2] for word in words if word.partition("=")[0] == parameter]
    if not values:
        return None
    if len(set(values)) > 1:
        raise ChannelBroken(NAME, f"{parameter} is given {len(values)} times with different values")
    return values[0]


def read(paths: Distro) -> Offer | None:
    raw = read_bounded(NAME, paths.cmdline, MAX_CMDLINE, ": not a kernel command line")
    if raw is None:
        return None
    words = raw.decode("utf-8", errors="replace").split()
    value = _value(words, PARAMETER)
    owner_value = _value(words, OWNER_PARAMETER)
    owners = parse_owners(NAME, owner_value, OWNER_PARAMETER) if owner_value is not None else ()
    token = parse_token(NAME, value, PARAMETER) if value is not None else None
    return offer(NAME, token, owners, OWNER_PARAMETER)


def build(token: str, out: Path, owners: Owners = ()) -> Artefact:
    fragment = f"{PARAMETER}={token}"
    if owners:
        fragment += f" {OWNER_PARAMETER}={encode_owners(owners)}"
    write_private(out, (fragment + "\n").encode())
    return Artefact(NAME, out, kernel_cmdline=fragment,
                    note="append the fragment to the kernel command line (it is world-readable in the guest)")


CHANNEL = Channel(NAME, read, artefacts=(SiteArtefact("", build),))
