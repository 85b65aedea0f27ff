"""Raw metadata disk: a block device with by-id serial ``imprint`` (see imprint.metadisk)."""

from __future__ import annotations

import os

from imprint import metadisk, tokens
from imprint.guest.channels import ChannelBroken
from imprint.guest.paths import GuestPaths

NAME = "metadata-disk"
DEVICE_ID = "virtio-imprint"


def _device(paths: GuestPaths) -> str | None:
    path = paths.by_id(DEVICE_ID)
    return str(path) if path.exists() else None


def read(paths: GuestPaths) -> tokens.Token | None:
    device = _device(paths)
    if device is None:
        return None
    try:
        with open(device, "rb") as disk:
            data = disk.read(metadisk.REPLY_OFFSET)
    except OSError as exc:
        raise ChannelBroken(NAME, f"cannot read {device}: {exc.strerror}") from None
    try:
        header = metadisk.decode_header(data)
    except metadisk.MetadiskError as exc:
        raise ChannelBroken(NAME, str(exc)) from None
    if header.consumed:
        raise ChannelBroken(NAME, "its token was consumed by an earlier bind (the disk says so)")
    try:
        return tokens.parse(header.token)
    except tokens.TokenError as exc:
        raise ChannelBroken(NAME, str(exc)) from None


def _write(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_SYNC)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def reply(paths: GuestPaths, line: str) -> bool:
    """Write the VM token line into the reply area; False when there is no metadata disk."""
    device = _device(paths)
    if device is None:
        return False
    with open(device, "rb") as disk:
        header = metadisk.decode_header(disk.read(metadisk.REPLY_OFFSET))
    _write(device, header.reply_offset, metadisk.encode_reply(line + "\n", header.reply_size))
    return True


def consume(paths: GuestPaths) -> bool:
    """Wipe K from the disk and mark it consumed; False when there is no disk to wipe."""
    device = _device(paths)
    if device is None:
        return False
    _write(device, 0, metadisk.encode_header("", flags=metadisk.FLAG_CONSUMED))
    return True
