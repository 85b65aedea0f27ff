"""The kerberos backend: install a host keytab the owner extracted from its realm, merged into
``/etc/krb5.keytab``, and a krb5.conf snippet that names the realm.

Config (the owner's half, ``imprint.backends.kerberos.owner``, builds it)::

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

from imprint.backends import BackendContext, BackendError, BackendResult
from imprint.backends.kerberos.keytab import (
    HOST_RE,
    MAX_KEYTAB,
    KeytabEntry,
    KeytabError,
    merge_keytabs,
    parse_keytab,
    serialize_keytab,
)


# -- the backend
@dataclass
class _Conf:
    realm: str
    kdc: list[str]
    admin_server: str | None
    default_realm: bool
    domain_realm: list[str]


def apply(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    """``config`` fits imprint.backends.kerberos.schema (the framework checked it)."""
    principals: list[str] = config.get("principals") or []
    if not principals:
        raise BackendError("kerberos.principals must list at least one principal")
    keytab_guest: str = config.get("keytab_path") or ctx.paths.files.krb5_keytab
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
        parts.append(f"realm {conf.realm} in {ctx.paths.files.krb5_snippet}")
    return ctx.result("; ".join(parts), entries=entries, keytab_path=keytab_guest, added=added, replaced=replaced)


def _delivered(config: dict[str, Any], principals: list[str]) -> list[KeytabEntry] | None:
    text: str | None = config.get("keytab")
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


def _parse_conf(raw: dict[str, Any] | None) -> _Conf | None:
    if raw is None:
        return None
    where = "kerberos.krb5_conf"
    realm: str = raw["realm"]
    kdc: list[str] = raw.get("kdc") or []
    admin: str | None = raw.get("admin_server")
    for host in [*kdc, *([admin] if admin else [])]:
        if not HOST_RE.match(host):
            raise BackendError(f"{where}: {host[:80]!r} is not a host[:port]")
    domain_realm: list[str] = raw.get("domain_realm") or []
    for host in domain_realm:
        if not HOST_RE.match(host) or ":" in host:
            raise BackendError(f"{where}.domain_realm: {host[:80]!r} is not a host name")
    return _Conf(realm=realm, kdc=kdc, admin_server=admin,
                 default_realm=raw.get("default_realm") is not False,
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


def _include_re(snippet_dir: str) -> re.Pattern[bytes]:
    return re.compile(rb"^\s*includedir\s+" + re.escape(snippet_dir.encode()) + rb"/?\s*$", re.M)


def _write_conf(ctx: BackendContext, conf: _Conf) -> None:
    files = ctx.paths.files
    snippet = ctx.path(files.krb5_snippet)
    ctx.ensure_dir(snippet.parent, mode=0o755, uid=0, gid=0, fix_existing=False, parents=True)
    ctx.write_file(snippet, snippet_text(conf).encode(), mode=0o644, uid=0, gid=0)
    # krb5.conf reads a directory only where it says `includedir`. The line goes first, because
    # for a relation given twice MIT uses the first one it reads: so the snippet's default_realm
    # and realm wins over the image's (Debian's krb5-config writes a default_realm).
    main = ctx.path(files.krb5_conf)
    old = ctx.read_file(main)
    if old is not None and _include_re(files.krb5_snippet_dir).search(old):
        return
    head = (f"# Added by imprint's kerberos backend: read {files.krb5_snippet_dir}/ (imprint.conf) first.\n"
            f"includedir {files.krb5_snippet_dir}/\n").encode()
    ctx.write_file(main, head + (b"\n" + old if old else b""), mode=0o644, uid=0, gid=0)
