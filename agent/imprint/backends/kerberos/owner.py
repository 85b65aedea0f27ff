"""The owner's half of the kerberos backend: make the VM's principals in the realm, extract their
keys with kadmin, and deliver the keytab over the pinned channel.

Profile table (see imprint.owner.apply)::

    [kerberos]
    realm = "EXAMPLE.ORG"
    kdc = ["kdc1.example.org", "kdc2.example.org:88"]
    admin_server = "kdc1.example.org"        # default: the first kdc's host (port 749)
    admin_principal = "imprint/admin@EXAMPLE.ORG"
    admin_keytab = "/home/me/.config/imprint/kadmin.keytab"   # kadmin -k -t; or
    admin_password_env = "KADMIN_PASSWORD"   # the password in this environment variable, on stdin
    kadmin_local = false     # true: kadmin.local on this machine (the owner runs the KDC)
    fqdn = "web1.example.org"   # default: the VM name if it has a dot, else <vm>.<realm in lower case>
    services = ["host"]      # principals <service>/<fqdn>@REALM
    keytab_path = "/etc/krb5.keytab"
    krb5_conf = true         # write /etc/krb5.conf.d/imprint.conf and include it
    default_realm = true     # ... with default_realm = REALM
    rotate = false           # true: a new key on every apply

Rounds: the first only asks the agent which kvnos its keytab holds for the principals (nothing
is written, no key leaves the KDC). For each principal the owner asks the KDC (``getprinc``);
a missing one is made with ``addprinc -randkey``. Only a principal whose current kvno and
enctypes the VM does not hold is extracted: ``ktadd`` *randomizes the key again* (it is how MIT
extracts without the separate "e" privilege and ``-norandkey``), so extracting on every apply
would rekey the host each time and break idempotence. The keytab goes into a private temporary
directory, is read, overwritten and removed, and travels base64 in the second round with the
krb5.conf snippet; the site never sees it. The owner then asks the KDC again and checks that
the VM reports the current kvno. A second apply extracts nothing and changes nothing.

If the delivery fails after ``ktadd`` (the VM went away), the KDC already has the new key and the
VM's old one no longer works; the next apply sees the kvno differ and extracts again.

kadmin runs with a krb5.conf generated from this table (``KRB5_CONFIG``, in the same private
directory) and a memory credential cache, so neither the owner's own configuration nor its
tickets are touched. kadmin exits 0 even when a query fails, so every answer is checked on its
own terms (getprinc's output, the extracted keytab's entries).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imprint.backends import HOST_NAME_RE
from imprint.backends.kerberos.keytab import HOST_RE, MAX_KEYTAB, PRINCIPAL_RE, REALM_RE, KeytabError, parse_keytab
from imprint.boundedio import InputError, read_file
from imprint.owner.apply import ApplyContext, Review
from imprint.owner.errors import OwnerError, UsageError

SECTION_KEYS = ("realm", "kdc", "admin_server", "admin_principal", "admin_keytab", "admin_password_env",
                "kadmin_local", "fqdn", "services", "keytab_path", "krb5_conf", "default_realm", "rotate")
FQDN_RE = HOST_NAME_RE
SERVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
KADMIN_TIMEOUT = 60.0


@dataclass
class Settings:
    realm: str
    kdc: list[str]
    admin_server: str | None
    admin_principal: str | None
    admin_keytab: Path | None
    password: str | None
    local: bool
    fqdn: str
    principals: list[str]
    keytab_path: str
    krb5_conf: bool
    default_realm: bool
    rotate: bool


def settings(ctx: ApplyContext, section: dict[str, Any]) -> Settings:
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(SECTION_KEYS)}")

    def text(key: str, default: str | None = None) -> str | None:
        value = section.get(key, default)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{key} must be a string")
        return value

    def flag(key: str, default: bool) -> bool:
        value = section.get(key, default)
        if not isinstance(value, bool):
            raise UsageError(f"{key} must be true or false")
        return value

    realm = text("realm")
    if not realm or not REALM_RE.match(realm):
        raise UsageError(f"realm {realm!r} is not a realm name (realm = \"EXAMPLE.ORG\")")
    kdc_raw = section.get("kdc", [])
    kdc = [kdc_raw] if isinstance(kdc_raw, str) else kdc_raw
    if not isinstance(kdc, list) or not all(isinstance(k, str) and HOST_RE.match(k) for k in kdc):
        raise UsageError("kdc must be a host[:port] or an array of them")
    admin_server = text("admin_server")
    if admin_server is None and kdc:
        admin_server = re.sub(r":[0-9]+$", "", kdc[0])
    if admin_server is not None and not HOST_RE.match(admin_server):
        raise UsageError(f"admin_server {admin_server!r} is not a host[:port]")
    local = flag("kadmin_local", False)
    principal = text("admin_principal")
    keytab = text("admin_keytab")
    password_env = text("admin_password_env")
    password = None
    if local:
        if shutil.which("kadmin.local") is None:
            raise UsageError("kadmin_local = true needs kadmin.local (Debian: krb5-admin-server) on this machine")
    else:
        if shutil.which("kadmin") is None:
            raise UsageError("kadmin is not installed on this machine (Debian: krb5-user)")
        if not principal or not PRINCIPAL_RE.match(principal if "@" in principal else principal + "@" + realm):
            raise UsageError("admin_principal is required (the principal kadmin authenticates as), "
                             "unless kadmin_local = true")
        if (keytab is None) == (password_env is None):
            raise UsageError("give exactly one of admin_keytab (a keytab file) and admin_password_env "
                             "(the name of an environment variable holding the password)")
        if keytab is not None:
            keytab = os.path.expanduser(keytab)
            if not os.access(keytab, os.R_OK):
                raise UsageError(f"admin_keytab {keytab} cannot be read")
        if password_env is not None:
            password = os.environ.get(password_env)
            if not password:
                raise UsageError(f"admin_password_env: the environment variable {password_env} is not set")
        if admin_server is None:
            raise UsageError("admin_server (or kdc) is required to reach kadmind")
    fqdn = text("fqdn") or (ctx.vm if "." in ctx.vm else f"{ctx.vm}.{realm.lower()}")
    if not FQDN_RE.match(fqdn):
        raise UsageError(f"fqdn {fqdn!r} is not a host name")
    services = section.get("services", ["host"])
    if not isinstance(services, list) or not services or not all(isinstance(s, str) and SERVICE_RE.match(s)
                                                                  for s in services):
        raise UsageError("services must be a non-empty array of service names such as \"host\"")
    keytab_path = text("keytab_path", "/etc/krb5.keytab")
    assert keytab_path is not None
    if not keytab_path.startswith("/"):
        raise UsageError("keytab_path must be an absolute path in the VM")
    return Settings(realm=realm, kdc=kdc, admin_server=admin_server,
                    admin_principal=principal, admin_keytab=Path(keytab) if keytab else None, password=password,
                    local=local, fqdn=fqdn.lower(),
                    principals=[f"{s}/{fqdn.lower()}@{realm}" for s in dict.fromkeys(services)],
                    keytab_path=keytab_path, krb5_conf=flag("krb5_conf", True),
                    default_realm=flag("default_realm", True), rotate=flag("rotate", False))


def _agent_config(s: Settings, keytab: bytes | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"principals": s.principals, "keytab_path": s.keytab_path}
    if keytab is not None:
        config["keytab"] = base64.b64encode(keytab).decode()
    if s.krb5_conf:
        config["krb5_conf"] = {"realm": s.realm, "kdc": s.kdc, "admin_server": s.admin_server,
                               "default_realm": s.default_realm, "domain_realm": [s.fqdn]}
    return config


# -- the rounds
def prepare(ctx: ApplyContext, section: dict[str, Any]) -> dict[str, Any]:
    """Round one: only ask which keys the VM holds (principals, no keytab, no krb5.conf)."""
    s = settings(ctx, section)
    return {"principals": s.principals, "keytab_path": s.keytab_path}


def review(ctx: ApplyContext, section: dict[str, Any], result: dict[str, Any], round: int) -> Review:
    s = settings(ctx, section)
    held = _held(result)
    out = Review()
    with Kadmin(s) as kadmin:
        if round == 1:
            stale = []
            for principal in s.principals:
                keys = kadmin.getprinc(principal)
                if keys is None:
                    kadmin.addprinc(principal)
                    out.notes.append(f"created {principal} with a random key")
                    stale.append(principal)
                elif s.rotate or not _holds(held, principal, keys):
                    stale.append(principal)
                else:
                    out.notes.append(f"the VM holds the current key of {principal} (kvno {max(keys)})")
            keytab = kadmin.extract(stale) if stale else None
            if keytab is not None:
                kvnos = sorted({e.kvno for e in parse_keytab(keytab)})
                out.notes.append(f"extracted {', '.join(stale)} (ktadd: new random key, kvno "
                                 f"{', '.join(map(str, kvnos))}); delivered over the pinned channel")
            out.follow_up = _agent_config(s, keytab)
        else:
            missing = [p for p in s.principals if not _holds(held, p, kadmin.getprinc(p) or {})]
            if missing:
                raise OwnerError(f"after delivery the VM does not report the KDC's current key for "
                                 f"{', '.join(missing)}")
            out.data["principals"] = s.principals
    return out


def _held(result: dict[str, Any]) -> set[tuple[str, int, str]]:
    entries = (result.get("data") or {}).get("entries")
    if not isinstance(entries, list):
        raise OwnerError("the agent reported no keytab entries")
    return {(e["principal"], e["kvno"], e["enctype"]) for e in entries
            if isinstance(e, dict) and isinstance(e.get("principal"), str) and isinstance(e.get("kvno"), int)
            and isinstance(e.get("enctype"), str)}


def _holds(held: set[tuple[str, int, str]], principal: str, keys: dict[int, set[str]]) -> bool:
    """The VM holds the KDC's current kvno of ``principal`` in every enctype the KDC has."""
    if not keys:
        return False
    kvno = max(keys)
    return all((principal, kvno, enctype) in held for enctype in keys[kvno])


# -- kadmin
class Kadmin:
    """kadmin (or kadmin.local) with a private configuration and credential cache."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.dir = Path(tempfile.mkdtemp(prefix="imprint-kadmin-"))  # 0700
        self.env = dict(os.environ, LC_ALL="C", LANG="C", KRB5CCNAME="MEMORY:imprint-kadmin")
        if not s.local:
            conf = self.dir / "krb5.conf"
            conf.write_text(owner_krb5_conf(s))
            self.env["KRB5_CONFIG"] = str(conf)

    def __enter__(self) -> Kadmin:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in self.dir.iterdir():
            _scrub(path)
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, query: str) -> subprocess.CompletedProcess[str]:
        s = self.s
        if s.local:
            argv = ["kadmin.local", "-r", s.realm, "-q", query]
        else:
            assert s.admin_principal is not None and s.admin_server is not None
            argv = ["kadmin", "-r", s.realm, "-p", s.admin_principal, "-s", s.admin_server]
            if s.admin_keytab is not None:
                argv += ["-k", "-t", str(s.admin_keytab)]
            argv += ["-q", query]
        try:
            proc = subprocess.run(argv, input=(s.password + "\n") if s.password else "", capture_output=True,
                                  text=True, timeout=KADMIN_TIMEOUT, env=self.env, check=False)
        except subprocess.TimeoutExpired:
            raise OwnerError(f"kadmin did not answer within {KADMIN_TIMEOUT:.0f} s ({query.split()[0]})") from None
        if proc.returncode != 0:
            raise OwnerError(f"kadmin failed (exit {proc.returncode}): {_errors(proc.stderr)}")
        return proc

    def getprinc(self, principal: str) -> dict[int, set[str]] | None:
        """kvno -> enctypes of the principal's keys, or None if it does not exist."""
        proc = self.query(f"getprinc {principal}")
        if "Principal does not exist" in proc.stderr:
            return None
        if not re.search(rf"^Principal: {re.escape(principal)}$", proc.stdout, re.M):
            raise OwnerError(f"kadmin getprinc {principal}: {_errors(proc.stderr)}")
        keys: dict[int, set[str]] = {}
        for kvno, enctype in re.findall(r"^Key: vno (\d+), ([A-Za-z0-9-]+)", proc.stdout, re.M):
            keys.setdefault(int(kvno), set()).add(enctype)
        return keys

    def addprinc(self, principal: str) -> None:
        proc = self.query(f"addprinc -randkey {principal}")
        if self.getprinc(principal) is None:
            raise OwnerError(f"kadmin addprinc {principal}: {_errors(proc.stderr)}")

    def extract(self, principals: list[str]) -> bytes:
        """ktadd (a new random key for each) into a private file; its bytes."""
        path = self.dir / "extract.keytab"
        for principal in principals:
            proc = self.query(f"ktadd -k {path} {principal}")
            if f"Entry for principal {principal} " not in proc.stdout + proc.stderr:
                raise OwnerError(f"kadmin ktadd {principal}: {_errors(proc.stderr)}")
        try:
            data = read_file(path, MAX_KEYTAB) or b""
        except InputError as exc:
            raise OwnerError(f"kadmin ktadd: {exc}") from None
        finally:
            _scrub(path)
        try:
            entries = parse_keytab(data)
        except KeytabError as exc:
            raise OwnerError(f"kadmin ktadd wrote something that is not a keytab: {exc}") from None
        if {e.principal for e in entries} != set(principals):
            raise OwnerError(f"kadmin ktadd extracted {sorted({e.principal for e in entries})}, "
                             f"not {principals}")
        return data


def owner_krb5_conf(s: Settings) -> str:
    lines = ["[libdefaults]", f"    default_realm = {s.realm}", "    dns_canonicalize_hostname = false",
             "    rdns = false"]
    if s.kdc:
        lines.append("    dns_lookup_kdc = false")
    lines += ["[realms]", f"    {s.realm} = {{", *(f"        kdc = {k}" for k in s.kdc)]
    if s.admin_server:
        lines.append(f"        admin_server = {s.admin_server}")
    return "\n".join([*lines, "    }"]) + "\n"


def _errors(stderr: str) -> str:
    """kadmin's error lines, without its chatter."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(
        ("Authenticating as principal", "No policy specified", "Password for "))]
    return " ".join(lines)[-400:] or "no error output"


def _scrub(path: Path) -> None:
    """Overwrite a file that held keys before removing it."""
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
