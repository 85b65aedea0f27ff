"""Crash-safe file writes: temp file, fsync, rename, directory fsync."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


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


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = True,
                 uid: int | None = None, gid: int | None = None, dir_nofollow: bool = False) -> None:
    """Replace ``path`` with ``data``; readers see the old file or the new one, never a mix.

    ``sync_dir=False`` leaves the directory fsync to a later write in the same directory (one
    directory fsync makes every earlier rename in it durable).

    ``uid``/``gid`` set the new file's owner before it is renamed into place (None: leave it to
    the writer's). ``dir_nofollow`` refuses a parent directory that is a symlink, and the temp
    file and the rename are relative to that one opened directory, so a directory owned by
    someone else (a user's ~/.ssh) cannot be swapped for a symlink between check and rename."""
    flags = os.O_RDONLY | os.O_DIRECTORY | (os.O_NOFOLLOW if dir_nofollow else 0)
    dir_fd = os.open(path.parent, flags)
    try:
        tmp = f".{path.name}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                os.fchmod(fd, mode)  # chown clears set-id bits; keep the mode exactly as asked
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
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
        if sync_dir:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
