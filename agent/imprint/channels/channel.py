"""What a boot channel is: the :class:`Channel` object each channel module defines, the
artefacts a site builds for it, and the helpers every channel's reader shares (bounded reads,
JSON, and the one way a channel turns text into a token).

A channel's ``read(paths)`` has three outcomes: the token it found; ``None`` when the channel is
absent (try the next); or it raises :class:`ChannelBroken` when the channel is present but
corrupt. Broken fails closed: the agent never falls through from a broken channel to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from imprint import boundedio, tokens
from imprint.fsatomic import write_atomic
from imprint.guest.distro import Distro

# The key that carries the token wherever a channel is a key-value document (NoCloud meta-data,
# OpenStack meta, an EC2 instance tag, cloud-init's instance data, #cloud-config user-data).
TOKEN_KEY = "imprint-token"  # noqa: S105 (the name of a key, not a secret)

# A token file holds one short line; anything much larger is not a token file.
MAX_TOKEN_FILE = 4096


class ChannelBroken(Exception):
    def __init__(self, channel: str, fault: str) -> None:
        super().__init__(f"boot channel {channel} is broken: {fault}")
        self.channel = channel
        self.fault = fault


Reader = Callable[[Distro], "tokens.Token | None"]
# Write the VM token line to the channel's reverse area; False when there is none.
Replier = Callable[[Distro, str], bool]
# Wipe K from the channel after a shared-mode bind; False when there is nothing to wipe.
Consumer = Callable[[Distro], bool]


@dataclass
class Artefact:
    """What a site builder made: the file, and how a site attaches it to the VM."""

    channel: str
    path: Path
    qemu_args: list[str] = field(default_factory=list)
    kernel_cmdline: str | None = None
    note: str = ""
    # The virtio-blk serial the device must carry when it is hot-plugged (the guest finds the
    # disk by it); None when the guest finds it by its filesystem label.
    serial: str | None = None


Builder = Callable[[str, Path], Artefact]


@dataclass(frozen=True)
class SiteArtefact:
    """One way a site hands this channel a token. Its name on the site's command line is
    ``<channel>`` for ``variant=""``, else ``<channel>-<variant>`` (``imprint-seed-vfat``)."""

    variant: str
    build: Builder
    # A disk that can be attached to a running VM (PCI hot-plug).
    hotplug: bool = False


@dataclass(frozen=True)
class Channel:
    """One boot channel, both halves: the guest's reader and hooks, the site's builders."""

    name: str
    read: Reader
    # Network channels are asked only when no local channel carries a token (absence costs time).
    network: bool = False
    reply: Replier | None = None
    consume: Consumer | None = None
    artefacts: tuple[SiteArtefact, ...] = ()

    def artefact_name(self, artefact: SiteArtefact) -> str:
        return f"{self.name}-{artefact.variant}" if artefact.variant else self.name


def parse_token(channel: str, text: str, what: str = "") -> tokens.Token:
    """The token in ``text``; ChannelBroken naming the channel, ``what`` was parsed (a file, a
    key) and why it is not a token."""
    try:
        return tokens.parse(text)
    except tokens.TokenError as exc:
        raise ChannelBroken(channel, f"{what}: {exc}" if what else str(exc)) from None


_Value = TypeVar("_Value")


def agreeing(found: Sequence[tuple[str, _Value]],
             refuse: Callable[[str, _Value, str, _Value], ChannelBroken]) -> tuple[str, _Value] | None:
    """The first (where, value) of ``found`` when every other value equals it; None when nothing
    was found. Two places that disagree are broken (``refuse(where, value, other where, other
    value)`` says how): the agent cannot know which one the site meant."""
    if not found:
        return None
    first_where, first = found[0]
    for where, value in found[1:]:
        if value != first:
            raise refuse(first_where, first, where, value)
    return found[0]


def read_bounded(channel: str, path: Path, limit: int, what: str = "") -> bytes | None:
    """At most ``limit`` bytes of the regular file ``path`` (not a link, never a FIFO: opened
    without blocking and checked); None when it does not exist; broken otherwise."""
    try:
        return boundedio.read_file(path, limit, what=what)
    except boundedio.InputError as exc:
        raise ChannelBroken(channel, str(exc)) from None


def load_json(channel: str, data: bytes, where: object, limit: int) -> Any:
    """A JSON document within ``limit`` bytes and the nesting bound; broken otherwise."""
    try:
        return boundedio.load_json(data, limit=limit)
    except boundedio.InputError as exc:
        raise ChannelBroken(channel, f"{where}: invalid JSON ({exc})") from None


def read_token_file(channel: str, path: Path) -> tokens.Token | None:
    """The token in a small text file; None when the file does not exist."""
    raw = read_bounded(channel, path, MAX_TOKEN_FILE, ": not a token file")
    if raw is None:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ChannelBroken(channel, f"{path} is not ASCII text") from None
    return parse_token(channel, text, str(path))


def write_private(path: Path, data: bytes) -> None:
    """A site artefact that carries a token: mode 0600, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600)
