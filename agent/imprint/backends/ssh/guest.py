"""The ssh backend: users and their authorized_keys, host-key attestation, host certificates,
and trust in the owner's user CA.

Config (every key optional; an absent key leaves that part of the VM as it is)::

    users:                [{name, authorized_keys: [line, ...], sudo: bool, shell: "/bin/bash"}]
    trusted_user_ca_keys: [line, ...]   exactly these keys in TrustedUserCAKeys; [] removes it
    host_certificates:    [line, ...]   install, each must certify one of the VM's host keys
    reload_command:       [argv, ...]   run when sshd's configuration changed; [] never.
                                        Default: on the real root `systemctl try-reload-or-restart
                                        ssh.service` when systemctl exists; under a test root none.

What it does, in this order, after validating all of the above (every key through
``ssh-keygen -l``, every certificate through ``ssh-keygen -L``):

1. Host keys: if the VM has none (``/etc/ssh/ssh_host_*_key``), ``ssh-keygen -A`` makes them.
   Every host public key (derived from the private key with ``ssh-keygen -y``) is reported in
   ``data.host_keys``: this is the attestation, since it travels over the pinned channel.
2. Users: a missing user is created with ``useradd [--root ROOT] --create-home --user-group
   --password '*'`` (``*``: no password can match, but the account is not *locked*, which
   sshd without PAM would refuse even for keys). Under a root that has no ``etc/passwd`` the
   backend refuses rather than invent a user database. ``~/.ssh`` is made 0700 and
   ``authorized_keys`` 0600, both owned by the user; keys are merged into what is there
   (existing lines are kept as they are; a key already present, by fingerprint, is not added
   again). ``sudo = true`` writes ``/etc/sudoers.d/imprint-<user>`` (0440); ``false`` removes it.
3. ``/etc/ssh/imprint_user_ca.pub`` (TrustedUserCAKeys) and host certificates
   (``/etc/ssh/ssh_host_<type>_key-cert.pub``, 0644), then, when the config names either (or
   host keys were just generated), ``/etc/ssh/sshd_config.d/imprint.conf`` with a
   ``HostCertificate`` line for each certificate that matches a present host key and a
   ``TrustedUserCAKeys`` line if that file exists. The paths inside it are guest paths.
4. If any of those changed, or host keys were generated, the reload command.

So ``{}`` only reports the host keys (making them if there are none): the owner's first round
when it is going to sign them, which leaves all reloading to the one round that installs.

Results (``data``): ``host_keys`` [{type, key, fingerprint, path}], ``host_certificates``
[{path, certificate, key_fingerprint}] (the installed ones, so the owner can tell whether to
renew), ``users`` [{name, uid, created, keys_added, sudo}], ``sshd_reloaded``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from imprint.backends import BackendContext, BackendError, BackendResult
from imprint.backends.ssh.schema import HOST_KEY_TYPES

SNIPPET_NAME = "imprint.conf"  # in sshd_config.d
MAX_LINE = 16384
MAX_AUTHORIZED_KEYS = 1 << 20  # a user's authorized_keys: thousands of keys; a local user's sparse 4 GiB is refused
MAX_USER_DB = 16 << 20         # /etc/passwd under a root
_FINGERPRINT_RE = re.compile(r"^\d+ (SHA256:[A-Za-z0-9+/]+) ")


@dataclass
class UserSpec:
    name: str
    keys: list[tuple[str, str]]  # (line, fingerprint), in order, without duplicates
    sudo: bool | None
    shell: str | None


@dataclass
class HostKey:
    path: str  # guest path of the private key
    type: str
    key: str   # "type base64"
    fingerprint: str


@dataclass
class Certificate:
    line: str
    key_fingerprint: str


def apply(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    """``config`` fits imprint.backends.ssh.schema (the framework checked it)."""
    _require_ssh_keygen(ctx)
    users = _parse_users(ctx, config)
    user_ca: list[str] | None = config.get("trusted_user_ca_keys")
    user_ca_lines = [_one_line(line, f"ssh.trusted_user_ca_keys[{i}]") for i, line in enumerate(user_ca or [])]
    for i, line in enumerate(user_ca_lines):
        _fingerprint(ctx, line, f"ssh.trusted_user_ca_keys[{i}]")
    cert_lines: list[str] | None = config.get("host_certificates")
    certs = [_parse_certificate(ctx, _one_line(line, f"ssh.host_certificates[{i}]"), f"ssh.host_certificates[{i}]")
             for i, line in enumerate(cert_lines or [])]
    reload_command: list[str] | None = config.get("reload_command")

    host_keys, generated = _ensure_host_keys(ctx)
    by_fingerprint = {k.fingerprint: k for k in host_keys}
    for i, cert in enumerate(certs):
        if cert.key_fingerprint not in by_fingerprint:
            raise BackendError(f"ssh.host_certificates[{i}] certifies key {cert.key_fingerprint}, which is not one "
                               f"of this VM's host keys ({', '.join(sorted(by_fingerprint)) or 'none'})")

    # Everything is valid: act.
    user_reports = [_apply_user(ctx, user) for user in users]

    sshd_changed = generated  # new host keys: sshd has to load them
    if user_ca is not None:
        path = ctx.paths.ssh_user_ca
        if user_ca_lines:
            sshd_changed |= ctx.write_file(path, ("\n".join(user_ca_lines) + "\n").encode(), mode=0o644, uid=0, gid=0)
        else:
            sshd_changed |= ctx.remove_file(path)
    for cert in certs:
        key = by_fingerprint[cert.key_fingerprint]
        sshd_changed |= ctx.write_file(ctx.path(key.path + "-cert.pub"), (cert.line + "\n").encode(),
                                       mode=0o644, uid=0, gid=0)
    installed = _installed_certificates(ctx, host_keys)
    if generated or user_ca is not None or cert_lines is not None:
        # Only when asked about certificates or the user CA: {} only reports (the owner's first
        # round when it signs host keys), so it cannot leave a change without a reload.
        sshd_changed |= _write_snippet(ctx, installed)
    reloaded = _reload(ctx, reload_command) if sshd_changed else False

    parts = []
    created = [u["name"] for u in user_reports if u["created"]]
    if created:
        parts.append(f"created user(s) {', '.join(created)}")
    added = sum(u["keys_added"] for u in user_reports)
    if users:
        parts.append(f"{added} key(s) added for {len(users)} user(s)")
    parts.append(f"{len(host_keys)} host key(s) attested")
    if installed:
        parts.append(f"{len(installed)} host certificate(s) installed")
    if user_ca is not None:
        parts.append("user CA trusted" if user_ca_lines else "no user CA")
    if reloaded:
        parts.append("sshd reloaded")
    return ctx.result(
        "; ".join(parts),
        host_keys=[{"type": k.type, "key": k.key, "fingerprint": k.fingerprint, "path": k.path} for k in host_keys],
        host_certificates=[{"path": k.path + "-cert.pub", "certificate": c.line, "key_fingerprint": k.fingerprint}
                           for k, c in installed],
        users=user_reports,
        sshd_reloaded=reloaded,
    )


# -- validation
def _require_ssh_keygen(ctx: BackendContext) -> None:
    if shutil.which(ctx.paths.programs.ssh_keygen) is None:
        raise BackendError(f"{ctx.paths.programs.ssh_keygen} is not installed in the VM (Debian: openssh-client)")


def _one_line(line: str, where: str) -> str:
    text = line.strip()
    if not text:
        raise BackendError(f"{where} is empty")
    if any(c in text for c in "\r\n\0"):
        raise BackendError(f"{where} must be one line (it contains a line break or NUL)")
    if len(text) > MAX_LINE:
        raise BackendError(f"{where} is {len(text)} characters long; at most {MAX_LINE}")
    return text


def _quote(line: str) -> str:
    return repr(line if len(line) <= 60 else line[:57] + "...")


def _fingerprint(ctx: BackendContext, line: str, where: str) -> str:
    """``ssh-keygen -l`` on one authorized_keys-format line: its SHA256 fingerprint, or a
    BackendError naming the line."""
    proc = ctx.run([ctx.paths.programs.ssh_keygen, "-l", "-f", "-"], input=line + "\n", check=False)
    match = _FINGERPRINT_RE.match(proc.stdout)
    if proc.returncode != 0 or not match:
        raise BackendError(f"{where} is not a valid public key: {_quote(line)} (ssh-keygen: "
                           f"{(proc.stderr.strip() or 'not a public key').splitlines()[-1].replace('(stdin) ', '')})")
    return match.group(1)


def _fingerprints_in(ctx: BackendContext, text: str) -> set[str]:
    """Fingerprints of every key ssh-keygen recognises in an authorized_keys file (it skips the
    lines it cannot parse; those stay in the file untouched)."""
    if not text.strip():
        return set()
    proc = ctx.run([ctx.paths.programs.ssh_keygen, "-l", "-f", "-"], input=text, check=False)
    return {m.group(1) for line in proc.stdout.splitlines() if (m := _FINGERPRINT_RE.match(line))}


def _parse_users(ctx: BackendContext, config: dict[str, Any]) -> list[UserSpec]:
    """What the schema cannot say: each name once, each key one valid line, the shell a path."""
    users: list[UserSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(config.get("users") or []):
        name: str = entry["name"]
        if name in seen:
            raise BackendError(f"ssh.users[{i}]: user '{name}' is listed twice")
        seen.add(name)
        where = f"ssh.users[{i}] ({name})"
        keys: list[tuple[str, str]] = []
        fingerprints: set[str] = set()
        for j, line in enumerate(entry.get("authorized_keys") or []):
            text = _one_line(line, f"{where}.authorized_keys[{j}]")
            fp = _fingerprint(ctx, text, f"{where}.authorized_keys[{j}]")
            if fp not in fingerprints:
                fingerprints.add(fp)
                keys.append((text, fp))
        sudo: bool | None = entry.get("sudo")
        shell: str | None = entry.get("shell")
        if shell is not None and (not shell.startswith("/") or any(c == ":" or c.isspace() or not c.isprintable()
                                                                  for c in shell)):
            raise BackendError(f"{where}.shell {shell!r} is not an absolute path")
        users.append(UserSpec(name=name, keys=keys, sudo=sudo, shell=shell))
    return users


def _parse_certificate(ctx: BackendContext, line: str, where: str) -> Certificate:
    proc = ctx.run([ctx.paths.programs.ssh_keygen, "-L", "-f", "-"], input=line + "\n", check=False)
    if proc.returncode != 0:
        raise BackendError(f"{where} is not an OpenSSH certificate: {_quote(line)}")
    if not re.search(r"^\s*Type: \S+ host certificate$", proc.stdout, re.M):
        raise BackendError(f"{where} is not a host certificate")
    match = re.search(r"^\s*Public key: \S+-CERT (SHA256:[A-Za-z0-9+/]+)$", proc.stdout, re.M)
    if not match:
        raise BackendError(f"{where}: ssh-keygen -L shows no certified key")
    return Certificate(line=line, key_fingerprint=match.group(1))


# -- host keys
def _ensure_host_keys(ctx: BackendContext) -> tuple[list[HostKey], bool]:
    ssh_dir = ctx.paths.ssh_dir
    generated = not _host_key_files(ctx)
    if generated:
        ctx.ensure_dir(ssh_dir, mode=0o755, uid=0, gid=0, fix_existing=False, parents=True)
        keygen = ctx.paths.programs.ssh_keygen
        argv = [keygen, "-A"] if ctx.paths.is_real_root else [keygen, "-A", "-f", str(ctx.paths.root)]
        ctx.run(argv)
        ctx.note_change("generated host keys with ssh-keygen -A")
    keys = []
    for guest_path in _host_key_files(ctx):
        proc = ctx.run([ctx.paths.programs.ssh_keygen, "-y", "-f", str(ctx.path(guest_path))])
        fields = proc.stdout.split()
        if len(fields) < 2 or fields[0] not in HOST_KEY_TYPES:
            raise BackendError(f"{guest_path}: ssh-keygen -y gave no usable public key")
        keys.append(HostKey(path=guest_path, type=fields[0], key=f"{fields[0]} {fields[1]}",
                            fingerprint=blob_fingerprint(fields[1])))
    if not keys:
        raise BackendError(f"no host keys in {ssh_dir} even after ssh-keygen -A")
    return keys, generated


def _host_key_files(ctx: BackendContext) -> list[str]:
    """Guest paths of the host private keys."""
    ssh_dir = ctx.paths.ssh_dir
    if not ssh_dir.is_dir():
        return []
    # Regular files only (lstat): ssh-keygen -y follows a link, and under --root one could lead out of it.
    return sorted(ctx.paths.guest(ssh_dir / name) for name in os.listdir(ssh_dir)
                  if re.fullmatch(r"ssh_host_[a-z0-9]+_key", name) and (ssh_dir / name).is_file()
                  and not (ssh_dir / name).is_symlink())


def blob_fingerprint(blob_b64: str) -> str:
    """OpenSSH's SHA256 fingerprint of a base64 key blob."""
    digest = hashlib.sha256(base64.b64decode(blob_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _installed_certificates(ctx: BackendContext, host_keys: list[HostKey]) -> list[tuple[HostKey, Certificate]]:
    """The host certificates on disk that certify one of the present host keys."""
    found = []
    for key in host_keys:
        data = ctx.read_file(ctx.path(key.path + "-cert.pub"))
        if data is None:
            continue
        try:
            cert = _parse_certificate(ctx, data.decode().strip(), key.path + "-cert.pub")
        except (BackendError, UnicodeDecodeError) as exc:
            ctx.warn(f"ignoring {key.path}-cert.pub: {exc}")
            continue
        if cert.key_fingerprint == key.fingerprint:
            found.append((key, cert))
        else:
            ctx.warn(f"ignoring {key.path}-cert.pub: it certifies another key than {key.path}")
    return found


def _write_snippet(ctx: BackendContext, installed: list[tuple[HostKey, Certificate]]) -> bool:
    lines = [f"HostCertificate {key.path}-cert.pub" for key, _ in installed]
    if ctx.paths.ssh_user_ca.exists():
        lines.append(f"TrustedUserCAKeys {ctx.paths.guest(ctx.paths.ssh_user_ca)}")
    path = ctx.paths.sshd_config_dir / SNIPPET_NAME
    if not lines:
        return ctx.remove_file(path)
    main = ctx.paths.ssh_dir / "sshd_config"
    main_config = ctx.read_file(main)
    if main_config is not None and not re.search(rb"^\s*Include\s+\S*sshd_config\.d/", main_config, re.M | re.I):
        ctx.warn(f"{ctx.paths.guest(main)} does not Include sshd_config.d/*.conf: sshd will not read "
                 f"{ctx.paths.guest(path)}")
    ctx.ensure_dir(path.parent, mode=0o755, uid=0, gid=0, fix_existing=False, parents=True)
    text = "# Written by imprint's ssh backend on every apply; edits here are replaced.\n" + "\n".join(lines) + "\n"
    return ctx.write_file(path, text.encode(), mode=0o644, uid=0, gid=0)


def _reload(ctx: BackendContext, command: list[str] | None) -> bool:
    if command is None:
        systemctl = ctx.paths.programs.systemctl
        if not ctx.paths.is_real_root or shutil.which(systemctl) is None:
            ctx.warn("sshd's configuration changed; no reload command (not the real root, or no systemctl): "
                     "restart sshd to use it")
            return False
        command = [systemctl, "try-reload-or-restart", "ssh.service"]
    if not command:
        return False
    proc = ctx.run(command, check=False, timeout=60)
    if proc.returncode != 0:
        ctx.warn(f"reloading sshd with {' '.join(command)} failed (exit {proc.returncode}): "
                 f"{proc.stderr.strip()[:300]}")
        return False
    return True


# -- users
@dataclass
class _Account:
    uid: int
    gid: int
    home: str  # guest path


def _lookup(ctx: BackendContext, name: str) -> _Account | None:
    if ctx.paths.is_real_root:
        import pwd

        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return _Account(entry.pw_uid, entry.pw_gid, entry.pw_dir)
    data = ctx.read_file(ctx.paths.passwd, limit=MAX_USER_DB)
    if data is None:
        raise BackendError(f"{ctx.paths.passwd} does not exist: this root has no user database to add "
                           f"'{name}' to (seed etc/passwd, etc/group, etc/shadow, etc/gshadow)")
    for line in data.decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[0] == name:
            try:
                return _Account(int(fields[2]), int(fields[3]), fields[5])
            except ValueError:
                raise BackendError(f"{ctx.paths.passwd}: the entry of '{name}' is malformed") from None
    return None


def _create_user(ctx: BackendContext, user: UserSpec) -> None:
    shell = user.shell or ("/bin/bash" if ctx.path("/bin/bash").exists() else "/bin/sh")
    argv = [ctx.paths.programs.useradd]
    if not ctx.paths.is_real_root:
        argv += ["--root", str(ctx.paths.root.resolve())]
    argv += ["--create-home", "--user-group", "--shell", shell, "--password", "*", "--comment", "imprint", user.name]
    ctx.run(argv)
    ctx.note_change(f"created user {user.name}")


def _apply_user(ctx: BackendContext, user: UserSpec) -> dict[str, Any]:
    account = _lookup(ctx, user.name)
    created = account is None
    if account is None:
        _create_user(ctx, user)
        account = _lookup(ctx, user.name)
        if account is None:
            raise BackendError(f"useradd succeeded but '{user.name}' is not in the user database")
    if not account.home.startswith("/") or account.home.strip("/") == "":
        raise BackendError(f"user '{user.name}' has home {account.home[:80]!r}; refusing to write keys there")
    try:
        home = ctx.path(account.home)
    except BackendError as exc:
        raise BackendError(f"user '{user.name}' has a home this backend does not write to: {exc}") from None
    ctx.ensure_dir(home, mode=0o700, uid=account.uid, gid=account.gid, fix_existing=False, parents=True)
    ssh_dir = home / ".ssh"
    ctx.ensure_dir(ssh_dir, mode=0o700, uid=account.uid, gid=account.gid)
    added = 0
    if user.keys:
        path = ssh_dir / "authorized_keys"
        old = (ctx.read_file(path, limit=MAX_AUTHORIZED_KEYS) or b"").decode(errors="surrogateescape")
        present = _fingerprints_in(ctx, old)
        new_lines = []
        for line, fp in user.keys:
            if fp not in present:
                new_lines.append(line)
                present.add(fp)
        text = old
        if new_lines:
            if text and not text.endswith("\n"):
                text += "\n"
            text += "".join(line + "\n" for line in new_lines)
        added = len(new_lines)
        ctx.write_file(path, text.encode(errors="surrogateescape"), mode=0o600, uid=account.uid, gid=account.gid)
    if user.sudo is not None:
        _apply_sudo(ctx, user.name, user.sudo)
    return {"name": user.name, "uid": account.uid, "created": created, "keys_added": added,
            "keys_wanted": len(user.keys), "sudo": user.sudo}


def _apply_sudo(ctx: BackendContext, name: str, sudo: bool) -> None:
    path = ctx.paths.sudoers_dir / f"imprint-{name}"
    if not sudo:
        ctx.remove_file(path)
        return
    ctx.ensure_dir(ctx.paths.sudoers_dir, mode=0o750, uid=0, gid=0, fix_existing=False, parents=True)
    if not (ctx.path("/usr/bin/sudo").exists() or ctx.path("/bin/sudo").exists()):
        ctx.warn(f"sudo is not installed: {ctx.paths.guest(path)} has no effect until it is")
    ctx.write_file(path, f"# Written by imprint's ssh backend.\n{name} ALL=(ALL:ALL) NOPASSWD: ALL\n".encode(),
                   mode=0o440, uid=0, gid=0)
