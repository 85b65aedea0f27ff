"""The raw metadata disk: a block device (by-id serial ``imprint``) with a fixed header, the
token, and a reply area the VM writes its VM token into. Shared by the site (which builds and
reads back the disk) and the agent (which reads the token, writes the reply, wipes K).

Header, at offset 0 (all integers big-endian)::

    0   8  magic      b"IMPRMETA"
    8   2  version    1, or 2 when the disk carries owner addresses
    10  2  flags      bit 0: the token was consumed and wiped
    12  2  length     token length in bytes, 0..256 (0 once wiped)
    14  2  owners     version 2: length of the owner address list; version 1: reserved, 0
    16  4  reply_off  offset of the reply area (4096)
    20  4  reply_len  size of the reply area (4096)
    24  32 checksum   SHA-256 over bytes 0..23, the token bytes and the owner bytes
    56  .. token      ASCII
    ..  .. owners     ASCII, right after the token: the owner addresses in the list form
                      (``host:port,host:port``, imprint.owneraddr), which the channel parses

A disk without owner addresses is exactly a version 1 disk, so a site that gives none writes what
it always wrote; an agent that predates version 2 refuses a disk with owners by its version.

Reply area, at reply_off::

    0   8  magic      b"IMPRREPL"
    8   2  version    1
    10  2  length     payload length
    12  4  reserved   0
    16  32 checksum   SHA-256 over bytes 0..15 and the payload
    48  .. payload    "IMPRINT-VM-TOKEN <token>\\n"

An all-zero reply area means "no reply yet".

The header is someone else's input on both sides (the site may be hostile to the VM, the disk
may come back altered to the site): the reply area must lie after the header block and within
the first ``MAX_REPLY_END`` bytes, so a reply length of 4 GiB or an offset past the end of the
disk is refused here, before anyone allocates or writes there.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

MAGIC = b"IMPRMETA"
REPLY_MAGIC = b"IMPRREPL"
VERSION = 1
VERSION_OWNERS = 2  # the header carries owner addresses (the reply area stays at VERSION)
FLAG_CONSUMED = 1
MAX_TOKEN = 256
REPLY_OFFSET = 4096
REPLY_SIZE = 4096
# The owner list fills at most what is left of the header block after the longest token.
MAX_OWNERS = REPLY_OFFSET - 56 - MAX_TOKEN
DISK_SIZE = REPLY_OFFSET + REPLY_SIZE
# Where a reply area may end: version 1 disks put it at 4096..8192; room to grow, no more.
MAX_REPLY_END = 64 * 1024
_MIN_REPLY = 16 + 32 + 64  # the reply header and a VM token line
_HEADER = struct.Struct(">8sHHHHII")
_REPLY = struct.Struct(">8sHHI")


class MetadiskError(ValueError):
    """The disk is present but not a valid imprint metadata disk (names the fault)."""


@dataclass(frozen=True)
class Header:
    flags: int
    token: str
    reply_offset: int
    reply_size: int
    owners: str = ""  # the owner address list as written (not yet parsed); "" when none

    @property
    def consumed(self) -> bool:
        return bool(self.flags & FLAG_CONSUMED)


def build(token: str, *, flags: int = 0, owners: str = "") -> bytes:
    """A whole disk image carrying ``token`` (and the owner list ``owners``) and an empty reply area."""
    return encode_header(token, flags=flags, owners=owners) + bytes(DISK_SIZE - REPLY_OFFSET)


def encode_header(token: str, *, flags: int = 0, owners: str = "") -> bytes:
    raw = token.encode("ascii")
    if len(raw) > MAX_TOKEN:
        raise MetadiskError(f"token of {len(raw)} bytes exceeds {MAX_TOKEN}")
    owner_raw = owners.encode("ascii")
    if len(owner_raw) > MAX_OWNERS:
        raise MetadiskError(f"owner address list of {len(owner_raw)} bytes exceeds {MAX_OWNERS}")
    version = VERSION_OWNERS if owner_raw else VERSION
    fixed = _HEADER.pack(MAGIC, version, flags, len(raw), len(owner_raw), REPLY_OFFSET, REPLY_SIZE)
    header = fixed + hashlib.sha256(fixed + raw + owner_raw).digest() + raw + owner_raw
    return header + bytes(REPLY_OFFSET - len(header))


def decode_header(data: bytes) -> Header:
    if len(data) < _HEADER.size + 32:
        raise MetadiskError(f"disk is {len(data)} bytes, too small for the header")
    magic, version, flags, length, owner_length, reply_off, reply_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MetadiskError("bad magic: not an imprint metadata disk")
    if version not in (VERSION, VERSION_OWNERS):
        raise MetadiskError(f"header version {version} is not supported (this imprint reads {VERSION} "
                            f"and {VERSION_OWNERS})")
    if version == VERSION:
        owner_length = 0  # reserved in version 1, and not covered by anything but the checksum
    if length > MAX_TOKEN:
        raise MetadiskError(f"token length {length} exceeds {MAX_TOKEN}")
    if owner_length > MAX_OWNERS:
        raise MetadiskError(f"owner address list length {owner_length} exceeds {MAX_OWNERS}")
    start = _HEADER.size + 32
    if len(data) < start + length + owner_length:
        raise MetadiskError("disk truncated inside the token or the owner addresses")
    raw = data[start : start + length]
    owner_raw = data[start + length : start + length + owner_length]
    if hashlib.sha256(data[: _HEADER.size] + raw + owner_raw).digest() != data[_HEADER.size : start]:
        raise MetadiskError("header checksum mismatch: the disk is corrupt")
    if reply_off < REPLY_OFFSET:
        raise MetadiskError(f"reply area at offset {reply_off} overlaps the header block (0..{REPLY_OFFSET})")
    if reply_len < _MIN_REPLY:
        raise MetadiskError(f"reply area of {reply_len} bytes is too small (at least {_MIN_REPLY})")
    if reply_off + reply_len > MAX_REPLY_END:
        raise MetadiskError(f"reply area at {reply_off} of {reply_len} bytes ends past {MAX_REPLY_END} "
                            "(where a metadata disk's reply area must end)")
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MetadiskError("token is not ASCII") from None
    try:
        owners = owner_raw.decode("ascii")
    except UnicodeDecodeError:
        raise MetadiskError("the owner address list is not ASCII") from None
    if version == VERSION_OWNERS and not owners:
        raise MetadiskError("a version 2 header with no owner addresses (a version 1 header has none)")
    return Header(flags=flags, token=token, reply_offset=reply_off, reply_size=reply_len, owners=owners)


def encode_reply(payload: str, size: int = REPLY_SIZE) -> bytes:
    if not _MIN_REPLY <= size <= MAX_REPLY_END:
        raise MetadiskError(f"reply area of {size} bytes is outside {_MIN_REPLY}..{MAX_REPLY_END}")
    raw = payload.encode("ascii")
    fixed = _REPLY.pack(REPLY_MAGIC, VERSION, len(raw), 0)
    block = fixed + hashlib.sha256(fixed + raw).digest() + raw
    if len(block) > size:
        raise MetadiskError("reply does not fit the reply area")
    return block + bytes(size - len(block))


def decode_reply(area: bytes) -> str | None:
    """The reply payload, None when nothing was written yet; raises on a corrupt reply."""
    if not any(area[: _REPLY.size + 32]):
        return None
    if len(area) < _REPLY.size + 32:
        raise MetadiskError("reply area truncated")
    magic, version, length, _reserved = _REPLY.unpack_from(area)
    if magic != REPLY_MAGIC:
        raise MetadiskError("reply area has a bad magic")
    if version != VERSION:
        raise MetadiskError(f"reply version {version} is not supported")
    start = _REPLY.size + 32
    if len(area) > MAX_REPLY_END:
        raise MetadiskError(f"reply area of {len(area)} bytes is larger than {MAX_REPLY_END}")
    raw = area[start : start + length]
    if len(raw) != length or hashlib.sha256(area[: _REPLY.size] + raw).digest() != area[_REPLY.size : start]:
        raise MetadiskError("reply checksum mismatch: the reply is corrupt or half-written")
    return raw.decode("ascii", "replace")
