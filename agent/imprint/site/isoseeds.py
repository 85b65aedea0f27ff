"""Seed volumes for the filesystem channels: imprint's own ``IMPRINT`` seed, a cloud-init NoCloud
seed (``cidata``) and an OpenStack config drive (``config-2``), each as ISO9660 or vfat.

ISO9660 images are made with pycdlib (Joliet and Rock Ridge, ISO9660 level-1 names for readers
that take neither; the volume id is the label). vfat images are made with ``mkfs.vfat`` and
filled with mtools. Both are what the guest side (imprint.guest.volumes) and cloud-init read.

The NoCloud and config-2 seeds are complete for cloud-init: a guest whose cloud-init finds them
boots normally (instance id ``imprint-<token id>``, an empty ``#cloud-config``). Note that
cloud-init copies meta-data into /run/cloud-init/instance-data.json, which every user of the
guest can read: for a shared-mode token (K) the ``IMPRINT`` seed keeps it out of that file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

from imprint import tokens
from imprint.fsatomic import fsync_path, write_atomic
from imprint.site.artefact import Artefact, Builder

IMPRINT_LABEL = "IMPRINT"
NOCLOUD_LABEL = "cidata"  # cloud-init looks for cidata and CIDATA
CONFIG2_LABEL = "config-2"  # cloud-init and nova: config-2 (CONFIG-2 is read too)
VFAT_KIB = 1024  # mkfs.vfat -C takes KiB; 1 MiB is a small FAT12 with room to spare
_UUID_NAMESPACE = uuid.UUID("5b0c6a39-8f5e-4d0a-9a57-2b0f8d1f6c11")  # imprint's, for config-2 uuids
_TIMEOUT = 60.0

Files = dict[str, bytes]  # absolute path on the volume -> content
FilesMaker = Callable[[str], Files]


def _instance_name(token: str) -> str:
    # The token id, not the token: it is safe to show (one-way from K in shared mode).
    return f"imprint-{tokens.parse(token).token_id.hex()}"


def imprint_files(token: str) -> Files:
    return {"/token": f"{token}\n".encode()}


def nocloud_files(token: str) -> Files:
    name = _instance_name(token)
    meta_data = f"instance-id: {name}\nlocal-hostname: {name}\nimprint-token: {token}\n"
    # cloud-init requires user-data next to meta-data; an empty #cloud-config changes nothing.
    return {"/meta-data": meta_data.encode(), "/user-data": b"#cloud-config\n{}\n"}


def config2_files(token: str) -> Files:
    name = _instance_name(token)
    meta_data = {
        "uuid": str(uuid.uuid5(_UUID_NAMESPACE, name)),  # cloud-init requires it (its instance-id)
        "hostname": name,
        "name": name,
        "launch_index": 0,
        "meta": {"imprint-token": token},
    }
    return {"/openstack/latest/meta_data.json": (json.dumps(meta_data, indent=2) + "\n").encode()}


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

    from imprint.guest.volumes import iso9660_name

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


def vfat_image(label: str, files: Files, out: Path) -> None:
    """A vfat image labelled ``label`` holding ``files``, written to ``out`` (0600, atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # mkfs.vfat -C refuses to overwrite a leftover
    try:
        _run("mkfs.vfat", "-n", label, "-C", str(tmp), str(VFAT_KIB))
        os.chmod(tmp, 0o600)  # before any token is written into it
        image = str(tmp.absolute())
        for directory in _directories(files):
            _run("mmd", "-i", image, "::" + directory)
        for path, data in files.items():
            # "-": mcopy reads the content from stdin, so the token is never in another file.
            _run("mcopy", "-i", image, "-", "::" + path, stdin=data)
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


def _iso_builder(channel: str, label: str, make_files: FilesMaker, note: str) -> Builder:
    def build(token: str, out: Path) -> Artefact:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, iso_image(label, make_files(token)), mode=0o600)
        return Artefact(channel, out, qemu_args=_drive(out, readonly=True),
                        note=f"ISO9660 labelled {label}; {note} (or attach it as a CD: -cdrom {out})")

    return build


def _vfat_builder(channel: str, label: str, make_files: FilesMaker, note: str, *, readonly: bool) -> Builder:
    def build(token: str, out: Path) -> Artefact:
        vfat_image(label, make_files(token), out)
        return Artefact(channel, out, qemu_args=_drive(out, readonly=readonly), note=f"vfat labelled {label}; {note}")

    return build


# cloud-init copies meta-data (NoCloud) and meta (config-2) into the guest's world-readable
# /run/cloud-init/instance-data.json: the notes say so, since a shared-mode token is K.
_CLOUD_INIT_COPIES = "cloud-init copies it into world-readable instance-data.json, so for K prefer imprint-seed"

build_imprint_seed_iso = _iso_builder(
    "imprint-seed", IMPRINT_LABEL, imprint_files,
    "the guest reads the file token; an ISO is read-only, so K stays on it after the bind: detach it")
build_imprint_seed_vfat = _vfat_builder(
    "imprint-seed", IMPRINT_LABEL, imprint_files,
    "the guest reads the file token and, in shared mode, wipes K from it after the bind (attached writable)",
    readonly=False)
build_nocloud_iso = _iso_builder(
    "nocloud", NOCLOUD_LABEL, nocloud_files,
    f"cloud-init NoCloud seed; the guest reads meta-data key imprint-token ({_CLOUD_INIT_COPIES})")
build_nocloud_vfat = _vfat_builder(
    "nocloud", NOCLOUD_LABEL.upper(), nocloud_files,
    f"cloud-init NoCloud seed; the guest reads meta-data key imprint-token ({_CLOUD_INIT_COPIES})",
    readonly=True)
build_config2_iso = _iso_builder(
    "config-2", CONFIG2_LABEL, config2_files,
    f"OpenStack config drive; the guest reads meta.imprint-token ({_CLOUD_INIT_COPIES})")
build_config2_vfat = _vfat_builder(
    "config-2", CONFIG2_LABEL.upper(), config2_files,
    f"OpenStack config drive; the guest reads meta.imprint-token ({_CLOUD_INIT_COPIES})",
    readonly=True)

BUILDERS: dict[str, Builder] = {
    "imprint-seed-iso": build_imprint_seed_iso,
    "imprint-seed-vfat": build_imprint_seed_vfat,
    "nocloud-iso": build_nocloud_iso,
    "nocloud-vfat": build_nocloud_vfat,
    "config-2-iso": build_config2_iso,
    "config-2-vfat": build_config2_vfat,
}
