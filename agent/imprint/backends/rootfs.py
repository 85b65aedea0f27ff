"""Files under the guest root, as the root agent reads and writes them for a backend while
local users of the VM own some of the directories on the way.

A local user controls what is in her home and in ``~/.ssh``: she can put a symlink where the
agent expects ``authorized_keys`` (to ``/etc/shadow``), make ``~/.ssh`` itself a symlink, plant a
hard link to a file she cannot read, a FIFO that blocks an ``open``, or a sparse file of 4 GiB
that costs nothing on disk and everything in the agent's memory. So every path is walked here
one component at a time from a descriptor of the root (``openat`` with ``O_NOFOLLOW``,
``O_DIRECTORY`` for each directory, ``O_NONBLOCK`` for files), never by a path string the
kernel resolves on its own, and the rules are:

* **Links.** The last component is never followed (except that a directory which is root's
  own link to a directory counts as there, when it is only to be made sure of, not changed).
  A symlink on the way is followed only if
  nobody but root could have made it: owned by root, in a directory that is root's and not
  writable by group or others, on a walk that has crossed no user's directory. Its target
  resolves under the root (an absolute target starts again at the root, ``..`` stops there),
  at most ``MAX_HOPS`` times. A directory that group or others may write (``/tmp``) is refused.
* **A user's directories.** Once the walk enters a directory a user owns, that user controls
  everything below it. A file read there must be a regular file owned by that very user, with
  one link (a hard link to ``/etc/shadow`` is root's, or has two links; a file root wrote and
  another name still points at is root's too).
* **Type and size.** Only regular files are read; the type is checked before the ``open`` (a
  FIFO or a device is never opened) and again on the descriptor. A file larger than the
  caller's bound is refused from ``fstat`` without reading it, and no more than the bound is
  ever read (a file that grows meanwhile is refused as well).
* **Writes** go through a temp file created ``O_EXCL`` in the one opened directory, owner and
  mode set on the descriptor, fsync, ``renameat`` over the name, directory fsync: a planted
  temp name is removed, never written through, and the rename cannot land elsewhere.

Every refusal is a :class:`FileRefused` whose message names the file (its guest path) and the
fault; the backend framework turns it into that backend's failure.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imprint.boundedio import InputError, read_fd
from imprint.faults import crashpoint
from imprint.fsatomic import remove_stale_temps_at, temp_name, write_all

MAX_FILE = 1 << 20  # the default bound of a read: every file a backend reads is a config, key or keytab
MAX_HOPS = 32
NAME_MAX = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FileRefused(Exception):
    """A file the agent will not read, write or create; the message names it and why."""


def check_guest_path(guest: str) -> list[str]:
    """The components of an absolute guest path; FileRefused for anything that is not one."""
    if not isinstance(guest, str) or not guest.startswith("/"):
        raise FileRefused(f"{guest!r} is not an absolute guest path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in guest):
        raise FileRefused(f"{guest!r} contains a control character")
    parts = [p for p in guest.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise FileRefused(f"{guest!r}: '{part}' is not allowed in a guest path")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise FileRefused(f"{guest[:80]!r}...: a component is longer than {NAME_MAX} bytes")
    return parts


def kind(mode: int) -> str:
    """What a file is, in words, for a refusal."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


@dataclass
class Parent:
    """An opened directory at the end of a walk, and who controls it."""

    fd: int
    guest: str                # its guest path (as resolved: after trusted symlinks)
    users: frozenset[int]     # non-root owners of it or of a directory above it
    missing: tuple[str, ...] = ()  # a partial walk: the components below it that do not exist

    def path_of(self, name: str) -> str:
        return _join(self.guest, name)


class GuestRoot:
    """The guest root (``--root``), walked from a descriptor; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- walking
    @contextlib.contextmanager
    def parent(self, guest: str, *, made: list[str] | None = None) -> Iterator[tuple[Parent, str] | None]:
        """The opened parent directory of ``guest`` and the last component's name; None if a
        directory on the way does not exist (with ``made``: made, 0755 root, and their guest
        paths appended to it)."""
        parts = check_guest_path(guest)
        if not parts:
            raise FileRefused("'/' is not a file")
        found = self._walk(parts[:-1], made=made)
        if found is None:
            yield None
            return
        try:
            yield found, parts[-1]
        finally:
            os.close(found.fd)

    def _walk(self, parts: list[str], *, made: list[str] | None, partial: bool = False) -> Parent | None:
        hops = 0
        while True:
            restart = None
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise FileRefused(f"cannot open the root {self.root}: {exc.strerror}") from None
            here, users, trusted_dir = "/", frozenset[int](), True
            try:
                for i, name in enumerate(parts):
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        if partial:
                            return Parent(fd=fd, guest=here, users=users, missing=tuple(parts[i:]))
                        if made is None:
                            os.close(fd)
                            return None
                        st = self._mkdir(fd, name, _join(here, name))
                        made.append(_join(here, name))
                    except OSError as exc:
                        raise FileRefused(f"cannot look up {_join(here, name)}: {exc.strerror}") from None
                    where = _join(here, name)
                    if stat.S_ISLNK(st.st_mode):
                        if users or not trusted_dir or st.st_uid != 0:
                            whose = (f"in a directory that uid {min(users)} controls" if users else
                                     f"owned by uid {st.st_uid}" if st.st_uid != 0 else
                                     "in a directory others can write")
                            raise FileRefused(f"{where} is a symlink {whose}; refusing to follow it")
                        target = os.readlink(name, dir_fd=fd)
                        hops += 1
                        if hops > MAX_HOPS:
                            raise FileRefused(f"{where}: more than {MAX_HOPS} symlinks on the way (a loop?)")
                        base = "/" if target.startswith("/") else here
                        resolved = posixpath.normpath(posixpath.join(base, target))
                        restart = check_guest_path("/" + resolved.lstrip("/")) + parts[i + 1:]
                        break
                    if not stat.S_ISDIR(st.st_mode):
                        raise FileRefused(f"{where} is {kind(st.st_mode)}, not a directory")
                    try:
                        next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:  # swapped for a symlink since the lookup: ELOOP
                        raise FileRefused(f"cannot open the directory {where}: {exc.strerror}") from None
                    os.close(fd)
                    fd = next_fd
                    st = os.fstat(fd)
                    if st.st_mode & 0o022:
                        os.close(fd)
                        fd = -1
                        raise FileRefused(f"{where} is writable by group or others (mode "
                                          f"{stat.S_IMODE(st.st_mode):04o}); refusing to use a path through it")
                    if st.st_uid != 0:
                        users = users | {st.st_uid}
                    trusted_dir = st.st_uid == 0
                    here = where
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
            if restart is None:
                return Parent(fd=fd, guest=here, users=users)
            os.close(fd)
            parts = restart

    @staticmethod
    def _mkdir(dir_fd: int, name: str, where: str) -> os.stat_result:
        try:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
            os.fsync(dir_fd)
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise FileRefused(f"cannot create {where}: {exc.strerror}") from None

    def resolve(self, guest: str) -> tuple[str, frozenset[int]]:
        """Where ``guest`` leads, following root's own links as the kernel would (the last
        component too): (the resolved guest path, the users controlling its deepest existing
        directory). A user's link on the way is a FileRefused, as in every walk."""
        parts = check_guest_path(guest)
        for _ in range(MAX_HOPS):
            if not parts:
                return "/", frozenset()
            found = self._walk(parts[:-1], made=None, partial=True)
            assert found is not None
            try:
                if found.missing:
                    return _join(found.guest, "/".join([*found.missing, parts[-1]])), found.users
                name = parts[-1]
                try:
                    st = os.stat(name, dir_fd=found.fd, follow_symlinks=False)
                except FileNotFoundError:
                    return found.path_of(name), found.users
                if not stat.S_ISLNK(st.st_mode):
                    return found.path_of(name), found.users
                if found.users or st.st_uid != 0:
                    raise FileRefused(f"{found.path_of(name)} is a symlink "
                                      f"{'a user controls' if found.users else f'owned by uid {st.st_uid}'}")
                target = os.readlink(name, dir_fd=found.fd)
                base = "/" if target.startswith("/") else found.guest
                parts = check_guest_path("/" + posixpath.normpath(posixpath.join(base, target)).lstrip("/"))
            finally:
                os.close(found.fd)
        raise FileRefused(f"{guest}: more than {MAX_HOPS} symlinks (a loop?)")

    # -- reading
    def read(self, guest: str, *, limit: int = MAX_FILE) -> bytes | None:
        """The bytes of the regular file ``guest`` (at most ``limit``), or None if it does not exist."""
        with self.parent(guest) as found:
            if found is None:
                return None
            parent, name = found
            return read_at(parent, name, limit)

    def lstat(self, guest: str) -> os.stat_result | None:
        """``lstat`` of ``guest`` by the same walk; None if it does not exist."""
        with self.parent(guest) as found:
            if found is None:
                return None
            parent, name = found
            try:
                return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            except FileNotFoundError:
                return None

    # -- writing
    def write(self, guest: str, data: bytes, *, mode: int, uid: int | None = None, gid: int | None = None,
              label: str | None = None) -> None:
        """Replace ``guest`` with ``data`` (see the module docstring). Its directory must exist."""
        with self.parent(guest) as found:
            if found is None:
                raise FileRefused(f"cannot write {guest}: its directory does not exist")
            parent, name = found
            write_at(parent, name, data, mode=mode, uid=uid, gid=gid, label=label)

    def remove(self, guest: str, *, label: str | None = None) -> bool:
        """Remove the file (or symlink) ``guest``; False if there was none. ``label`` names the
        crash point ``<label>.removed`` (default: the file's name), as for :meth:`write`."""
        with self.parent(guest) as found:
            if found is None:
                return False
            parent, name = found
            try:
                st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if stat.S_ISDIR(st.st_mode):
                raise FileRefused(f"{parent.path_of(name)} is a directory; refusing to remove it")
            try:
                os.unlink(name, dir_fd=parent.fd)
                os.fsync(parent.fd)
                crashpoint(f"{label or name}.removed")
            except OSError as exc:
                raise FileRefused(f"cannot remove {parent.path_of(name)}: {exc.strerror}") from None
            return True

    def remove_dir(self, guest: str) -> bool:
        """Remove the empty directory ``guest``; False if there was none. Not empty: FileRefused."""
        with self.parent(guest) as found:
            if found is None:
                return False
            parent, name = found
            try:
                os.rmdir(name, dir_fd=parent.fd)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise FileRefused(f"cannot remove the directory {parent.path_of(name)}: {exc.strerror}") from None
            return True

    def ensure_dir(self, guest: str, *, mode: int, uid: int | None = None, gid: int | None = None,
                   fix_existing: bool = True, made: list[str] | None = None) -> str | None:
        """Make ``guest`` a directory with ``mode`` and owner. Returns "created", "fixed" or
        None (already right, or it exists and ``fix_existing`` is off). With ``made``, missing
        directories on the way are made too (0755 root) and listed in it."""
        with self.parent(guest, made=made) as found:
            if found is None:
                raise FileRefused(f"cannot create {guest}: its parent directory does not exist")
            parent, name = found
            where = parent.path_of(name)
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None:
                try:
                    os.mkdir(name, 0o700, dir_fd=parent.fd)  # tightened first, opened up once the owner is right
                    crashpoint(f"{name}.mkdir")  # made, not yet its owner's
                except OSError as exc:
                    raise FileRefused(f"cannot create {where}: {exc.strerror}") from None
            elif stat.S_ISLNK(st.st_mode):
                if fix_existing or parent.users or st.st_uid != 0:
                    raise FileRefused(f"{where} is a symlink; refusing to follow it")
                # Root's own link (the image's, as for an intermediate directory): a directory is there
                # if the link leads to one under the root. Nothing is changed through it.
                target = self._walk(check_guest_path(where), made=None)
                if target is None:
                    raise FileRefused(f"{where} is a symlink to a directory that does not exist")
                os.close(target.fd)
                return None
            elif not stat.S_ISDIR(st.st_mode):
                raise FileRefused(f"{where} exists and is {kind(st.st_mode)}, not a directory")
            elif not fix_existing:
                return None
            elif stat.S_IMODE(st.st_mode) == mode and uid in (None, st.st_uid) and gid in (None, st.st_gid):
                return None
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
            except OSError as exc:
                raise FileRefused(f"cannot open the directory {where}: {exc.strerror}") from None
            try:
                if uid is not None or gid is not None:
                    os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                os.fchmod(fd, mode)
                if st is None:
                    os.fsync(fd)
                    os.fsync(parent.fd)
            except OSError as exc:
                raise FileRefused(f"cannot set the owner and mode of {where}: {exc.strerror}") from None
            finally:
                os.close(fd)
            return "created" if st is None else "fixed"


def read_at(parent: Parent, name: str, limit: int = MAX_FILE) -> bytes | None:
    """The regular file ``name`` in ``parent``, bounded; None if it does not exist."""
    where = parent.path_of(name)
    try:
        before = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FileRefused(f"cannot look up {where}: {exc.strerror}") from None
    if stat.S_ISLNK(before.st_mode):
        raise FileRefused(f"{where} is a symlink; refusing to follow it")
    if not stat.S_ISREG(before.st_mode):
        raise FileRefused(f"{where} is {kind(before.st_mode)}, not a regular file; refusing to open it")
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=parent.fd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: swapped for a symlink since the lookup
        raise FileRefused(f"cannot open {where}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{where} is {kind(st.st_mode)}, not a regular file")
        if parent.users:
            if st.st_uid not in parent.users:
                raise FileRefused(f"{where} is owned by uid {st.st_uid}, not by the user who controls its "
                                  f"directory (uid {', '.join(map(str, sorted(parent.users)))}); refusing to read it")
            if st.st_nlink != 1:
                raise FileRefused(f"{where} has {st.st_nlink} hard links (it may be another file); "
                                  "refusing to read it")
        if st.st_size > limit:
            raise FileRefused(f"{where} is {st.st_size} bytes; at most {limit} are read")
        return read_bounded(fd, limit, where)
    finally:
        os.close(fd)


def read_bounded(fd: int, limit: int, where: str) -> bytes:
    """At most ``limit`` bytes from ``fd`` to its end (boundedio's reader, the one for every
    outside input); FileRefused if there are more."""
    try:
        return read_fd(fd, limit, where, f"; at most {limit} are read")
    except InputError as exc:
        raise FileRefused(str(exc)) from None


def write_at(parent: Parent, name: str, data: bytes, *, mode: int, uid: int | None = None, gid: int | None = None,
             label: str | None = None) -> None:
    """Replace ``name`` in ``parent`` with ``data`` atomically; its crash points are those of
    :func:`imprint.fsatomic.write_atomic` (``<label>.written``, ``.renamed``, ``.synced``)."""
    where = parent.path_of(name)
    point = label or name
    try:
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise FileRefused(f"{where} is a symlink; refusing to write through it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"{where} exists and is {kind(st.st_mode)}, not a regular file")
    remove_stale_temps_at(parent.fd, name)
    tmp = temp_name(name, os.getpid())
    try:
        # O_EXCL: a name planted since the sweep (a hard link to /etc/shadow) fails the create, never
        # gets truncated, chowned and renamed into place.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent.fd)
    except OSError as exc:
        raise FileRefused(f"cannot create a temp file next to {where}: {exc.strerror}") from None
    try:
        try:
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)  # after chown, which clears set-id bits
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        crashpoint(f"{point}.written")
        os.replace(tmp, name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=parent.fd)
        if isinstance(exc, OSError):
            raise FileRefused(f"cannot write {where}: {exc.strerror or exc}") from None
        raise
    crashpoint(f"{point}.renamed")
    try:
        os.fsync(parent.fd)
    except OSError as exc:
        raise FileRefused(f"cannot sync the directory of {where}: {exc.strerror}") from None
    crashpoint(f"{point}.synced")
