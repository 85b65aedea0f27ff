"""What a cloud-config document from the owner may do: an allowlist of cloud-init modules and of
the keys (and sub-keys) each may be given, checked before cloud-init sees the document.

Why a policy at all, when the owner is trusted to configure its own VM: because the backend's
promise is narrower than cloud-init's. At boot cloud-init runs a document through every stage,
some modules on every boot, some reboot the machine, some fetch and run code from elsewhere. The
cloudinit backend instead applies **one document, once, now, predictably**, on a running VM that
imprint itself depends on. So a document may configure the VM — files, users and groups, host
name, time zone, locale, CA certificates, packages, NTP, passwords — and may not:

* **run code of its own**, now or at a later boot: ``bootcmd`` (every boot), ``runcmd`` and the
  ``scripts_*`` stages, configuration-management agents (puppet, chef, salt, ansible, ...);
  files that make cloud-init run code at the next boot (``/etc/cloud``, ``/var/lib/cloud``) are
  refused paths, as is what a package manager would run as an option (a package name starting
  with ``-``);
* **reboot or power off** the VM: ``power_state``, ``package_reboot_if_required: true``, and the
  whole-system upgrade ``package_upgrade: true`` (it restarts services, imprint's agent and sshd
  among them, while the apply runs);
* **touch imprint's own state and trust anchors**: the agent's state and the owner it is bound
  to (``/var/lib/imprint``, ``/etc/imprint``), its unit and its code, and the files other
  backends own and attest — sshd's host keys and configuration (``/etc/ssh``, ``~/.ssh`` of
  anyone; the ``[ssh]`` backend's job, and ``users[].ssh_authorized_keys``), the keytab, the X.509
  key and certificates, the sudoers grants of the ``[ssh]`` backend; nor ``/proc``, ``/sys``,
  ``/dev``, ``/boot``;
* **bring in trust from a third party** over the network: ``ssh_import_id`` (keys from
  Launchpad/GitHub), ``snap``, ``landscape``, ``phone_home`` ...;
* **print a secret to the console**: ``RANDOM`` passwords (cloud-init writes them there, where
  the site reads).

The allowlist is of keys, not modules: a key that is not listed is refused, whatever module
would act on it (a denylist would let every module cloud-init adds next release through). Each
refusal names the field (``cloudinit.document.write_files[2].path``) and why. What the paths
*resolve* to on the VM (links, a user's directory) is checked just before cloud-init runs, by
:func:`check_paths`, since cloud-init follows links where it writes: the ``write_files`` paths,
the users' homes, and the ``~/.ssh/authorized_keys`` it writes for ``users[].ssh_authorized_keys``.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
import zlib
from collections.abc import Callable
from typing import Any

from imprint.backends import HOST_NAME_RE, USER_NAME_RE, BackendError
from imprint.backends.rootfs import FileRefused, GuestRoot
from imprint.guest.distro import BackendFiles

MAX_DECODED = 64 << 20  # a write_files entry after gzip: a 1 MiB document must not unpack to gigabytes
USER_RE = USER_NAME_RE
HOST_LABELS_RE = HOST_NAME_RE
TIMEZONE_RE = re.compile(r"^[A-Za-z0-9_+-]{1,64}(/[A-Za-z0-9_+-]{1,64}){0,3}\Z")
LOCALE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}\Z")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}\Z")  # Debian policy 5.6.1
VERSION_RE = re.compile(r"^[A-Za-z0-9.+~:-]{1,128}\Z")
OWNER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?\Z")
PERMISSIONS_RE = re.compile(r"^(0o?)?[0-7]{3,4}\Z")
NTP_CLIENT_RE = re.compile(r"^[a-z0-9-]{1,32}\Z")

# Top-level key -> the cloud-init modules it is for (run in cloud.cfg's order).
MODULES: dict[str, tuple[str, ...]] = {
    "write_files": ("write_files", "write_files_deferred"),
    "users": ("users_groups",), "groups": ("users_groups",), "user": ("users_groups",),
    "hostname": ("set_hostname",), "fqdn": ("set_hostname",),
    "prefer_fqdn_over_hostname": ("set_hostname",), "preserve_hostname": ("set_hostname",),
    "manage_etc_hosts": ("update_etc_hosts",),
    "timezone": ("timezone",),
    "locale": ("locale",),
    "ca_certs": ("ca_certs",),
    "packages": ("package_update_upgrade_install",), "package_update": ("package_update_upgrade_install",),
    "package_upgrade": ("package_update_upgrade_install",),
    "package_reboot_if_required": ("package_update_upgrade_install",),
    "chpasswd": ("set_passwords",), "password": ("set_passwords",),
    "ntp": ("ntp",),
}
ALLOWED_MODULES = sorted({m for mods in MODULES.values() for m in mods})

# Why well-known keys are not on the list (any other key gets the generic reason).
_CODE = "runs commands of the document's own"
REFUSED_KEYS: dict[str, str] = {
    "bootcmd": f"{_CODE}, and cloud-init runs it again at every boot",
    "runcmd": f"{_CODE} (cloud-init only writes a script for the boot stage scripts-user, which has passed)",
    "power_state": "it would shut down or reboot the VM under the agent",
    "ssh_keys": "sshd's host keys are the [ssh] backend's (it attests them)",
    "ssh_deletekeys": "cc_ssh deletes and regenerates the host keys the [ssh] backend attested",
    "ssh_genkeytypes": "sshd's host keys are the [ssh] backend's (it attests them)",
    "ssh_authorized_keys": "authorized keys go with a user (users[].ssh_authorized_keys) or the [ssh] backend",
    "disable_root": "sshd's configuration is the [ssh] backend's",
    "disable_root_opts": "sshd's configuration is the [ssh] backend's",
    "allow_public_ssh_keys": "sshd's configuration is the [ssh] backend's",
    "ssh_publish_hostkeys": "sshd's host keys are the [ssh] backend's",
    "ssh_quiet_keygen": "sshd's host keys are the [ssh] backend's",
    "ssh_pwauth": "sshd's configuration is the [ssh] backend's",
    "ssh_import_id": "it fetches keys from a third party over the network",
    "apt_update": "deprecated: use package_update", "apt_upgrade": "deprecated (and refused: see package_upgrade)",
    "apt_reboot_if_required": "it may reboot the VM", "ca-certs": "deprecated: use ca_certs",
    "locale_configfile": "it names a file to write; use write_files",
    "merge_how": "the document is applied alone, merged over nothing but cloud.cfg",
    "merge_type": "the document is applied alone, merged over nothing but cloud.cfg",
}

# Guest paths a document may not write (nor be a user's home), as (prefix, why).
_SYSTEMD_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                 "/lib/systemd/system", "/usr/lib/systemd/system")
_FILES = BackendFiles()  # the distribution's defaults (imprint.guest.distro)
PROTECTED: tuple[tuple[str, str], ...] = (
    ("/var/lib/imprint", "imprint's state: the agent's key and the owner it is bound to"),
    ("/etc/imprint", "imprint's configuration"),
    (_FILES.cloud_config_work, "this backend's scratch directory"),
    ("/run/credentials", "systemd's credentials (a boot channel of imprint)"),
    ("/usr/local/bin/imprint", "imprint's programs"), ("/usr/local/bin/imprint-agent", "imprint's programs"),
    ("/usr/local/bin/imprint-site", "imprint's programs"),
    ("/etc/ssh", "sshd's host keys and configuration are the [ssh] backend's"),
    ("/etc/cloud", "cloud-init's configuration: it would run again at the next boot"),
    ("/var/lib/cloud", "cloud-init's state and scripts: it would run them at the next boot"),
    ("/run/cloud-init", "cloud-init's run-time state"),
    ("/proc", "the kernel's interface"), ("/sys", "the kernel's interface"), ("/dev", "devices"),
    ("/boot", "the boot loader and kernel"),
    *((path, "a file another imprint backend installs and reports") for path in _FILES.installed),
)


def where(*parts: str | int) -> str:
    out = "cloudinit.document"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _fail(field: str, why: str) -> BackendError:
    return BackendError(f"{field} {why}")


def _text(value: Any, field: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, not {type(value).__name__}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _fail(field, f"{value[:80]!r} contains a control character")
    if pattern is not None and not pattern.match(value):
        raise _fail(field, f"{value[:80]!r} is not {what}")
    return value


def _matches(value: Any, field: str, pattern: re.Pattern[str], what: str) -> None:
    _text(value, field, pattern, what)


def _false_only(value: Any, field: str, why: str) -> None:
    if value is not False:
        raise _fail(field, f"may only be false: {why}")


def _keys(item: dict[str, Any], allowed: set[str], field: str, refused: dict[str, str] | None = None) -> None:
    for key in item:
        if key not in allowed:
            reason = (refused or {}).get(key) or \
                f"is not in this backend's allowlist (allowed: {', '.join(sorted(allowed))})"
            raise _fail(f"{field}.{key}", reason if reason.startswith("is ") else f"is refused: {reason}")


# -- the document
def check(document: dict[str, Any]) -> list[str]:
    """The modules the document is for; a BackendError naming the first field it may not have."""
    modules: list[str] = []
    for key, value in document.items():
        if not isinstance(key, str) or key not in MODULES:
            field = where(str(key)[:80])
            reason = REFUSED_KEYS.get(key) if isinstance(key, str) else None
            if reason is None:
                raise _fail(field, f"is not in this backend's allowlist of cloud-config keys "
                                   f"({', '.join(sorted(MODULES))}); see docs/backends.md")
            raise _fail(field, f"is refused: {reason}")
        CHECKS[key](value, where(key))
        modules += [m for m in MODULES[key] if m not in modules]
    return modules


def _write_files(value: Any, field: str) -> None:
    if not isinstance(value, list):
        raise _fail(field, "must be a list")
    for i, item in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise _fail(f, "must be an object")
        _keys(item, {"path", "content", "owner", "permissions", "encoding", "append", "defer"}, f)
        check_path(item.get("path"), f"{f}.path")
        if "owner" in item:
            _text(item["owner"], f"{f}.owner", OWNER_RE, "user[:group]")
        if "permissions" in item:
            _text(item["permissions"], f"{f}.permissions", PERMISSIONS_RE, "an octal mode such as '0640'")
        content = item.get("content", "")
        if not isinstance(content, str | bytes):
            raise _fail(f"{f}.content", "must be a string")
        encoding = item.get("encoding", "text/plain")
        if isinstance(content, str) and encoding in ("gz", "gzip", "gz+base64", "gzip+base64", "gz+b64", "gzip+b64"):
            _bounded_gunzip(content, encoding, f"{f}.content")


def _bounded_gunzip(content: str, encoding: str, field: str) -> None:
    try:
        raw = base64.b64decode(content) if "+" in encoding else content.encode("latin-1")
        inflater = zlib.decompressobj(wbits=47)  # gzip or zlib header
        inflater.decompress(raw, MAX_DECODED)
    except (binascii.Error, ValueError, zlib.error) as exc:
        raise _fail(field, f"does not decode as {encoding}: {exc}") from None
    if inflater.unconsumed_tail:
        raise _fail(field, f"unpacks to more than {MAX_DECODED} bytes")


def check_path(value: Any, field: str) -> str:
    """A guest path a document may write: absolute, plain, and not a protected one."""
    path = _text(value, field)
    if not path.startswith("/"):
        raise _fail(field, f"{path[:80]!r} is not an absolute path")
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise _fail(field, f"{path[:80]!r} is not a plain path (an empty, '.' or '..' component)")
    why = protected(path)
    if why is not None:
        raise _fail(field, f"{path[:80]!r} is refused: {why}")
    return path


def protected(path: str) -> str | None:
    """Why the (normalized, absolute) guest path ``path`` is imprint's or off limits; None if it is not."""
    norm = posixpath.normpath(path)
    for prefix, why in PROTECTED:
        if norm == prefix or norm.startswith(prefix + "/"):
            return f"{prefix} is {why}" if not why.startswith("a ") else f"it is {why}"
    parts = norm.split("/")
    if ".ssh" in parts:
        return "~/.ssh is sshd's trust: keys go with a user (users[].ssh_authorized_keys) or the [ssh] backend"
    for unit_dir in _SYSTEMD_DIRS:
        if norm.startswith(unit_dir + "/") and "imprint-agent.service" in norm[len(unit_dir):]:
            return "imprint's agent unit"
    if norm.startswith("/etc/sudoers.d/imprint-"):
        return "the [ssh] backend's sudo grants"
    for i, part in enumerate(parts[:-1]):
        if part in ("dist-packages", "site-packages") and (parts[i + 1] == "imprint"
                                                           or parts[i + 1].startswith("vm_imprint")):
            return "imprint's code"
    return None


def _user_item(item: Any, field: str) -> None:
    if isinstance(item, str):
        if item != "default":
            _text(item, field, USER_RE, "a user name")
        return
    if not isinstance(item, dict):
        raise _fail(field, "must be a user name or an object (a list of names: one item each)")
    _keys(item, {"name", "gecos", "groups", "homedir", "primary_group", "no_user_group", "no_create_home",
                 "lock_passwd", "passwd", "hashed_passwd", "plain_text_passwd", "shell", "sudo",
                 "ssh_authorized_keys", "system", "uid", "expiredate", "inactive", "create_groups", "no_log_init"},
          field, {"ssh_import_id": REFUSED_KEYS["ssh_import_id"],
                  "ssh_redirect_user": "it needs cc_ssh, whose host keys are the [ssh] backend's",
                  "snapuser": "it logs in to the snap store over the network", "lock-passwd": "use lock_passwd",
                  "selinux_user": "not on Debian"})
    if "name" in item:
        _text(item["name"], f"{field}.name", USER_RE, "a user name")
    for key in ("primary_group",):
        if key in item:
            _text(item[key], f"{field}.{key}", USER_RE, "a group name")
    if "groups" in item:
        _names(item["groups"], f"{field}.groups")
    if "gecos" in item:
        _text(item["gecos"], f"{field}.gecos", re.compile(r"^[^:]*\Z"), "a comment without ':'")
    if "shell" in item:
        _text(item["shell"], f"{field}.shell", re.compile(r"^/[^:\s]*\Z"), "an absolute path")
    if "homedir" in item:
        check_path(item["homedir"], f"{field}.homedir")
    sudo = item.get("sudo")
    for i, rule in enumerate(sudo if isinstance(sudo, list) else [sudo] if isinstance(sudo, str) else []):
        _text(rule, f"{field}.sudo" + (f"[{i}]" if isinstance(sudo, list) else ""))
    for key in ("ssh_authorized_keys",):
        for i, line in enumerate(item.get(key) or []):
            _text(line, f"{field}.{key}[{i}]")


def _names(value: Any, field: str) -> None:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list):
        raise _fail(field, "must be a list of group names")
    for i, name in enumerate(names):
        _text(name.strip() if isinstance(name, str) else name, f"{field}[{i}]", USER_RE, "a group name")


def _users(value: Any, field: str) -> None:
    if not isinstance(value, list):
        raise _fail(field, "must be a list (of names or objects)")
    for i, item in enumerate(value):
        _user_item(item, f"{field}[{i}]")


def _groups(value: Any, field: str) -> None:
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        f = f"{field}[{i}]" if isinstance(value, list) else field
        if isinstance(item, dict):
            for name, members in item.items():
                _text(name, f, USER_RE, "a group name")
                _names(members if isinstance(members, list | str) else [members], f"{f}.{name}")
        else:
            _names(item, f)


def _host(value: Any, field: str) -> None:
    _text(value, field, HOST_LABELS_RE, "a host name")


def _bool(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise _fail(field, "must be true or false")


def _manage_etc_hosts(value: Any, field: str) -> None:
    if value not in (True, False, "localhost", "template"):
        raise _fail(field, "must be true, false, 'localhost' or 'template'")


def _ca_certs(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise _fail(field, "must be an object")
    _keys(value, {"trusted", "remove_defaults"}, field, {"remove-defaults": "use remove_defaults"})
    for i, pem in enumerate(value.get("trusted") or []):
        if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
            raise _fail(f"{field}.trusted[{i}]", "must be a PEM certificate")


def _packages(value: Any, field: str) -> None:
    if not isinstance(value, list):
        raise _fail(field, "must be a list")
    for i, item in enumerate(value):
        f = f"{field}[{i}]"
        if isinstance(item, list):
            if len(item) != 2:
                raise _fail(f, "must be a name or [name, version]")
            _text(item[0], f"{f}[0]", PACKAGE_RE, "a package name")
            _text(item[1], f"{f}[1]", VERSION_RE, "a package version")
        else:
            _text(item, f, PACKAGE_RE, "a package name")


def _chpasswd(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise _fail(field, "must be an object")
    _keys(value, {"users", "expire"}, field, {"list": "deprecated: use chpasswd.users"})
    for i, entry in enumerate(value.get("users") or []):
        f = f"{field}.users[{i}]"
        if not isinstance(entry, dict):
            raise _fail(f, "must be an object")
        _text(entry.get("name"), f"{f}.name", USER_RE, "a user name")
        if entry.get("type") == "RANDOM" or entry.get("password") in ("R", "RANDOM"):
            raise _fail(f, "is refused: cloud-init prints a RANDOM password on the console, where the site reads it")


def _password(value: Any, field: str) -> None:
    _text(value, field)
    if value in ("R", "RANDOM"):
        raise _fail(field, "is refused: cloud-init prints a RANDOM password on the console, where the site reads it")


def _ntp(value: Any, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail(field, "must be an object")
    _keys(value, {"enabled", "ntp_client", "servers", "pools", "peers", "allow"}, field,
          {"config": "it overrides the client's template, check program and packages: code of the document's own"})
    if "ntp_client" in value:
        _text(value["ntp_client"], f"{field}.ntp_client", NTP_CLIENT_RE, "an NTP client name")
    for key in ("servers", "pools", "peers", "allow"):
        for i, host in enumerate(value.get(key) or []):
            _text(host, f"{field}.{key}[{i}]", re.compile(r"^[A-Za-z0-9.:/_-]{1,253}\Z"), "a host or network")


CHECKS: dict[str, Callable[[Any, str], None]] = {
    "write_files": _write_files, "users": _users, "groups": _groups,
    "user": lambda v, f: _user_item(v, f),
    "hostname": _host, "fqdn": _host, "prefer_fqdn_over_hostname": _bool, "preserve_hostname": _bool,
    "manage_etc_hosts": _manage_etc_hosts,
    "timezone": lambda v, f: _matches(v, f, TIMEZONE_RE, "a time zone name (Area/City)"),
    "locale": lambda v, f: _matches(v, f, LOCALE_RE, "a locale name"),
    "ca_certs": _ca_certs, "packages": _packages, "package_update": _bool,
    "package_upgrade": lambda v, f: _false_only(v, f, "an upgrade of every package restarts services (imprint's "
                                                      "agent, sshd) while the apply runs; upgrade in a maintenance "
                                                      "window, or name the packages"),
    "package_reboot_if_required": lambda v, f: _false_only(v, f, "it would reboot the VM under the agent"),
    "chpasswd": _chpasswd, "password": _password, "ntp": _ntp,
}
assert set(CHECKS) == set(MODULES)


# -- on the VM, just before cloud-init runs
Part = tuple[str | int, ...]  # a place in the document: ("write_files", 1), ("users", 0, "sudo")
MAX_USER_DB = 16 << 20  # /etc/passwd, /etc/group of the root
RESUMED = (" (this apply resumes an interrupted run of the same document, and this is not as the document says: "
           "it would be written again)")


def account_db(files: GuestRoot, guest: str) -> dict[str, list[str]]:
    """The entries of the root's ``/etc/passwd`` or ``/etc/group`` by name: the local accounts
    that cloud-init's ``pwd``/``grp`` lookups see in the chroot (read bounded, no link followed)."""
    try:
        data = files.read(guest, limit=MAX_USER_DB)
    except FileRefused as exc:
        raise BackendError(f"cannot read the user database: {exc}") from None
    entries: dict[str, list[str]] = {}
    for line in (data or b"").decode(errors="replace").splitlines():
        fields = line.split(":")
        entries.setdefault(fields[0], fields)
    return entries


def user_items(document: dict[str, Any]) -> list[tuple[Part, dict[str, Any]]]:
    """The users the document configures as objects (``users[i]``, ``user``), where each is."""
    items: list[tuple[Part, dict[str, Any]]] = [
        (("users", i), item) for i, item in enumerate(document.get("users") or []) if isinstance(item, dict)]
    if isinstance(document.get("user"), dict):
        items.append((("user",), document["user"]))
    return items


def home_of(item: dict[str, Any], passwd: dict[str, list[str]]) -> str:
    """Where cloud-init puts the user's keys: her home if she exists, else the one useradd makes."""
    name = item["name"]
    entry = passwd.get(name)
    if entry is not None and len(entry) == 7:
        return entry[5]
    return str(item.get("homedir") or f"/home/{name}")


def check_paths(files: GuestRoot, document: dict[str, Any], *, done: frozenset[Part] = frozenset(),
                resumed: bool = False) -> None:
    """Where each path of the document leads on the VM: cloud-init writes as root and follows
    links, so a path whose existing part crosses a user's directory (where she could put a
    link between this check and the write) or resolves into a protected place is refused. The
    keys of ``users[].ssh_authorized_keys`` are such a path too (cloud-init 22.4 writes
    ``~/.ssh/authorized_keys`` as root and follows a link there). ``done``: the parts an
    interrupted run of this document finished, which cloud-init is not given again."""
    hint = RESUMED if resumed else ""
    targets = [(where("write_files", i, "path"), item["path"])
               for i, item in enumerate(document.get("write_files") or []) if ("write_files", i) not in done]
    targets += [(where(*part, "homedir"), item["homedir"]) for part, item in user_items(document) if "homedir" in item]
    for field, path in targets:
        try:
            resolved, users = files.resolve(path)
        except FileRefused as exc:
            raise _fail(field, f"{path!r}: {exc}; refused{hint}") from None
        if users:
            raise _fail(field, f"{path!r} is in a directory that uid {min(users)} controls: cloud-init would follow "
                               f"a link she puts there; refused{hint}")
        why = protected(resolved)
        if why is not None:
            raise _fail(field, f"{path!r} leads to {resolved} ({why}); refused")
    passwd: dict[str, list[str]] | None = None
    for part, item in user_items(document):
        if not item.get("ssh_authorized_keys") or (*part, "ssh_authorized_keys") in done:
            continue
        field = where(*part, "ssh_authorized_keys")
        if not isinstance(item.get("name"), str):
            raise _fail(field, f"needs {where(*part, 'name')}: the keys go to the home of the user it names")
        passwd = account_db(files, "/etc/passwd") if passwd is None else passwd
        keys = posixpath.join(home_of(item, passwd), ".ssh/authorized_keys")
        try:
            _, users = files.resolve(keys)
        except FileRefused as exc:
            raise _fail(field, f"go to {keys!r}: {exc}; refused{hint}") from None
        if users:
            raise _fail(field, f"go to {keys!r}, in a directory that uid {min(users)} controls: cloud-init writes "
                               f"them as root and would follow a link she puts there; refused{hint}; the [ssh] "
                               "backend adds keys for an existing user without following her links")
