"""Wire messages of protocol version 1 and their canonical, bounded encoding.

Frame:  u16 body length (big endian, 2..MAX_BODY) || body
Body:   u8 version || u8 type || fields in the fixed order of the message's schema
Fields: ``u8``  one byte, from an enumerated set
        ``fixed(n)`` exactly n bytes
        ``var(lo, hi)`` u16 length in [lo, hi] then that many bytes

There is exactly one encoding of each message: fixed order, exact or bounded lengths, no
optional fields and no trailing bytes. Anything else is a RemoteProtocolError, never a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import ClassVar

from imprint.owneraddr import MAX_ADDRESS_TEXT
from imprint.protocol.errors import AlertCode, RemoteProtocolError
from imprint.tokens import Mode

PROTOCOL_VERSION = 1
MAX_BODY = 1024
_LEN = struct.Struct(">H")


class MessageType(IntEnum):
    OWNER_HELLO = 1
    VM_HELLO = 2
    VM_PROOF = 3
    OWNER_PROOF = 4
    VM_CONFIRM = 5
    VM_DIAL = 6
    ALERT = 15


class WireMode(IntEnum):
    """A tokens.Mode as the ``mode`` byte of OwnerHello and VmHello spells it."""

    SHARED = 1
    NOSECRET = 2


WIRE_MODE: dict[Mode, WireMode] = {Mode.SHARED: WireMode.SHARED, Mode.NOSECRET: WireMode.NOSECRET}


@dataclass(frozen=True)
class _Fixed:
    size: int


@dataclass(frozen=True)
class _Var:
    lo: int
    hi: int


class _U8:
    pass


_FieldSpec = _Fixed | _Var | _U8
U8 = _U8()


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[MessageType]
    SCHEMA: ClassVar[tuple[_FieldSpec, ...]]


@dataclass(frozen=True)
class OwnerHello(Message):
    """Owner -> VM. Opens the exchange."""

    TYPE = MessageType.OWNER_HELLO
    SCHEMA = (U8, _Fixed(8), _Fixed(32), _Var(1, 800), _Fixed(32))
    mode: int
    token_id: bytes
    owner_nonce: bytes
    owner_cert: bytes  # self-signed DER certificate of the owner key: the VM's later mTLS trust anchor
    seen_server_cert_sha256: bytes


@dataclass(frozen=True)
class VmHello(Message):
    """VM -> owner. The VM's nonce and public key."""

    TYPE = MessageType.VM_HELLO
    SCHEMA = (U8, _Fixed(32), _Var(1, 512))
    mode: int
    vm_nonce: bytes
    vm_spki: bytes


@dataclass(frozen=True)
class VmProof(Message):
    """VM -> owner. Signature by the VM key (and in shared mode a MAC under K) over the transcript."""

    TYPE = MessageType.VM_PROOF
    SCHEMA = (_Var(1, 256), _Var(0, 64))
    signature: bytes
    mac: bytes


@dataclass(frozen=True)
class OwnerProof(Message):
    """Owner -> VM. Signature by the owner key (and in shared mode a MAC under K) over the transcript."""

    TYPE = MessageType.OWNER_PROOF
    SCHEMA = (_Var(1, 256), _Var(0, 64))
    signature: bytes
    mac: bytes


@dataclass(frozen=True)
class VmConfirm(Message):
    """VM -> owner. The VM has pinned the owner's key and consumed the token. Signed (and in
    shared mode MACed) over the transcript including OwnerProof, so it cannot be replayed."""

    TYPE = MessageType.VM_CONFIRM
    SCHEMA = (_Var(1, 256), _Var(0, 64))
    signature: bytes
    mac: bytes


# Whatever the owner address parser accepts must fit: a 253-character name and its port is 259.
MAX_ADDRESS_BYTES = MAX_ADDRESS_TEXT
MAX_VM_CERT_BYTES = 600  # the agent's self-signed Ed25519 certificate is about 240 bytes


@dataclass(frozen=True)
class VmDial(Message):
    """VM -> owner, first, only when the VM dialled the owner (the VM is the TLS client). Says
    which token the VM holds (its id), the certificate of the VM key it will prove (the VM shows
    no certificate in the TLS handshake of a bind, since a listener cannot accept one it does
    not know; this is the certificate it presents once bound, and how a listener with many
    pending binds finds this VM in no-secrets mode), the owner address it dialled (so the
    transcript covers where the VM was sent) and the hash of the TLS server certificate it saw."""

    TYPE = MessageType.VM_DIAL
    SCHEMA = (U8, _Fixed(8), _Var(1, MAX_VM_CERT_BYTES), _Var(1, MAX_ADDRESS_BYTES), _Fixed(32))
    mode: int
    token_id: bytes
    vm_cert: bytes  # canonical DER, self-signed by the VM key
    owner_address: bytes  # ASCII HOST:PORT as the boot channel gave it
    seen_server_cert_sha256: bytes


@dataclass(frozen=True)
class Alert(Message):
    """Either way. Ends the exchange with a reason; never carries secrets."""

    TYPE = MessageType.ALERT
    SCHEMA = (U8, _Var(0, 200))
    code: int
    detail: bytes


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (OwnerHello, VmHello, VmProof, OwnerProof, VmConfirm, VmDial, Alert)
}


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(AlertCode.MALFORMED, detail)


def encode_body(message: Message) -> bytes:
    out = bytearray((PROTOCOL_VERSION, message.TYPE))
    for spec, field in zip(message.SCHEMA, fields(message), strict=True):
        value = getattr(message, field.name)
        if isinstance(spec, _U8):
            if not 0 <= value <= 255:
                raise ValueError(f"{field.name} out of range")
            out.append(value)
        elif isinstance(spec, _Fixed):
            if len(value) != spec.size:
                raise ValueError(f"{field.name} must be {spec.size} bytes")
            out += value
        else:
            if not spec.lo <= len(value) <= spec.hi:
                raise ValueError(f"{field.name} must be {spec.lo}..{spec.hi} bytes")
            out += _LEN.pack(len(value)) + value
    return bytes(out)


def encode_frame(message: Message) -> bytes:
    body = encode_body(message)
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> Message:
    if len(body) < 2:
        raise _malformed("message shorter than its header")
    if len(body) > MAX_BODY:
        raise _malformed(f"message of {len(body)} bytes exceeds the {MAX_BODY}-byte bound")
    version, type_code = body[0], body[1]
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            AlertCode.VERSION_UNSUPPORTED,
            f"peer speaks protocol version {version}; this side speaks {PROTOCOL_VERSION}",
        )
    cls = MESSAGE_TYPES.get(type_code)
    if cls is None:
        raise _malformed(f"unknown message type {type_code}")
    pos = 2
    values: list[int | bytes] = []
    for spec, field in zip(cls.SCHEMA, fields(cls), strict=True):
        if isinstance(spec, _U8):
            if pos + 1 > len(body):
                raise _malformed(f"{cls.__name__} truncated in {field.name}")
            values.append(body[pos])
            pos += 1
            continue
        if isinstance(spec, _Fixed):
            size = spec.size
        else:
            if pos + 2 > len(body):
                raise _malformed(f"{cls.__name__} truncated in the length of {field.name}")
            (size,) = _LEN.unpack_from(body, pos)
            pos += 2
            if not spec.lo <= size <= spec.hi:
                raise _malformed(f"{cls.__name__}.{field.name} length {size} outside {spec.lo}..{spec.hi}")
        if pos + size > len(body):
            raise _malformed(f"{cls.__name__} truncated in {field.name}")
        values.append(body[pos : pos + size])
        pos += size
    if pos != len(body):
        raise _malformed(f"{cls.__name__} has {len(body) - pos} trailing bytes")
    return cls(*values)


class FrameBuffer:
    """Reassembles frames from a byte stream. Rejects an oversized length before buffering it."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 2:
            (size,) = _LEN.unpack_from(self._buf, 0)
            if size > MAX_BODY:
                raise _malformed(f"frame announces {size} bytes, over the {MAX_BODY}-byte bound")

    def next_body(self) -> bytes | None:
        if len(self._buf) < 2:
            return None
        (size,) = _LEN.unpack_from(self._buf, 0)
        if size > MAX_BODY:
            raise _malformed(f"frame announces {size} bytes, over the {MAX_BODY}-byte bound")
        if len(self._buf) < 2 + size:
            return None
        body = bytes(self._buf[2 : 2 + size])
        del self._buf[: 2 + size]
        return body

    @property
    def pending(self) -> int:
        return len(self._buf)
