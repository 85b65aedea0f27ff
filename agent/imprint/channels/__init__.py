"""Boot channels, both halves: how the agent finds its token and how a site hands it one.

Each channel is one module holding one :class:`~imprint.channels.channel.Channel` object
(``CHANNEL``): its guest reader, its reply and consume hooks, its site artefact builders and
every constant both sides share. :data:`CHANNELS` below is the registry.

To add a channel: write one module here that defines ``CHANNEL = Channel(...)`` (see
channel.py), then add one line to ``CHANNELS``. Nothing else names it: the agent's
``--channels``, the site's ``seed``/``boot --channel`` and the docs' list come from here.

All local channels are read (they are cheap), so two channels carrying different tokens are
caught and refused. Network channels are asked only when no local channel carries a token,
because an absent metadata service costs timeouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imprint.channels import (
    cloudinit,
    cmdline,
    configdrive,
    credentials,
    fwcfg,
    imds,
    metadisk,
    nocloud,
    seed,
)
from imprint.channels.channel import Channel, ChannelBroken, SiteArtefact, agreeing
from imprint.guest.distro import Distro
from imprint.tokens import Token, TokenKind

__all__ = ["CHANNELS", "Channel", "ChannelBroken", "Found", "channel_names", "consume_token", "find_token",
           "publish_vm_token", "site_artefacts"]

# The order is the search order and the precedence shown in logs and docs.
CHANNELS: tuple[Channel, ...] = (
    cmdline.CHANNEL,
    credentials.CHANNEL,
    fwcfg.CHANNEL,
    seed.CHANNEL,
    nocloud.CHANNEL,
    configdrive.CHANNEL,
    metadisk.CHANNEL,
    cloudinit.CHANNEL,
    imds.CHANNEL,
)


@dataclass(frozen=True)
class Found:
    channel: str
    token: Token
    also_on: tuple[str, ...] = ()

    @property
    def channels(self) -> tuple[str, ...]:
        return (self.channel, *self.also_on)


def channel_names(channels: Sequence[Channel] = CHANNELS) -> list[str]:
    return [channel.name for channel in channels]


def site_artefacts(channels: Sequence[Channel] = CHANNELS) -> dict[str, SiteArtefact]:
    """Every artefact a site can build, by its name on the site's command line."""
    return {channel.artefact_name(artefact): artefact for channel in channels for artefact in channel.artefacts}


def publish_vm_token(paths: Distro, found: Found, line: str, channels: Sequence[Channel] = CHANNELS) -> list[str]:
    """Write the VM token line to every reverse channel the site offers: each local channel with
    a reply area that is present, and a network channel only if the token came from it."""
    written = []
    for channel in channels:
        if channel.network and channel.name not in found.channels:
            continue
        if channel.reply is not None and channel.reply(paths, line):
            written.append(channel.name)
    return written


def consume_token(paths: Distro, found: Found, channels: Sequence[Channel] = CHANNELS) -> list[str]:
    """After a shared-mode bind: wipe K from every channel that carried it and can be written."""
    wiped = []
    for channel in channels:
        if channel.name not in found.channels:
            continue
        if channel.consume is not None and channel.consume(paths):
            wiped.append(channel.name)
    return wiped


def _read(channel: Channel, paths: Distro) -> Token | None:
    token = channel.read(paths)
    if token is not None and token.kind is TokenKind.VM:
        raise ChannelBroken(channel.name, "it carries a VM token where the owner's token belongs")
    return token


def find_token(paths: Distro, only: list[str] | None = None, channels: Sequence[Channel] = CHANNELS) -> Found | None:
    """The token on the boot channels; None when every channel searched is absent."""
    selected = [channel for channel in channels if only is None or channel.name in only]
    for network in (False, True):
        found: list[tuple[str, Token]] = []
        for channel in selected:
            if channel.network != network:
                continue
            token = _read(channel, paths)
            if token is not None:
                found.append((channel.name, token))
        agreed = agreeing(found, _disagree)
        if agreed is not None:
            return Found(*agreed, also_on=tuple(name for name, _ in found[1:]))
    return None


def _disagree(first_name: str, first: Token, name: str, token: Token) -> ChannelBroken:
    return ChannelBroken(f"{first_name}+{name}", f"the channels disagree: {first_name} carries token "
                                                 f"{first.token_id.hex()}, {name} carries token {token.token_id.hex()}")
