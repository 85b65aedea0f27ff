"""Raw metadata disk: a virtio-blk device with serial ``imprint`` (format: imprint.metadisk).

The by-id link is followed (udev makes it); what it points to must be a block device (or an
image file under a test root): a FIFO there is refused at once instead of blocking the agent.
The site's ``metadata-disk`` artefact is a raw image with the serial set on its virtio-blk
device; its reply area is the site's preferred reverse channel.

The owner addresses are the header's ``owners`` field (a version 2 header: the list form right
after the token, under the same checksum; see imprint.metadisk). A header with owner addresses
and an empty token is broken.
"""

from __future__ import annotations

import os
from pathlib import Path

from imprint import boundedio, metadisk
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
    write_private,
)
from imprint.guest.distro import Distro

NAME = "metadata-disk"
SERIAL = "imprint"
DEVICE_ID = f"virtio-{SERIAL}"  # udev's /dev/disk/by-id name of a virtio disk with that serial


def _device(paths: Distro) -> str | None:
    path = paths.by_id(DEVICE_ID)
    return str(path) if path.exists() else None


def _open(device: str, *, write: bool = False) -> int:
    """Raises boundedio.InputError (a ValueError, as the reply and consume callers expect)."""
    fd = boundedio.open_checked(Path(device), boundedio.FileType.DEVICE, follow_links=True, write=write)
    if fd is None:
        raise boundedio.InputError(f"cannot open {device}: it went away")
    return fd


def _header(device: str) -> tuple[metadisk.Header, int]:
    """The disk's header and the device's size."""
    try:
        fd = _open(device)
    except boundedio.InputError as exc:
        raise ChannelBroken(NAME, str(exc)) from None
    try:
        data = os.pread(fd, metadisk.REPLY_OFFSET, 0)
        size = boundedio.device_size(fd)
    except OSError as exc:
        raise ChannelBroken(NAME, f"cannot read {device}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return metadisk.decode_header(data), size
    except metadisk.MetadiskError as exc:
        raise ChannelBroken(NAME, str(exc)) from None


def read(paths: Distro) -> Offer | None:
    device = _device(paths)
    if device is None:
        return None
    header, _ = _header(device)
    if header.consumed:
        raise ChannelBroken(NAME, "its token was consumed by an earlier bind (the disk says so)")
    owners = parse_owners(NAME, header.owners, "header owners") if header.owners else ()
    if owners and not header.token:
        return offer(NAME, None, owners, "header owners")
    return Offer(parse_token(NAME, header.token), owners)


def _write(device: str, offset: int, data: bytes) -> None:
    fd = _open(device, write=True)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def reply(paths: Distro, line: str) -> bool:
    """Write the VM token line into the reply area; False when there is no metadata disk."""
    device = _device(paths)
    if device is None:
        return False
    try:
        header, size = _header(device)
    except ChannelBroken as exc:
        raise ValueError(exc.fault) from None
    if header.reply_offset + header.reply_size > size:
        raise ValueError(f"{device}: the reply area ({header.reply_offset}+{header.reply_size}) ends past "
                      f"the end of the disk ({size} bytes)")
    _write(device, header.reply_offset, metadisk.encode_reply(line + "\n", header.reply_size))
    return True


def consume(paths: Distro) -> bool:
    """Wipe K from the disk and mark it consumed; False when there is no disk to wipe."""
    device = _device(paths)
    if device is None:
        return False
    _write(device, 0, metadisk.encode_header("", flags=metadisk.FLAG_CONSUMED))
    return True


def build(token: str, out: Path, owners: Owners = ()) -> Artefact:
    write_private(out, metadisk.build(token, owners=encode_owners(owners) if owners else ""))
    return Artefact(
        NAME, out,
        qemu_args=["-drive", f"file={out},if=none,id=imprint-meta,format=raw",
                   "-device", f"virtio-blk-pci,drive=imprint-meta,serial={SERIAL}"],
        note=f"the guest sees /dev/disk/by-id/{DEVICE_ID} and writes its VM token into the reply area",
        serial=SERIAL,
    )


CHANNEL = Channel(NAME, read, reply=reply, consume=consume, artefacts=(SiteArtefact("", build, hotplug=True),))
