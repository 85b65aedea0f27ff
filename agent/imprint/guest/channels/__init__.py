"""Boot channels the agent reads its token from, registered in one explicit ordered list.

A channel's ``read(paths)`` has three outcomes: the token it found; ``None`` when the channel is
absent (try the next); or it raises ChannelBroken when the channel is present but corrupt.
Broken fails closed: the agent never falls through from a broken channel to the next one.

All local channels are read (they are cheap), so two channels carrying different tokens are
caught and refused. Network channels are asked only when no local channel carries a token,
because an absent metadata service costs timeouts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from imprint.guest.distro import Distro
from imprint.tokens import Token, TokenKind


class ChannelBroken(Exception):
    def __init__(self, channel: str, fault: str) -> None:
        super().__init__(f"boot channel {channel} is broken: {fault}")
        self.channel = channel
        self.fault = fault


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    module: str
    network: bool = False


# The order is the search order and the precedence shown in logs and docs.
CHANNELS: tuple[ChannelSpec, ...] = (
    ChannelSpec("cmdline", "imprint.guest.channels.cmdline"),
    ChannelSpec("credentials", "imprint.guest.channels.credentials"),
    ChannelSpec("fw_cfg", "imprint.guest.channels.fwcfg"),
    ChannelSpec("imprint-seed", "imprint.guest.channels.seed"),
    ChannelSpec("nocloud", "imprint.guest.channels.nocloud"),
    ChannelSpec("config-2", "imprint.guest.channels.configdrive"),
    ChannelSpec("metadata-disk", "imprint.guest.channels.metadisk"),
    ChannelSpec("cloud-init", "imprint.guest.channels.cloudinit"),
    ChannelSpec("http-metadata", "imprint.guest.channels.imds", network=True),
)


@dataclass(frozen=True)
class Found:
    channel: str
    token: Token
    also_on: tuple[str, ...] = ()

    @property
    def channels(self) -> tuple[str, ...]:
        return (self.channel, *self.also_on)


Reader = Callable[[Distro], Token | None]


def channel_names() -> list[str]:
    return [spec.name for spec in CHANNELS]


def _reader(spec: ChannelSpec) -> Reader:
    return cast(Reader, importlib.import_module(spec.module).read)


def _optional(spec: ChannelSpec, hook: str) -> Callable[[Distro, str], bool] | None:
    return cast("Callable[[Distro, str], bool] | None", getattr(importlib.import_module(spec.module), hook, None))


def publish_vm_token(paths: Distro, found: Found, line: str) -> list[str]:
    """Write the VM token line to every reverse channel the site offers: each local channel with
    a reply area that is present, and a network channel only if the token came from it."""
    written = []
    for spec in CHANNELS:
        if spec.network and spec.name not in found.channels:
            continue
        reply = _optional(spec, "reply")
        if reply is not None and reply(paths, line):
            written.append(spec.name)
    return written


def consume_token(paths: Distro, found: Found) -> list[str]:
    """After a shared-mode bind: wipe K from every channel that carried it and can be written."""
    wiped = []
    for spec in CHANNELS:
        if spec.name not in found.channels:
            continue
        consume = cast("Callable[[Distro], bool] | None",
                       getattr(importlib.import_module(spec.module), "consume", None))
        if consume is not None and consume(paths):
            wiped.append(spec.name)
    return wiped


def _read(spec: ChannelSpec, paths: Distro) -> Token | None:
    token = _reader(spec)(paths)
    if token is not None and token.kind is TokenKind.VM:
        raise ChannelBroken(spec.name, "it carries a VM token where the owner's token belongs")
    return token


def find_token(paths: Distro, only: list[str] | None = None) -> Found | None:
    """The token on the boot channels; None when every channel searched is absent."""
    selected = [spec for spec in CHANNELS if only is None or spec.name in only]
    for network in (False, True):
        found: list[tuple[str, Token]] = []
        for spec in selected:
            if spec.network != network:
                continue
            token = _read(spec, paths)
            if token is not None:
                found.append((spec.name, token))
        if found:
            first_name, first = found[0]
            for name, token in found[1:]:
                if token != first:
                    raise ChannelBroken(
                        f"{first_name}+{name}",
                        f"the channels disagree: {first_name} carries token {first.token_id.hex()}, "
                        f"{name} carries token {token.token_id.hex()}",
                    )
            return Found(first_name, first, tuple(name for name, _ in found[1:]))
    return None
