"""Shared by the channels on a labelled seed volume (imprint-seed, nocloud, config-2).

udev names a filesystem by its label under ``/dev/disk/by-label``; a channel lists the labels
it answers to (``cidata`` and ``CIDATA``: ISO labels are usually lowercase, FAT labels
uppercase) and gives a reader for one volume. Each labelled volume present is read; when two
are present they must agree, since the agent cannot know which one the site meant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from imprint import tokens
from imprint.guest import volumes
from imprint.guest.channels import ChannelBroken
from imprint.guest.distro import Distro


class SeedFault(Exception):
    """What is wrong with the content of a seed volume (the channel adds which volume)."""


VolumeReader = Callable[[volumes.Volume], tokens.Token | None]


def labelled(paths: Distro, labels: Sequence[str]) -> list[tuple[str, Path]]:
    """(label, device) for each label present, one entry per device."""
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for label in labels:
        link = paths.by_label(label)
        # exists() follows the link: a dangling one is a device that went away, i.e. absent.
        if not link.exists():
            continue
        device = link.resolve()
        if device not in seen:
            seen.add(device)
            found.append((label, device))
    return found


def parse(text: str, what: str) -> tokens.Token:
    try:
        return tokens.parse(text)
    except tokens.TokenError as exc:
        raise SeedFault(f"{what} is not a valid token: {exc}") from None


def parse_file(data: bytes, what: str) -> tokens.Token:
    """A token file: one line of ASCII."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SeedFault(f"{what} is not ASCII text") from None
    return parse(text, what)


def _describe(label: str, token: tokens.Token | None) -> str:
    if token is None:
        return f"{label} carries no imprint token"
    return f"{label} carries token {token.token_id.hex()}"


def read_labelled(channel: str, paths: Distro, labels: Sequence[str], reader: VolumeReader) -> tokens.Token | None:
    """The token on the volume(s) with one of ``labels``; None when none is present or the one
    present carries no imprint token (someone else's seed)."""
    results: list[tuple[str, tokens.Token | None]] = []
    for label, device in labelled(paths, labels):
        where = f"{label} ({device})"
        try:
            with volumes.open_volume(device) as volume:
                token = reader(volume)
        except (volumes.VolumeError, SeedFault) as exc:
            raise ChannelBroken(channel, f"{where}: {exc}") from None
        results.append((label, token))
    if not results:
        return None
    first_label, first = results[0]
    for label, token in results[1:]:
        if token != first:
            raise ChannelBroken(channel, f"two seeds labelled {first_label} and {label} disagree: "
                                         f"{_describe(first_label, first)}, {_describe(label, token)}")
    return first
