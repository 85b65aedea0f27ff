"""The kerberos keytab format (MIT's version 0x502) and the names both halves of the kerberos
backend check: the owner reads what kadmin extracted, the agent merges what it received."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_KEYTAB = 1 << 20
MAX_ENTRIES = 4096
PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*@[A-Za-z0-9._-]+\Z")
REALM_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}\Z")
HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253})(:[0-9]{1,5})?\Z")
ENCTYPES = {
    16: "des3-cbc-sha1", 17: "aes128-cts-hmac-sha1-96", 18: "aes256-cts-hmac-sha1-96",
    19: "aes128-cts-hmac-sha256-128", 20: "aes256-cts-hmac-sha384-192", 23: "arcfour-hmac",
    25: "camellia128-cts-cmac", 26: "camellia256-cts-cmac",
}


class KeytabError(ValueError):
    """Not a keytab, or not one we can merge safely."""


@dataclass(frozen=True)
class KeytabEntry:
    principal: str
    name_type: int
    timestamp: int
    kvno: int
    enctype: int
    key: bytes
    raw: bytes  # the entry as it is on disk, without its size field: kept byte for byte

    @property
    def ident(self) -> tuple[str, int, int]:
        return self.principal, self.kvno, self.enctype

    def report(self) -> dict[str, Any]:
        return {"principal": self.principal, "kvno": self.kvno,
                "enctype": ENCTYPES.get(self.enctype, str(self.enctype)), "timestamp": self.timestamp}


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise KeytabError(f"{self.where} is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def text(self, what: str) -> str:
        raw = self.take(self.u16())
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KeytabError(f"{self.where}: the {what} is not UTF-8") from None
        if not value or any(c in value for c in "/@\0\n"):
            raise KeytabError(f"{self.where}: the {what} {value[:80]!r} is not valid")
        return value


def parse_keytab(data: bytes) -> list[KeytabEntry]:
    """Every entry of an MIT keytab (format 0x0502: big-endian, as MIT and Heimdal write it)."""
    if len(data) > MAX_KEYTAB:
        raise KeytabError(f"it is {len(data)} bytes; at most {MAX_KEYTAB}")
    if len(data) < 2 or data[0] != 5:
        raise KeytabError("it does not start with the keytab magic 0x05 (MIT keytab format 0x0502)")
    if data[1] != 2:
        raise KeytabError(f"keytab format 0x05{data[1]:02x} is not supported (only 0x0502)")
    entries: list[KeytabEntry] = []
    pos = 2
    while pos < len(data):
        if len(data) - pos < 4:
            raise KeytabError(f"it is truncated at byte {pos}")
        size = int.from_bytes(data[pos:pos + 4], "big", signed=True)
        pos += 4
        if size == 0:  # MIT stops reading at a zero size: the rest is unused space
            break
        if size < 0:  # a hole left by a removed entry
            pos += -size
            if pos > len(data):
                raise KeytabError("a hole runs past the end of the file")
            continue
        if pos + size > len(data):
            raise KeytabError(f"entry {len(entries)} is truncated ({size} bytes announced)")
        entries.append(_parse_entry(data[pos:pos + size], f"entry {len(entries)}"))
        pos += size
        if len(entries) > MAX_ENTRIES:
            raise KeytabError(f"it has more than {MAX_ENTRIES} entries")
    return entries


def _parse_entry(raw: bytes, where: str) -> KeytabEntry:
    r = _Reader(raw, where)
    count = r.u16()
    if not 1 <= count <= 16:
        raise KeytabError(f"{where}: {count} name components")
    realm = r.text("realm")
    components = [r.text("name component") for _ in range(count)]
    name_type = r.u32()
    timestamp = r.u32()
    kvno = r.u8()
    enctype = r.u16()
    key = r.take(r.u16())
    if not key:
        raise KeytabError(f"{where}: an empty key")
    if len(raw) - r.pos >= 4:  # the 32-bit kvno MIT appends; 0 means "use the 8-bit one"
        kvno = r.u32() or kvno
    return KeytabEntry(principal="/".join(components) + "@" + realm, name_type=name_type, timestamp=timestamp,
                       kvno=kvno, enctype=enctype, key=key, raw=raw)


def serialize_keytab(entries: list[KeytabEntry]) -> bytes:
    return b"\x05\x02" + b"".join(len(e.raw).to_bytes(4, "big") + e.raw for e in entries)


def merge_keytabs(existing: list[KeytabEntry], delivered: list[KeytabEntry]) -> tuple[list[KeytabEntry], int, int]:
    """(merged, added, replaced): see the module docstring."""
    wanted = {e.ident: e for e in delivered}
    out: list[KeytabEntry] = []
    present: set[tuple[str, int, int]] = set()
    replaced = 0
    for entry in existing:
        new = wanted.get(entry.ident)
        if new is None:
            out.append(entry)
        elif new.key == entry.key and entry.ident not in present:
            out.append(entry)  # the same key: the existing entry stays as it is
            present.add(entry.ident)
        else:
            replaced += 1
    added = [e for e in wanted.values() if e.ident not in present]
    return out + added, len(added) - replaced, replaced


