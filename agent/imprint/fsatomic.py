"""Crash-safe file writes: temp file, fsync, rename, directory fsync.

Each step of :func:`write_atomic` is a crash point (:mod:`imprint.faults`), named by the
caller's purpose (``label``, default the file's name): ``<label>.written`` (temp file written
and synced, not yet renamed), ``<label>.renamed`` and ``<label>.synced`` (directory synced).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from imprint.faults import crashpoint
from imprint.safetext import ascii_number

TEMP_MARK = ".tmp."


def write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` to ``fd`` (os.write may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def fsync_path(path: Path) -> None:
    """fsync a file, a directory (its entries: a rename or unlink in it) or a block device."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(name: str, pid: int) -> str:
    return f".{name}{TEMP_MARK}{pid}"


def remove_stale_temps_at(dir_fd: int, name: str) -> None:
    """Temp files of ``name`` in the opened directory that a crash left between write and rename,
    by writers that are gone, or that are no writer's at all (a name no PID ends, planted by a
    user in her directory): unlinking a name in the opened directory is harmless whatever it
    points at. A live writer's temp (e.g. a second `imprint` process) is left alone."""
    prefix = f".{name}{TEMP_MARK}"
    with contextlib.suppress(OSError), os.scandir(dir_fd) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix) or entry.is_dir(follow_symlinks=False):
                continue
            pid = entry.name[len(prefix):]
            if ascii_number(pid) and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.name, dir_fd=dir_fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, someone else's
    return True


def remove_stale_temps(directory: Path) -> None:
    """Every temp file a crashed :func:`write_atomic` left in ``directory`` (a directory only
    this program writes to, swept at start)."""
    names: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        names = {e.name[1:].rsplit(TEMP_MARK, 1)[0] for e in entries
                 if e.name.startswith(".") and TEMP_MARK in e.name}
    if not names:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in names:
            remove_stale_temps_at(dir_fd, name)
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = True,
                 uid: int | None = None, gid: int | None = None, dir_nofollow: bool = False,
                 label: str | None = None) -> None:
    """Replace ``path`` with ``data``; readers see the old file or the new one, never a mix.

    ``sync_dir=False`` leaves the directory fsync to a later write in the same directory (one
    directory fsync makes every earlier rename in it durable).

    ``uid``/``gid`` set the new file's owner before it is renamed into place (None: leave it to
    the writer's). ``dir_nofollow`` refuses a parent directory that is a symlink, and the temp
    file and the rename are relative to that one opened directory, so a directory owned by
    someone else (a user's ~/.ssh) cannot be swapped for a symlink between check and rename.

    ``label`` names the crash points (default: the file's name). Temp files of this file left
    by a crashed earlier writer are removed first."""
    point = label or path.name
    flags = os.O_RDONLY | os.O_DIRECTORY | (os.O_NOFOLLOW if dir_nofollow else 0)
    dir_fd = os.open(path.parent, flags)
    try:
        remove_stale_temps_at(dir_fd, path.name)
        tmp = temp_name(path.name, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                os.fchmod(fd, mode)  # chown clears set-id bits; keep the mode exactly as asked
            write_all(fd, data)
            os.fsync(fd)
            crashpoint(f"{point}.written")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        try:
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        crashpoint(f"{point}.renamed")
        if sync_dir:
            os.fsync(dir_fd)
            crashpoint(f"{point}.synced")
    finally:
        os.close(dir_fd)
