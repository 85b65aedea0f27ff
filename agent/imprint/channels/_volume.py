"""Shared by the channels on a labelled seed volume (imprint-seed, nocloud, config-2), both halves.

Guest: udev names a filesystem by its label under ``/dev/disk/by-label``; a channel lists the
labels it answers to (``cidata`` and ``CIDATA``: ISO labels are usually lowercase, FAT labels
uppercase) and gives a reader for one volume. Each labelled volume present is read; when two
are present they must agree, since the agent cannot know which one the site meant.

Site: :func:`seed_artefacts` gives a channel its ``-iso`` and ``-vfat`` artefacts, built from the
files the channel says belong on the volume (:mod:`imprint.channels._images` makes the images,
imported only when a site builds one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from imprint import tokens
from imprint.channels.channel import Artefact, ChannelBroken, Offer, Owners, SiteArtefact, agreeing, encode_owners
from imprint.guest import volumes
from imprint.guest.distro import Distro


class SeedFault(Exception):
    """What is wrong with the content of a seed volume (the channel adds which volume)."""


VolumeReader = Callable[[volumes.Volume], Offer | None]
Files = dict[str, bytes]  # absolute path on the volume -> content
FilesMaker = Callable[[str, Owners], Files]  # (token, owner addresses) -> the volume's files

# cloud-init copies meta-data (NoCloud) and meta (config-2) into the guest's world-readable
# /run/cloud-init/instance-data.json: the site's notes say so, since a shared-mode token is K.
CLOUD_INIT_COPIES = "cloud-init copies it into world-readable instance-data.json, so for K prefer imprint-seed"


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


def file_text(data: bytes, what: str) -> str:
    """A token file: one line of ASCII."""
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise SeedFault(f"{what} is not ASCII text") from None


def not_a_token(what: str) -> str:
    """How a seed names a value that does not parse (the ``what`` of channel.parse_token)."""
    return f"{what} is not a valid token"


def instance_name(token: str) -> str:
    """A cloud-init seed's instance id and host name: the token id, which is safe to show
    (one-way from K in shared mode)."""
    return f"imprint-{tokens.parse(token).token_id.hex()}"


def _describe(label: str, found: Offer | None) -> str:
    if found is None:
        return f"{label} carries no imprint token"
    owners = f" with owner addresses {encode_owners(found.owners)}" if found.owners else " without owner addresses"
    return f"{label} carries token {found.token.token_id.hex()}{owners}"


def read_labelled(channel: str, paths: Distro, labels: Sequence[str], reader: VolumeReader) -> Offer | None:
    """The token (and owner addresses) on the volume(s) with one of ``labels``; None when none is
    present or the one present carries no imprint token (someone else's seed)."""
    results: list[tuple[str, Offer | None]] = []
    for label, device in labelled(paths, labels):
        where = f"{label} ({device})"
        try:
            with volumes.open_volume(device, paths.programs) as volume:
                found = reader(volume)
        except (volumes.VolumeError, SeedFault) as exc:
            raise ChannelBroken(channel, f"{where}: {exc}") from None
        except ChannelBroken as exc:
            raise ChannelBroken(channel, f"{where}: {exc.fault}") from None
        results.append((label, found))

    def refuse(first_label: str, first: Offer | None, label: str, other: Offer | None) -> ChannelBroken:
        return ChannelBroken(channel, f"two seeds labelled {first_label} and {label} disagree: "
                                      f"{_describe(first_label, first)}, {_describe(label, other)}")

    agreed = agreeing(results, refuse)
    return None if agreed is None else agreed[1]


def seed_artefacts(channel: str, iso_label: str, vfat_label: str, files: FilesMaker, *, iso_note: str,
                   vfat_note: str, vfat_writable: bool = False) -> tuple[SiteArtefact, ...]:
    """The ``iso`` and ``vfat`` artefacts of a seed-volume channel, both hot-pluggable."""

    def build_iso(token: str, out: Path, owners: Owners = ()) -> Artefact:
        from imprint.channels import _images

        return _images.iso_artefact(channel, iso_label, files(token, owners), out, iso_note)

    def build_vfat(token: str, out: Path, owners: Owners = ()) -> Artefact:
        from imprint.channels import _images

        return _images.vfat_artefact(channel, vfat_label, files(token, owners), out, vfat_note,
                                     readonly=not vfat_writable)

    return (SiteArtefact("iso", build_iso, hotplug=True), SiteArtefact("vfat", build_vfat, hotplug=True))
