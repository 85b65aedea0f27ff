"""Boot channels, both halves: how the agent finds its token and how a site hands it one.

Each channel is one module holding one :class:`~imprint.channels.channel.Channel` object
(``CHANNEL``): its guest reader, its reply and consume hooks, its site artefact builders and
every constant both sides share. :data:`CHANNELS` below is the registry.

To add a channel: write one module here that defines ``CHANNEL = Channel(...)`` (see
channel.py), then add one line to ``CHANNELS``. Nothing else names it: the agent's
``--channels``, the site's ``seed``/``boot --channel`` and the docs' list come from here.

All local channels are read (they are cheap), so two channels carrying different tokens, or the
same token with different owner addresses, are caught and refused. Network channels are asked
only when no local channel carries a token, because an absent metadata service costs timeouts.
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
from imprint.channels.channel import Channel, ChannelBroken, Offer, SiteArtefact, agreeing
from imprint.guest.distro import Distro
from imprint.owneraddr import OwnerAddress, encode_list
from imprint.tokens import Token, TokenKind

__all__ = ["CHANNELS", "Channel", "ChannelBroken", "Found", "Offer", "channel_names", "consume_token", "find_token",
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
    # Where the VM dials its owner, as the site gave them beside the token (every channel that
    # carries the token agrees on them); () when the site gave none.
    owners: tuple[OwnerAddress, ...] = ()

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


def _read(channel: Channel, paths: Distro) -> Offer | None:
    found = channel.read(paths)
    if found is not None and found.token.kind is TokenKind.VM:
        raise ChannelBroken(channel.name, "it carries a VM token where the owner's token belongs")
    return found


def find_token(paths: Distro, only: list[str] | None = None, channels: Sequence[Channel] = CHANNELS,
               consumed: frozenset[str] = frozenset()) -> Found | None:
    """The token on the boot channels; None when every channel searched is absent. A token
    whose id is in ``consumed`` (a released VM's old one, left on its channel) counts as absent:
    it neither binds nor disagrees with the new one."""
    selected = [channel for channel in channels if only is None or channel.name in only]
    for network in (False, True):
        found: list[tuple[str, Offer]] = []
        for channel in selected:
            if channel.network != network:
                continue
            offer = _read(channel, paths)
            if offer is not None and offer.token.token_id.hex() not in consumed:
                found.append((channel.name, offer))
        agreed = agreeing(found, _disagree)
        if agreed is not None:
            name, offer = agreed
            return Found(name, offer.token, also_on=tuple(name for name, _ in found[1:]), owners=offer.owners)
    return None


def _owners(owners: tuple[OwnerAddress, ...]) -> str:
    # Parsed addresses: their text form is safe to show (and they are not secret).
    return encode_list(owners) if owners else "none"


def _disagree(first_name: str, first: Offer, name: str, other: Offer) -> ChannelBroken:
    if first.token != other.token:
        return ChannelBroken(f"{first_name}+{name}", f"the channels disagree: {first_name} carries token "
                                                     f"{first.token.token_id.hex()}, {name} carries token "
                                                     f"{other.token.token_id.hex()}")
    return ChannelBroken(f"{first_name}+{name}", f"the channels disagree on the owner addresses: {first_name} "
                                                 f"gives {_owners(first.owners)}, {name} gives {_owners(other.owners)}")
