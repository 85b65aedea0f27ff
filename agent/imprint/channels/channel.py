"""What a boot channel is: the :class:`Channel` object each channel module defines, the
artefacts a site builds for it, and the helpers every channel's reader shares (bounded reads,
JSON, and the one way a channel turns text into a token).

A channel's ``read(paths)`` has three outcomes: the :class:`Offer` it found (the token and the
owner addresses given beside it on the same channel); ``None`` when the channel is absent (try
the next); or it raises :class:`ChannelBroken` when the channel is present but corrupt. Broken
fails closed: the agent never falls through from a broken channel to the next. Owner addresses
belong to a token: a channel that carries them without one is broken, and so is one whose
addresses do not parse (:mod:`imprint.owneraddr`).

A site builder is ``build(token, out, owners=())``: with owners it writes them under the
channel's owner key, without them it writes exactly what it wrote before there were owners.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from imprint import boundedio, owneraddr, tokens
from imprint.fsatomic import write_atomic
from imprint.guest.distro import Distro

# The key that carries the token wherever a channel is a key-value document (NoCloud meta-data,
# OpenStack meta, an EC2 instance tag, cloud-init's instance data, #cloud-config user-data).
TOKEN_KEY = "imprint-token"  # noqa: S105 (the name of a key, not a secret)
# The key of the owner addresses in those same documents (a string in the list form
# "host:port,host:port"; where the document is JSON or YAML, a list of such strings too).
OWNER_KEY = "imprint-owner"

# A token file holds one short line; anything much larger is not a token file.
MAX_TOKEN_FILE = 4096


class ChannelBroken(Exception):
    def __init__(self, channel: str, fault: str) -> None:
        super().__init__(f"boot channel {channel} is broken: {fault}")
        self.channel = channel
        self.fault = fault


Owners = tuple[owneraddr.OwnerAddress, ...]


@dataclass(frozen=True)
class Offer:
    """What one channel carries: the token and the owner addresses the site put beside it."""

    token: tokens.Token
    owners: Owners = ()


Reader = Callable[[Distro], "Offer | None"]
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


class Builder(Protocol):
    """Writes the artefact carrying ``token`` (and ``owners``, when given) at ``out``."""

    def __call__(self, token: str, out: Path, owners: Owners = ...) -> Artefact: ...


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


def parse_owners(channel: str, value: object, what: str) -> Owners:
    """The owner addresses in ``value``: a string in the list form, or (from a JSON or YAML
    document) a list of address strings; ChannelBroken naming the channel, ``what`` (the key
    or file) and the fault otherwise."""
    try:
        if isinstance(value, str):
            return owneraddr.parse_list(value)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            if len(value) > owneraddr.MAX_ADDRESSES:
                raise owneraddr.OwnerAddressError(f"owner address list has {len(value)} items, "
                                                  f"more than {owneraddr.MAX_ADDRESSES}")
            # Each item one address (parse refuses a comma), then the list's own rules.
            return owneraddr.parse_list(",".join(str(owneraddr.parse(item)) for item in value))
    except owneraddr.OwnerAddressError as exc:
        raise ChannelBroken(channel, f"{what}: {exc}") from None
    raise ChannelBroken(channel, f"{what} is {type(value).__name__}, not a list of owner addresses")


def offer(channel: str, token: tokens.Token | None, owners: Owners, what: str) -> Offer | None:
    """The channel's offer; broken when it carries owner addresses (at ``what``) but no token."""
    if token is None:
        if owners:
            raise ChannelBroken(channel, f"{what} gives owner addresses but the channel carries no token")
        return None
    return Offer(token, owners)


def encode_owners(owners: Owners) -> str:
    """The site's form of the owner list (raises ValueError for a list that is not one)."""
    return owneraddr.encode_list(owners)


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


def read_owner_file(channel: str, path: Path) -> Owners:
    """The owner addresses in a small text file (the list form, one per line or comma-separated);
    () when the file does not exist."""
    raw = read_bounded(channel, path, owneraddr.MAX_LIST_TEXT, ": not an owner address file")
    if raw is None:
        return ()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ChannelBroken(channel, f"{path}: owner address file is not ASCII text") from None
    return parse_owners(channel, text, str(path))


def owner_file_path(out: Path) -> Path:
    """Where a site writes the owner file that goes with the token artefact ``out`` (channels
    that need a file per entry: fw_cfg, credentials)."""
    return out.with_name(f"{out.name}.owner")


def write_private(path: Path, data: bytes) -> None:
    """A site artefact that carries a token: mode 0600, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600)
