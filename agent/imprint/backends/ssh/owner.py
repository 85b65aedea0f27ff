"""The owner's half of the ssh backend: the SSH CA, host-key attestation into known_hosts, host
certificates, and `imprint ssh`.

Profile table (see imprint.owner.apply)::

    [ssh]
    users = [{name = "alice", authorized_keys = ["ssh-ed25519 AAAA... alice@x"], sudo = false}]
    host_certificate = true            # sign the VM's host keys with the owner's SSH CA
    host_certificate_validity = "+52w" # ssh-keygen -V; valid from 5 minutes ago (clock skew)
    trusted_user_ca = false            # true: the VM trusts the CA for user certificates;
                                       # false: removes that trust; absent: leaves it as it is
    reload_command = ["systemctl", "try-reload-or-restart", "ssh.service"]   # optional

Host-key attestation: every answer of the ssh backend carries the VM's host public keys (and the
host certificates it has). They arrive over the pinned mutual-TLS channel from the agent, which
runs as root in the VM: the owner writes them to ``<home>/known_hosts/<vm>`` for the SSH address
(``host``, or ``[host]:port`` when the port is not 22), so OpenSSH with
``StrictHostKeyChecking=yes`` connects without trusting on first use.

Rounds: without ``host_certificate`` one round carries the whole config. With it the apply is
two-phase: the first round only collects the host keys (the agent makes them if there are none,
and does not reload sshd); the owner signs each key that has no certificate from this CA for
these principals with more than 30 days (or a third of its validity) left (principals: the VM name, the SSH host and the
agent's host), and the second round carries the whole config with those certificates, so sshd
reloads at most once. The known_hosts file gets a ``@cert-authority`` line for the same address.
Applied again, nothing is signed and nothing changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imprint.backends.schema import ConfigError
from imprint.backends.ssh.schema import HOST_KEY_TYPES, USERS
from imprint.fsatomic import ensure_private_dir, write_atomic
from imprint.owner.apply import ApplyContext, Review
from imprint.owner.errors import OwnerError, UsageError
from imprint.owner.home import OwnerHome
from imprint.owner.store import Store

# In the owner home (imprint.owner.home): the CA, and one known_hosts file per VM.
CA_KEY = "ssh_ca"
CA_PUB = "ssh_ca.pub"
KNOWN_HOSTS = "known_hosts"

SECTION_KEYS = ("users", "host_certificate", "host_certificate_validity", "trusted_user_ca", "reload_command")
RENEW_BEFORE = 30 * 86400
DEFAULT_VALIDITY = "+52w"
_VALIDITY_RE = re.compile(r"^[-+]?[0-9A-Za-z:]{1,40}\Z")


def _ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise UsageError("ssh-keygen is not installed (Debian: openssh-client)")
    return path


def _run(argv: list[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, LC_ALL="C", LANG="C", TZ="UTC0"))
    if proc.returncode != 0:
        raise OwnerError(f"{' '.join(argv[:2])} failed (exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc


def fingerprint(key_line: str) -> str:
    """OpenSSH's SHA256 fingerprint of "type base64 [comment]"."""
    import hashlib

    digest = hashlib.sha256(base64.b64decode(key_line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# -- the CA
def ca_init(home: OwnerHome) -> tuple[str, bool]:
    """Create the owner's SSH CA once (ed25519); returns (public key line, created)."""
    if ca_key_file(home).exists():
        return ca_public(home), False
    home.load_key()  # the owner identity comes first
    keygen = _ssh_keygen()
    tmp = home.temp_dir("ssh-ca-")
    try:
        _run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "imprint-ssh-ca", "-f", str(tmp / "ca")])
        # The public half first: a CA key is never present without it.
        write_atomic(home.backend_file(CA_PUB), (tmp / "ca.pub").read_bytes(), mode=0o644, sync_dir=False)
        write_atomic(ca_key_file(home), (tmp / "ca").read_bytes(), mode=0o600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ca_public(home), True


def ca_key_file(home: OwnerHome) -> Path:
    """The owner's SSH CA (``imprint ca init``): signs VM host keys, optionally trusted for users."""
    return home.backend_file(CA_KEY)


def known_hosts_file(home: OwnerHome, vm: str) -> Path:
    return home.backend_vm_file(KNOWN_HOSTS, vm)


def ca_public(home: OwnerHome) -> str:
    pub = home.backend_file(CA_PUB)
    if not ca_key_file(home).exists() or not pub.exists():
        raise UsageError(f"no SSH CA in {home.dir}: run `imprint ca init` first")
    fields = pub.read_text().split()
    if len(fields) < 2:
        raise UsageError(f"{pub} is not a public key")
    return f"{fields[0]} {fields[1]}"


# -- profile -> rounds
def prepare(ctx: ApplyContext, section: dict[str, Any]) -> dict[str, Any]:
    """The first round. Without host certificates it is the whole config. With them it only
    collects the host keys (and makes them if there are none) without reloading sshd; the whole
    config goes in the second round with the certificates, so sshd reloads once."""
    config = full_config(ctx, section)
    return {"reload_command": []} if section.get("host_certificate") else config


def full_config(ctx: ApplyContext, section: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(SECTION_KEYS)}")
    config: dict[str, Any] = {}
    users = section.get("users", [])
    try:
        USERS.check(users, "users")  # the profile's users are the agent's, checked as it checks them
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if users:
        config["users"] = [dict(user) for user in users]
    for flag in ("host_certificate", "trusted_user_ca"):
        if flag in section and not isinstance(section[flag], bool):
            raise UsageError(f"{flag} must be true or false")
    validity = section.get("host_certificate_validity", DEFAULT_VALIDITY)
    if not isinstance(validity, str) or not _VALIDITY_RE.match(validity):
        raise UsageError(f"host_certificate_validity {validity!r} is not an ssh-keygen -V interval such as +52w")
    if section.get("host_certificate") or section.get("trusted_user_ca"):
        ca_public(ctx.home)
        _ssh_keygen()
    if "trusted_user_ca" in section:
        config["trusted_user_ca_keys"] = [ca_public(ctx.home) + " imprint-ssh-ca"] if section["trusted_user_ca"] else []
    if "reload_command" in section:
        command = section["reload_command"]
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise UsageError("reload_command must be an array of strings")
        config["reload_command"] = command
    return config


# -- the agent's answers
def review(ctx: ApplyContext, section: dict[str, Any], result: dict[str, Any], round: int) -> Review:
    data = result.get("data") or {}
    host_keys = _host_keys(data)
    principals = principals_for(ctx)
    certify = bool(section.get("host_certificate"))
    out = Review()
    ca_fp = fingerprint(ca_public(ctx.home)) if certify else ""
    current = {c.get("key_fingerprint"): c.get("certificate") for c in data.get("host_certificates") or []
               if isinstance(c, dict)}
    if round == 1:
        path, changed = write_known_hosts(ctx, host_keys, with_ca=certify)
        host, port = ssh_target(ctx)
        ctx.store.set_backend_data(ctx.vm, "ssh", {"host": host, "port": port})
        out.notes.append(f"known_hosts {path} {'written' if changed else 'unchanged'}: {len(host_keys)} attested "
                         f"host key(s) for {host_pattern(host, port)}")
        out.data.update(known_hosts=str(path), ssh_host=host, ssh_port=port)
        if not certify:
            return out
        out.follow_up = full_config(ctx, section)
        to_sign = [k for k in host_keys if not _still_good(current.get(fingerprint(k)), ca_fp, principals)]
        if to_sign:
            validity = section.get("host_certificate_validity", DEFAULT_VALIDITY)
            out.follow_up["host_certificates"] = [sign_host_key(ctx.home, ctx.vm, key, principals, validity)
                                                  for key in to_sign]
            out.notes.append(f"signed {len(to_sign)} host certificate(s) for {', '.join(principals)} "
                             f"(validity {validity})")
        else:
            out.notes.append(f"host certificates from this CA for {', '.join(principals)} are current")
    elif certify:
        missing = [fingerprint(k) for k in host_keys if not _still_good(current.get(fingerprint(k)), ca_fp, principals)]
        if missing:
            raise OwnerError(f"the VM reports no current certificate for host key(s) {', '.join(missing)} "
                             "after installing them")
        out.notes.append(f"the VM serves host certificates for all {len(host_keys)} host key(s)")
    return out


def _host_keys(data: dict[str, Any]) -> list[str]:
    """The host keys the agent attested, checked before they go near a known_hosts file."""
    raw = data.get("host_keys")
    if not isinstance(raw, list) or not raw:
        raise OwnerError("the agent reported no SSH host keys")
    keys = []
    for item in raw:
        line = item.get("key") if isinstance(item, dict) else None
        if not isinstance(line, str) or not valid_public_key(line):
            raise OwnerError(f"the agent reported a malformed host key: {str(line)[:80]!r}")
        keys.append(line)
    return keys


def valid_public_key(line: str) -> bool:
    """'type base64' whose base64 decodes to an SSH key blob of that type."""
    fields = line.split(" ")
    if len(fields) != 2 or fields[0] not in HOST_KEY_TYPES:
        return False
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(blob) < 4:
        return False
    (n,) = struct.unpack(">I", blob[:4])
    return blob[4:4 + n] == fields[0].encode()


def principals_for(ctx: ApplyContext) -> list[str]:
    agent_host = ctx.address.rpartition(":")[0].strip("[]")
    out: list[str] = []
    for name in (ctx.vm, ssh_target(ctx)[0], agent_host):
        if name and name not in out:
            out.append(name)
    return out


def saved_target(store: Store, vm: str) -> tuple[str, int] | None:
    """Where `imprint ssh` connects: what the last apply with an [ssh] table recorded."""
    data = store.backend_data(vm, "ssh")
    if data is None or not isinstance(data.get("host"), str) or not isinstance(data.get("port"), int):
        return None
    return data["host"], data["port"]


def resolve_target(store: Store, vm: str, address: str, host: str | None, port: int | None) -> tuple[str, int]:
    """--ssh-host/--ssh-port, else the last ones applied, else the agent address's host and 22."""
    from imprint.owner.names import split_address

    previous = saved_target(store, vm)
    return (host or (previous[0] if previous else split_address(address)[0]),
            port or (previous[1] if previous else 22))


def ssh_target(ctx: ApplyContext) -> tuple[str, int]:
    """The host and port SSH clients use for the VM in this apply (imprint.backends.ssh.cli)."""
    host, port = ctx.options.get("ssh_host"), ctx.options.get("ssh_port")
    if isinstance(host, str) and isinstance(port, int):
        return host, port
    return resolve_target(ctx.store, ctx.vm, ctx.address, None, None)


def host_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def write_known_hosts(ctx: ApplyContext, host_keys: list[str], *, with_ca: bool) -> tuple[Path, bool]:
    pattern = host_pattern(*ssh_target(ctx))
    lines = [f"# imprint: SSH host keys of VM {ctx.vm}, attested by its agent over the pinned channel"]
    lines += [f"{pattern} {key}" for key in host_keys]
    if with_ca:
        lines.append(f"@cert-authority {pattern} {ca_public(ctx.home)} imprint-ssh-ca")
    data = ("\n".join(lines) + "\n").encode()
    path = known_hosts_file(ctx.home, ctx.vm)
    if path.exists() and path.read_bytes() == data:
        return path, False
    ensure_private_dir(path.parent)
    write_atomic(path, data, mode=0o644)
    return path, True


def sign_host_key(home: OwnerHome, vm: str, key: str, principals: list[str], validity: str) -> str:
    keygen = _ssh_keygen()
    interval = validity if ":" in validity else f"-5m:{validity}"
    with tempfile.TemporaryDirectory(prefix="imprint-sign-") as tmp:
        pub = Path(tmp) / "host.pub"
        pub.write_text(key + "\n")
        _run([keygen, "-q", "-s", str(ca_key_file(home)), "-I", f"imprint:{vm}", "-h", "-n", ",".join(principals),
              "-V", interval, "-z", str(int(time.time())), str(pub)])
        fields = (Path(tmp) / "host-cert.pub").read_text().split()
    return f"{fields[0]} {fields[1]}"


@dataclass
class CertInfo:
    host: bool
    key_fingerprint: str
    ca_fingerprint: str
    principals: list[str]
    valid_after: float | None
    valid_before: float | None  # None: forever


def cert_info(line: str) -> CertInfo | None:
    """What ``ssh-keygen -L`` says about a certificate (in UTC), or None if it is not one."""
    try:
        proc = _run([_ssh_keygen(), "-L", "-f", "-"], input=line + "\n")
    except OwnerError:
        return None
    text = proc.stdout
    key = re.search(r"^\s*Public key: \S+-CERT (SHA256:\S+)$", text, re.M)
    ca = re.search(r"^\s*Signing CA: \S+ (SHA256:\S+)", text, re.M)
    valid = re.search(r"^\s*Valid: (.*)$", text, re.M)
    block = re.search(r"^\s*Principals:\s*\n((?:\s{16,}\S+\n)*)", text, re.M)
    if not (key and ca and valid):
        return None
    after = before = None
    span = valid.group(1).strip()
    if span != "forever":
        start = re.search(r"from (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", span)
        end = re.search(r"to (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", span)
        if not end:
            return None
        after = _utc(start.group(1)) if start else None
        before = _utc(end.group(1))
    return CertInfo(host=" host certificate" in text, key_fingerprint=key.group(1), ca_fingerprint=ca.group(1),
                    principals=block.group(1).split() if block else [], valid_after=after, valid_before=before)


def _utc(stamp: str) -> float:
    import calendar

    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")))


def _still_good(cert: Any, ca_fp: str, principals: list[str]) -> bool:
    if not isinstance(cert, str):
        return False
    info = cert_info(cert)
    if info is None or not info.host or info.ca_fingerprint != ca_fp or not set(principals) <= set(info.principals):
        return False
    if info.valid_before is None:
        return True
    # Renewed with 30 days left, or a third of its validity for a short-lived one.
    window = RENEW_BEFORE if info.valid_after is None else min(RENEW_BEFORE, (info.valid_before - info.valid_after) / 3)
    return info.valid_before - time.time() > window


# -- imprint ssh
def ssh_command(home: OwnerHome, store: Store, vm: str, user: str | None, args: list[str]) -> list[str]:
    target = saved_target(store, vm)
    known_hosts = known_hosts_file(home, vm)
    if target is None or not known_hosts.exists():
        raise UsageError(f"no attested SSH host keys for {vm}: apply a profile with an [ssh] table first "
                         f"(`imprint apply {vm} --profile FILE`)")
    ssh = shutil.which("ssh")
    if ssh is None:
        raise UsageError("OpenSSH's ssh is not installed (Debian: openssh-client)")
    if '"' in str(known_hosts):
        raise UsageError(f"{known_hosts}: a path with a double quote cannot be given to ssh")
    host, port = target
    argv = [ssh,
            "-o", "StrictHostKeyChecking=yes",
            "-o", f'UserKnownHostsFile="{known_hosts}"',
            "-o", "GlobalKnownHostsFile=/dev/null",  # only what the agent attested
            "-o", "UpdateHostKeys=no",
            "-o", "CheckHostIP=no",
            "-p", str(port)]
    if user:
        argv += ["-l", user]
    return [*argv, host, *args]


def exec_ssh(argv: list[str]) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    os.execv(argv[0], argv)  # noqa: S606 - replacing this process with OpenSSH is the point


def quoted(argv: list[str]) -> str:
    return shlex.join(argv)
