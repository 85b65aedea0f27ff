"""Contextualization backends: what the owner's profile makes of a bound VM; the framework
both halves share (the context a guest half writes through, discovery, running).

A backend is one package declaring one :class:`imprint.backends.plugin.Backend` (its guest half,
owner half, schema and metadata), registered in the one entry-point group ``imprint.backends``
(``ssh = "imprint.backends.ssh:BACKEND"`` in pyproject.toml), so an appliance vendor ships its
own as an ordinary Python distribution (docs/backends.md). The built-in ones are the packages
next to this file: ssh, kerberos, x509, cloudinit, each ``{__init__, guest, owner, schema}``.
The owner sends ``{"backends": {name: config}}`` over the pinned channel (``POST /v1/apply``);
the agent runs each named backend in the document's order and answers with one result each.

The contract a backend keeps (the framework enforces what it can):

* **Validate first, then act.** Check the whole config (and everything it names: keys,
  certificates) before writing anything; raise :class:`BackendError` with a message that names
  the bad field. Anything else raised is reported as an internal error of that backend.
  Either way the other backends still run.
* **Write through the context.** ``ctx.write_file`` writes atomically (temp file, fsync,
  rename, directory fsync) with the owner and mode asked for, and leaves a file alone when its
  content, mode and owner are already right; ``ctx.ensure_dir`` and ``ctx.remove_file`` behave
  the same way. So no file is ever half-written, and a second run with the same config changes
  nothing and reports ``changed=False`` (the context counts what it changed).
* **Guest paths.** Files are written at ``ctx.path("/etc/...")`` (under ``--root``); paths
  *inside* files the guest reads (sshd_config, krb5.conf) are guest paths ("/etc/...").
* **Programs** run through ``ctx.run`` (C locale, output captured, a clear error on failure).

Each backend's result goes back to the owner as
``{"ok", "changed", "summary", "data", "changes", "warnings", "seconds"}``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imprint.backends.plugin import Backend, GuestHalf
from imprint.backends.rootfs import MAX_FILE, FileRefused, GuestRoot, check_guest_path, kind
from imprint.backends.schema import ConfigError
from imprint.guest import log as agent_log
from imprint.guest.distro import Distro

GROUP = "imprint.backends"  # the one group: its entry points yield Backend objects
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
# Names that end up in system files (passwd, sudoers, krb5.conf, certificates): anchored with \Z,
# not $, which would let one trailing newline through.
USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")  # as useradd accepts by default
HOST_NAME_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\Z")

log = logging.getLogger("imprint.agent")
agent_log.route_stdlib("imprint")  # in a running agent, backend records go where the agent's go


class BackendError(Exception):
    """A backend's explained failure: the message goes to the owner as the reason."""


@dataclass
class BackendResult:
    ok: bool = True
    changed: bool = False
    summary: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackendContext:
    """What a backend gets: the guest paths, a logger, and helpers that keep the contract."""

    name: str
    paths: Distro
    log: logging.Logger
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # -- bookkeeping
    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def note_change(self, what: str) -> None:
        self.changes.append(what)
        self.log.info("%s: %s", self.name, what)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.log.warning("%s: %s", self.name, text)

    def result(self, summary: str, **data: Any) -> BackendResult:
        return BackendResult(ok=True, changed=self.changed, summary=summary, data=data)

    # -- paths
    def path(self, guest_path: str) -> Path:
        """Where the guest path ``guest_path`` ("/etc/ssh/...") is, under ``--root``."""
        try:
            check_guest_path(guest_path)
        except FileRefused as exc:
            raise BackendError(str(exc)) from None
        return self.paths.under(guest_path)

    @property
    def files(self) -> GuestRoot:
        """The root walked from a descriptor (imprint.backends.rootfs): no link a user made is followed."""
        return GuestRoot(self.paths.root)

    def _guest(self, path: Path) -> str:
        try:
            return self.paths.guest(path)
        except ValueError:
            raise BackendError(f"{path} is not under the root {self.paths.root}") from None

    # -- files: every one through rootfs, so a local user's links, FIFOs and sizes cannot redirect,
    # block or flood the agent (see imprint.backends.rootfs)
    def read_file(self, path: Path, *, limit: int = MAX_FILE) -> bytes | None:
        """The file's bytes (at most ``limit``), or None if it does not exist. A symlink, a FIFO,
        a device, a larger file, or a file in a user's directory that is not hers is refused."""
        try:
            return self.files.read(self._guest(path), limit=limit)
        except FileRefused as exc:
            raise BackendError(str(exc)) from None

    def write_file(self, path: Path, data: bytes, *, mode: int, uid: int | None = None, gid: int | None = None,
                   ) -> bool:
        """Make ``path`` hold ``data`` with ``mode`` and owner; True if anything had to change."""
        guest = self._guest(path)
        try:
            if self._unchanged(guest, data, mode, uid, gid):
                return False
            self.files.write(guest, data, mode=mode, uid=uid, gid=gid, label=f"backend.{self.name}.{path.name}")
        except FileRefused as exc:
            raise BackendError(str(exc)) from None
        self.note_change(f"wrote {path}")
        return True

    def _unchanged(self, guest: str, data: bytes, mode: int, uid: int | None, gid: int | None) -> bool:
        st = self.files.lstat(guest)
        if st is None:
            return False
        if stat.S_ISLNK(st.st_mode):
            raise BackendError(f"{guest} is a symlink; refusing to write through it")
        if not stat.S_ISREG(st.st_mode):
            raise BackendError(f"{guest} exists and is {kind(st.st_mode)}, not a regular file")
        if stat.S_IMODE(st.st_mode) != mode or (uid is not None and st.st_uid != uid) or \
                (gid is not None and st.st_gid != gid) or st.st_size != len(data):
            return False
        return self.files.read(guest, limit=max(len(data), 1)) == data

    def remove_file(self, path: Path) -> bool:
        try:
            removed = self.files.remove(self._guest(path))
        except FileRefused as exc:
            raise BackendError(str(exc)) from None
        if removed:
            self.note_change(f"removed {path}")
        return removed

    def ensure_dir(self, path: Path, *, mode: int, uid: int | None = None, gid: int | None = None,
                   fix_existing: bool = True, parents: bool = False) -> bool:
        """Make ``path`` a directory (not a symlink) with ``mode`` and owner; True if it changed.
        ``fix_existing=False`` only creates: an existing directory keeps its mode and owner (a
        user's home). ``parents`` creates missing parents too (0755, root)."""
        made: list[str] = []
        try:
            done = self.files.ensure_dir(self._guest(path), mode=mode, uid=uid, gid=gid, fix_existing=fix_existing,
                                         made=made if parents else None)
        except FileRefused as exc:
            raise BackendError(str(exc)) from None
        finally:
            for guest in made:
                self.note_change(f"created {self.paths.under(guest)}")
        if done is None:
            return False
        self.note_change(f"{'created' if done == 'created' else 'fixed mode/owner of'} {path}")
        return True

    # -- programs
    def run(self, argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 120.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a program with the C locale; on failure (``check``) a BackendError quotes its stderr."""
        full_env = dict(os.environ, LC_ALL="C", LANG="C")
        if env:
            full_env.update(env)
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                  env=full_env, check=False)
        except FileNotFoundError:
            raise BackendError(f"{argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise BackendError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}): {_tail(proc.stderr)}")
        return proc


def _tail(text: str, limit: int = 400) -> str:
    text = " ".join(text.strip().splitlines()[-3:])
    return text[-limit:] if text else "no error output"


# -- discovery
def registered() -> dict[str, set[str]]:
    """Backend name -> the entry-point values registering it (more than one is a conflict)."""
    from importlib.metadata import entry_points

    found: dict[str, set[str]] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, set()).add(ep.value.replace(" ", ""))
    return found


def load(name: str, registry: Mapping[str, set[str]] | None = None) -> Backend:
    """The Backend registered as ``name``; BackendError if none, several, or not a Backend."""
    from importlib.metadata import EntryPoint

    registry = registered() if registry is None else registry
    values = registry.get(name)
    if not values:
        raise BackendError(f"no backend named '{name}' is installed in the VM; "
                           f"installed: {', '.join(sorted(registry)) or 'none'}")
    if len(values) > 1:
        raise BackendError(f"backend '{name}' is registered more than once ({', '.join(sorted(values))}); "
                           "refusing to guess which one runs")
    (value,) = values
    try:
        loaded = EntryPoint(name=name, value=value, group=GROUP).load()
    except Exception as exc:
        raise BackendError(f"backend '{name}' ({value}) cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, Backend):
        raise BackendError(f"backend '{name}' ({value}) is {type(loaded).__name__}, not an imprint Backend")
    if loaded.name != name:
        raise BackendError(f"backend '{name}' ({value}) declares the name '{loaded.name}'")
    return loaded


def find(name: str, registry: Mapping[str, set[str]] | None = None) -> Backend | None:
    """The Backend registered as ``name``, or None if nothing is (a conflict still raises)."""
    registry = registered() if registry is None else registry
    return load(name, registry) if name in registry else None


def guest_half(backend: Backend) -> GuestHalf:
    try:
        half = backend.guest()
    except Exception as exc:
        raise BackendError(f"backend '{backend.name}' cannot load its guest half: {type(exc).__name__}: {exc}"
                           ) from None
    if not callable(half):
        raise BackendError(f"backend '{backend.name}': its guest half is not callable")
    return half


def check_config(backend: Backend, config: Any) -> None:
    """The config fits the backend's schema (the same check the owner made before sending)."""
    if backend.schema is not None:
        try:
            backend.schema.check(config, backend.name)
        except ConfigError as exc:
            raise BackendError(str(exc)) from None


# -- running
def run_backend(paths: Distro, name: str, config: Any, registry: Mapping[str, set[str]] | None = None,
                ) -> dict[str, Any]:
    """Run one backend; never raises. Returns the result as the owner receives it."""
    ctx = BackendContext(name=name, paths=paths, log=log)
    started = time.monotonic()
    try:
        if not NAME_RE.match(name):
            raise BackendError(f"'{name[:80]}' is not a backend name (lower-case letters, digits, '-', '_')")
        if not isinstance(config, dict):
            raise BackendError(f"the config of backend '{name}' must be an object, not {type(config).__name__}")
        backend = load(name, registry)
        check_config(backend, config)
        result = guest_half(backend)(ctx, config)
        if not isinstance(result, BackendResult):
            raise BackendError(f"backend '{name}' returned {type(result).__name__}, not a BackendResult")
        result.changed = result.changed or ctx.changed
    except BackendError as exc:
        result = BackendResult(ok=False, changed=ctx.changed, summary=str(exc))
        log.warning("backend %s failed: %s", name, exc)
    except Exception as exc:
        log.exception("backend %s failed with an internal error", name)
        result = BackendResult(ok=False, changed=ctx.changed,
                               summary=f"internal error in backend '{name}': {type(exc).__name__}: {exc}")
    seconds = round(time.monotonic() - started, 3)
    if result.ok:
        log.info("backend %s: ok, %s (%.3f s): %s", name, "changed" if result.changed else "unchanged",
                 seconds, result.summary)
    return {"ok": result.ok, "changed": result.changed, "summary": result.summary, "data": result.data,
            "changes": ctx.changes, "warnings": ctx.warnings, "seconds": seconds}


def apply_document(paths: Distro, backends: Mapping[str, Any]) -> dict[str, Any]:
    """Run every backend named in ``backends`` ({name: config}) in order; one failing does not
    stop the others."""
    registry = registered()
    return {"results": {name: run_backend(paths, name, config, registry) for name, config in backends.items()}}
