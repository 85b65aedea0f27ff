"""The site half of the seed-volume channels: ISO9660 and vfat images holding a channel's files.

ISO9660 images are made with pycdlib (Joliet and Rock Ridge, ISO9660 level-1 names for readers
that take neither; the volume id is the label). vfat images are made with ``mkfs.vfat`` and
filled with mtools (the program names are :class:`imprint.guest.distro.Programs`' defaults).
Both are what the guest side (imprint.guest.volumes) and cloud-init read. Only a site builds
images: the agent never imports this module.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

from imprint.channels._volume import Files
from imprint.channels.channel import Artefact
from imprint.fsatomic import fsync_path, write_atomic
from imprint.guest.distro import Programs
from imprint.guest.iso9660 import iso9660_name

VFAT_KIB = 1024  # mkfs.vfat -C takes KiB; 1 MiB is a small FAT12 with room to spare
MKFS_VFAT = "mkfs.vfat"  # dosfstools; the site's only, the guest never makes a filesystem
_TIMEOUT = 60.0
DEFAULT_PROGRAMS = Programs()


def _directories(files: Files) -> list[str]:
    """Every directory the files need, parents first."""
    found: list[str] = []
    for path in files:
        parts = path.strip("/").split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/" + "/".join(parts[:depth])
            if directory not in found:
                found.append(directory)
    return found


def iso_image(label: str, files: Files) -> bytes:
    """An ISO9660 image (Joliet + Rock Ridge) with volume id ``label`` holding ``files``."""
    import pycdlib  # only the ISO builders need it

    def iso_path(path: str) -> str:
        parts = path.strip("/").split("/")
        names = [iso9660_name(p, directory=True) for p in parts[:-1]]
        return "/" + "/".join([*names, iso9660_name(parts[-1])])

    def dir_path(path: str) -> str:
        return "/" + "/".join(iso9660_name(p, directory=True) for p in path.strip("/").split("/"))

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=label, joliet=3, rock_ridge="1.09")
    for directory in _directories(files):
        iso.add_directory(dir_path(directory), rr_name=directory.rsplit("/", 1)[1], joliet_path=directory)
    for path, data in files.items():
        # Rock Ridge mode 0400: when a guest mounts the seed, only root reads the token.
        iso.add_fp(io.BytesIO(data), len(data), iso_path(path), rr_name=path.rsplit("/", 1)[1],
                   joliet_path=path, file_mode=0o100400)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def _run(tool: str, *args: str, stdin: bytes | None = None) -> None:
    # mkfs.vfat lives in /usr/sbin, which is not on an ordinary user's PATH on Debian.
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    program = shutil.which(tool, path=search)
    if program is None:
        raise RuntimeError(f"{tool} is not installed (vfat seeds need dosfstools and mtools)")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
    result = subprocess.run([program, *args], input=stdin, capture_output=True, timeout=_TIMEOUT, env=env,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} failed: {result.stderr.decode('utf-8', 'replace').strip()}")


def vfat_image(label: str, files: Files, out: Path, programs: Programs = DEFAULT_PROGRAMS) -> None:
    """A vfat image labelled ``label`` holding ``files``, written to ``out`` (0600, atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # mkfs.vfat -C refuses to overwrite a leftover
    try:
        _run(MKFS_VFAT, "-n", label, "-C", str(tmp), str(VFAT_KIB))
        os.chmod(tmp, 0o600)  # before any token is written into it
        image = str(tmp.absolute())
        for directory in _directories(files):
            _run(programs.mmd, "-i", image, "::" + directory)
        for path, data in files.items():
            # "-": mcopy reads the content from stdin, so the token is never in another file.
            _run(programs.mcopy, "-i", image, "-", "::" + path, stdin=data)
        fsync_path(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(out.parent)


def _drive(out: Path, *, readonly: bool) -> list[str]:
    # QEMU splits -drive options on ","; a comma in the file name is written ",,".
    file = str(out.absolute()).replace(",", ",,")
    return ["-drive", f"file={file},if=virtio,format=raw,readonly={'on' if readonly else 'off'}"]


def iso_artefact(channel: str, label: str, files: Files, out: Path, note: str) -> Artefact:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, iso_image(label, files), mode=0o600)
    return Artefact(channel, out, qemu_args=_drive(out, readonly=True),
                    note=f"ISO9660 labelled {label}; {note} (or attach it as a CD: -cdrom {out})")


def vfat_artefact(channel: str, label: str, files: Files, out: Path, note: str, *, readonly: bool) -> Artefact:
    vfat_image(label, files, out)
    return Artefact(channel, out, qemu_args=_drive(out, readonly=readonly), note=f"vfat labelled {label}; {note}")
