"""The kerberos backend: install a host keytab the owner extracted from its realm, merged into
``/etc/krb5.keytab``, and a krb5.conf snippet that names the realm.

Config (the owner's half, ``imprint.owner.kerberos``, builds it)::

    principals:  ["host/web1.example.org@EXAMPLE.ORG", ...]   required: the principals this
                 backend is about; their entries are reported, and a delivered keytab may hold
                 no other principal
    keytab:      base64 of an MIT keytab (optional): merged into keytab_path
    keytab_path: guest path, default /etc/krb5.keytab
    krb5_conf:   {realm, kdc: [host[:port], ...], admin_server, default_realm: bool,
                  domain_realm: [host, ...]}   (optional) writes /etc/krb5.conf.d/imprint.conf
                 and makes /etc/krb5.conf include that directory

The keytab is validated before anything is written: it must parse completely as an MIT keytab
(format 0x0502, the only one MIT has written since 1.x; parsed here in Python, so the VM needs
no Kerberos tools) and hold only the listed principals. The existing keytab must parse too: a
file we cannot read is not overwritten. Merging keeps every existing entry byte for byte, in
order, except one with the same principal, kvno and enctype as a delivered entry but another key
(the delivered one replaces it); delivered entries already present are not added again. Old
kvnos of the same principal stay, as ``ktadd`` leaves them, so tickets issued before a rekey
still decrypt until they expire.

Results (``data``): ``entries`` [{principal, kvno, enctype, timestamp}] for the listed
principals as the keytab holds them after this run (no key material), ``keytab_path``,
``added``, ``replaced``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from imprint.backends import BackendContext, BackendError, BackendResult, check_keys, get_str_list, get_typed

KEYTAB_PATH = "/etc/krb5.keytab"
KRB5_CONF = "/etc/krb5.conf"
SNIPPET_DIR = "/etc/krb5.conf.d"
SNIPPET = "/etc/krb5.conf.d/imprint.conf"
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


# -- the backend
@dataclass
class _Conf:
    realm: str
    kdc: list[str]
    admin_server: str | None
    default_realm: bool
    domain_realm: list[str]


def apply(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    check_keys(config, ("principals", "keytab", "keytab_path", "krb5_conf"), "kerberos")
    principals = get_str_list(config, "principals", "kerberos", max_items=64)
    if not principals:
        raise BackendError("kerberos.principals must list at least one principal")
    for i, name in enumerate(principals):
        if not PRINCIPAL_RE.match(name):
            raise BackendError(f"kerberos.principals[{i}] {name[:80]!r} is not a principal (name/host@REALM)")
    keytab_guest = get_typed(config, "keytab_path", str, "kerberos", default=KEYTAB_PATH)
    path = ctx.path(keytab_guest)
    delivered = _delivered(config, principals)
    conf = _parse_conf(config.get("krb5_conf"))

    try:
        existing_data = ctx.read_file(path, limit=MAX_KEYTAB)
        existing = parse_keytab(existing_data) if existing_data else []
    except KeytabError as exc:
        raise BackendError(f"the existing {keytab_guest} is not a keytab this backend can merge with ({exc}); "
                           "refusing to replace it") from None

    # Everything is valid: act.
    final, added, replaced = existing, 0, 0
    if delivered is not None:
        final, added, replaced = merge_keytabs(existing, delivered)
        ctx.ensure_dir(path.parent, mode=0o755, uid=0, gid=0, fix_existing=False, parents=True)
        ctx.write_file(path, serialize_keytab(final), mode=0o600, uid=0, gid=0)
    if conf is not None:
        _write_conf(ctx, conf)

    entries = [e.report() for e in final if e.principal in principals]
    parts = [f"{keytab_guest}: {added} entr{'y' if added == 1 else 'ies'} added, {replaced} replaced"
             if delivered is not None else f"{keytab_guest}: nothing delivered"]
    kvnos = {p: max((e.kvno for e in final if e.principal == p), default=None) for p in principals}
    parts.append(", ".join(f"{p} kvno {k if k is not None else 'none'}" for p, k in kvnos.items()))
    if conf is not None:
        parts.append(f"realm {conf.realm} in {SNIPPET}")
    return ctx.result("; ".join(parts), entries=entries, keytab_path=keytab_guest, added=added, replaced=replaced)


def _delivered(config: dict[str, Any], principals: list[str]) -> list[KeytabEntry] | None:
    text = get_typed(config, "keytab", str, "kerberos")
    if text is None:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError("kerberos.keytab is not base64") from None
    try:
        entries = parse_keytab(data)
    except KeytabError as exc:
        raise BackendError(f"kerberos.keytab is not a keytab: {exc}") from None
    if not entries:
        raise BackendError("kerberos.keytab holds no entries")
    for entry in entries:
        if entry.principal not in principals:
            raise BackendError(f"kerberos.keytab holds a key for {entry.principal}, which is not one of "
                               f"kerberos.principals ({', '.join(principals)})")
    return entries


def _parse_conf(raw: Any) -> _Conf | None:
    if raw is None:
        return None
    where = "kerberos.krb5_conf"
    if not isinstance(raw, dict):
        raise BackendError(f"{where} must be an object, not {type(raw).__name__}")
    check_keys(raw, ("realm", "kdc", "admin_server", "default_realm", "domain_realm"), where)
    realm = get_typed(raw, "realm", str, where)
    if realm is None or not REALM_RE.match(realm):
        raise BackendError(f"{where}.realm {realm!r} is not a realm name")
    kdc = get_str_list(raw, "kdc", where, max_items=16) or []
    admin = get_typed(raw, "admin_server", str, where)
    for host in [*kdc, *([admin] if admin else [])]:
        if not HOST_RE.match(host):
            raise BackendError(f"{where}: {host[:80]!r} is not a host[:port]")
    domain_realm = get_str_list(raw, "domain_realm", where, max_items=64) or []
    for host in domain_realm:
        if not HOST_RE.match(host) or ":" in host:
            raise BackendError(f"{where}.domain_realm: {host[:80]!r} is not a host name")
    return _Conf(realm=realm, kdc=kdc, admin_server=admin,
                 default_realm=bool(get_typed(raw, "default_realm", bool, where, default=True)),
                 domain_realm=domain_realm)


def snippet_text(conf: _Conf) -> str:
    lines = ["# Written by imprint's kerberos backend on every apply; edits here are replaced."]
    if conf.default_realm:
        lines += ["[libdefaults]", f"    default_realm = {conf.realm}"]
    lines += ["[realms]", f"    {conf.realm} = {{"]
    lines += [f"        kdc = {host}" for host in conf.kdc]
    if conf.admin_server:
        lines.append(f"        admin_server = {conf.admin_server}")
    lines.append("    }")
    if conf.domain_realm:
        lines += ["[domain_realm]", *(f"    {host} = {conf.realm}" for host in conf.domain_realm)]
    return "\n".join(lines) + "\n"


INCLUDE_RE = re.compile(rb"^\s*includedir\s+/etc/krb5\.conf\.d/?\s*$", re.M)


def _write_conf(ctx: BackendContext, conf: _Conf) -> None:
    snippet = ctx.path(SNIPPET)
    ctx.ensure_dir(snippet.parent, mode=0o755, uid=0, gid=0, fix_existing=False, parents=True)
    ctx.write_file(snippet, snippet_text(conf).encode(), mode=0o644, uid=0, gid=0)
    # krb5.conf reads a directory only where it says `includedir`. The line goes first, because
    # for a relation given twice MIT uses the first one it reads: so the snippet's default_realm
    # and realm wins over the image's (Debian's krb5-config writes a default_realm).
    main = ctx.path(KRB5_CONF)
    old = ctx.read_file(main)
    if old is not None and INCLUDE_RE.search(old):
        return
    head = b"# Added by imprint's kerberos backend: read /etc/krb5.conf.d/ (imprint.conf) first.\n" \
           b"includedir /etc/krb5.conf.d/\n"
    ctx.write_file(main, head + (b"\n" + old if old else b""), mode=0o644, uid=0, gid=0)
