"""Read small files from a filesystem on a block device or image file, without mounting it.

Seeds (NoCloud ``cidata``, OpenStack ``config-2``, imprint's own ``IMPRINT``) are ISO9660 or FAT
filesystems. Mounting them would need privileges, a mount point and care about what the kernel
does with a hostile image; reading them in user space needs none of that and works the same on
a test root, where ``/dev/disk/by-label/<LABEL>`` is a symlink to an image file.

- ISO9660 is read with pycdlib (imported only when an ISO is actually present: the agent's
  start-up path must not pay for it). Names are looked up as Rock Ridge, then Joliet, then
  plain ISO9660 8.3 names (``META_DAT.;1``), so images made by genisoimage, xorriso, pycdlib
  or a cloud's own tools are all read.
- FAT (vfat) is read with mtools (``mdir``, ``mtype``); ``mcopy -o`` rewrites a file, which is
  how K is wiped from a writable ``IMPRINT`` seed (see :func:`wipe_file`).

Outcomes, so that a channel can tell *absent* from *broken*: ``read()`` returns the bytes, or
``None`` when the file is simply not on the volume; everything else (not a filesystem imprint
reads, a corrupt or truncated image, a directory where a file belongs, a file over the size
limit, mtools missing) raises :class:`VolumeError` naming the fault. Messages never quote file
contents: a seed may carry K.
"""

from __future__ import annotations

import enum
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from imprint.fsatomic import fsync_path

# Seed files are a few hundred bytes; a bound keeps a hostile or mistaken volume from making
# the agent read megabytes into memory while it polls the boot channels.
MAX_FILE = 64 * 1024

ISO_MAGIC = b"CD001"
ISO_PVD_OFFSET = 0x8000  # system area (16 sectors of 2048 bytes) precedes the first descriptor
FAT_SIGNATURE = b"\x55\xaa"

# mtools must not depend on the caller's configuration: skip its geometry sanity check (image
# files made by mkfs.vfat -C rarely have a "disk-like" geometry) and keep its messages, which
# are parsed for "not found", in one language.
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
_TOOL_TIMEOUT = 30.0


class VolumeError(Exception):
    """The volume is present but cannot be read as a seed; the message names the fault."""


class Kind(enum.Enum):
    ISO9660 = "ISO9660"
    VFAT = "vfat"


class Volume(Protocol):
    kind: Kind
    device: Path

    def read(self, path: str, limit: int = MAX_FILE) -> bytes | None:
        """The file at ``path`` (absolute, ``/``-separated); None when it is not there."""
        ...


@dataclass(frozen=True)
class FatGeometry:
    """The parts of a FAT boot sector (BPB) needed to find a cluster on the device."""

    bytes_per_sector: int
    sectors_per_cluster: int
    reserved_sectors: int
    fats: int
    root_entries: int
    sectors_per_fat: int
    total_sectors: int

    @property
    def cluster_bytes(self) -> int:
        return self.bytes_per_sector * self.sectors_per_cluster

    @property
    def data_offset(self) -> int:
        root_dir_sectors = -(-self.root_entries * 32 // self.bytes_per_sector)
        first = self.reserved_sectors + self.fats * self.sectors_per_fat + root_dir_sectors
        return first * self.bytes_per_sector

    @property
    def clusters(self) -> int:
        return (self.total_sectors * self.bytes_per_sector - self.data_offset) // self.cluster_bytes

    def cluster_offset(self, cluster: int) -> int:
        # Data clusters are numbered from 2 (0 and 1 are reserved FAT entries).
        if not 2 <= cluster < self.clusters + 2:
            raise VolumeError(f"FAT cluster {cluster} is outside the volume (it has {self.clusters} clusters)")
        return self.data_offset + (cluster - 2) * self.cluster_bytes


def fat_geometry(boot_sector: bytes) -> FatGeometry | None:
    """The BPB of a FAT boot sector, or None when these bytes are not one.

    0x55AA alone also marks an MBR partition table, so the BPB must be plausible too.
    """
    if len(boot_sector) < 512 or boot_sector[510:512] != FAT_SIGNATURE:
        return None
    if not (boot_sector[0] == 0xEB and boot_sector[2] == 0x90) and boot_sector[0] != 0xE9:
        return None  # every FAT boot sector starts with a jump over the BPB
    bps, spc, reserved, fats, root_entries, total16, media, fat16 = struct.unpack_from("<HBHBHHBH", boot_sector, 11)
    total32, fat32 = struct.unpack_from("<I", boot_sector, 32)[0], struct.unpack_from("<I", boot_sector, 36)[0]
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
        return None
    if reserved == 0 or fats == 0 or not (media == 0xF0 or media >= 0xF8):
        return None
    sectors_per_fat = fat16 or fat32
    total = total16 or total32
    if sectors_per_fat == 0 or total == 0:
        return None
    return FatGeometry(bps, spc, reserved, fats, root_entries, sectors_per_fat, total)


def _device_size(fd: int) -> int:
    # lseek to the end works for regular files and block devices alike (st_size is 0 for the latter).
    return os.lseek(fd, 0, os.SEEK_END)


def _head(device: Path) -> tuple[bytes, int]:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VolumeError(f"cannot open {device}: {exc.strerror}") from None
    try:
        size = _device_size(fd)
        head = os.pread(fd, ISO_PVD_OFFSET + 2048, 0)
    except OSError as exc:
        raise VolumeError(f"cannot read {device}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return head, size


def detect(device: Path) -> Kind:
    """ISO9660 or vfat; raises VolumeError for anything else (or an unreadable device)."""
    head, size = _head(device)
    return _kind(head, size)


def _kind(head: bytes, size: int) -> Kind:
    if size == 0:
        raise VolumeError("the device is empty")
    # ISO first: an isohybrid image also carries 0x55AA (an MBR) at 510.
    if head[ISO_PVD_OFFSET + 1 : ISO_PVD_OFFSET + 6] == ISO_MAGIC:
        return Kind.ISO9660
    if fat_geometry(head[:512]) is not None:
        return Kind.VFAT
    raise VolumeError("it holds neither an ISO9660 nor a FAT filesystem (the only kinds a seed can be)")


def _components(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"not an absolute file path on a volume: {path!r}")
    return parts


# -- ISO9660


def iso9660_name(component: str, *, directory: bool = False) -> str:
    """The ISO9660 level-1 name a mastering tool gives ``component``: uppercase d-characters,
    anything else as ``_``, 8.3 for files with a ``;1`` version, 8 characters for directories.
    Used to read images without Rock Ridge or Joliet, and to write imprint's own."""

    def d_chars(text: str) -> str:
        return re.sub(r"[^A-Z0-9_]", "_", text.upper())

    if directory:
        return d_chars(component)[:8]
    stem, dot, ext = component.rpartition(".")
    if not dot:
        stem, ext = component, ""
    return f"{d_chars(stem)[:8]}.{d_chars(ext)[:3]};1"


def _iso_paths(path: str) -> list[str]:
    parts = _components(path)
    dirs = [iso9660_name(p, directory=True) for p in parts[:-1]]
    return ["/" + "/".join([*dirs, iso9660_name(parts[-1])])]


def _check_iso_size(head: bytes, size: int) -> None:
    """A truncated ISO is corrupt, not "file absent": pycdlib only notices truncation when it
    happens to read past the end, so compare the size the volume declares with the device."""
    pvd = head[ISO_PVD_OFFSET : ISO_PVD_OFFSET + 2048]
    if len(pvd) < 2048:
        raise VolumeError(f"ISO9660 image is truncated: {size} bytes, too short for a volume descriptor")
    blocks_le, blocks_be = struct.unpack_from("<I", pvd, 80)[0], struct.unpack_from(">I", pvd, 84)[0]
    block_le, block_be = struct.unpack_from("<H", pvd, 128)[0], struct.unpack_from(">H", pvd, 130)[0]
    if blocks_le != blocks_be or block_le != block_be:
        raise VolumeError("ISO9660 image is corrupt: the volume descriptor's both-endian sizes disagree")
    declared = blocks_le * block_le
    if declared > size:
        raise VolumeError(f"ISO9660 image is truncated: the volume declares {declared} bytes, the device has {size}")


class _IsoVolume:
    kind = Kind.ISO9660

    def __init__(self, device: Path, iso: Any) -> None:
        self.device = device
        self._iso = iso

    def _lookups(self, path: str) -> list[dict[str, str]]:
        lookups = []
        if self._iso.has_rock_ridge():
            lookups.append({"rr_path": path})
        if self._iso.has_joliet():
            lookups.append({"joliet_path": path})
        lookups += [{"iso_path": p} for p in _iso_paths(path)]
        return lookups

    def read(self, path: str, limit: int = MAX_FILE) -> bytes | None:
        from pycdlib.pycdlibexception import PyCdlibException, PyCdlibInvalidInput

        # A namespace that fails to look the name up (say, a record without its Rock Ridge
        # entry) may still hold it in the next one; the failure only counts if none does.
        failure: str | None = None
        for lookup in self._lookups(path):
            try:
                record = self._iso.get_record(**lookup)
            except PyCdlibInvalidInput as exc:
                if str(exc) != "Could not find path":  # pycdlib's own test for "not there"
                    failure = failure or str(exc)
                continue
            except IndexError:
                # pycdlib 1.12 indexes past the end of a Rock Ridge directory when the name sorts
                # after every entry; that is "not found" too.
                continue
            except PyCdlibException as exc:
                failure = failure or str(exc)
                continue
            if record.is_dir():
                raise VolumeError(f"{path} is a directory, not a file")
            try:
                with self._iso.open_file_from_iso(**lookup) as handle:
                    length = handle.length()
                    if length > limit:
                        raise VolumeError(f"{path} is {length} bytes, larger than the {limit} bytes a seed file may be")
                    data: bytes = handle.read(length)
            except PyCdlibException as exc:
                raise VolumeError(f"ISO9660 image is corrupt: {path}: {exc}") from None
            except OSError as exc:
                raise VolumeError(f"cannot read {path} from {self.device}: {exc.strerror}") from None
            if len(data) != length:
                raise VolumeError(f"ISO9660 image is truncated: {path} ends past the end of the device")
            return data
        if failure is not None:
            raise VolumeError(f"ISO9660 image is corrupt: {path}: {failure}")
        return None


@contextmanager
def _open_iso(device: Path, head: bytes, size: int) -> Iterator[_IsoVolume]:
    _check_iso_size(head, size)
    import pycdlib  # lazy: only a present ISO seed pays for it

    try:
        handle = open(device, "rb")  # pycdlib reads through it until closed
    except OSError as exc:
        raise VolumeError(f"cannot open {device}: {exc.strerror}") from None
    with handle:
        iso = pycdlib.PyCdlib()
        try:
            iso.open_fp(handle)
        except pycdlib.pycdlibexception.PyCdlibException as exc:
            raise VolumeError(f"ISO9660 image is corrupt: {exc}") from None
        except (struct.error, IndexError, KeyError, ValueError, UnicodeError, OverflowError) as exc:
            # pycdlib parses with struct and indexing; on bytes that are not an ISO those can
            # fail before its own checks do. Either way the image is corrupt.
            raise VolumeError(f"ISO9660 image is corrupt: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise VolumeError(f"cannot read {device}: {exc.strerror}") from None
        try:
            yield _IsoVolume(device, iso)
        finally:
            iso.close()


# -- FAT (mtools)


def _mtools(tool: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run([tool, *args], input=stdin, capture_output=True, timeout=_TOOL_TIMEOUT,
                              env={**os.environ, **_MTOOLS_ENV}, check=False)
    except FileNotFoundError:
        raise VolumeError(f"{tool} is not installed (mtools is needed to read a vfat seed)") from None
    except subprocess.TimeoutExpired:
        raise VolumeError(f"{tool} did not finish in {_TOOL_TIMEOUT:.0f} s") from None


def _mtools_fault(tool: str, result: subprocess.CompletedProcess[bytes]) -> str:
    message = " ".join(result.stderr.decode("utf-8", "replace").split())
    return f"{tool} failed: {message or f'exit status {result.returncode}'}"


def _not_found(result: subprocess.CompletedProcess[bytes]) -> bool:
    # mtools says 'File "::/x" not found' for a missing file or directory, and "Cannot
    # initialize" (non DOS media, bad FAT) when the filesystem itself is unreadable.
    text = result.stderr.decode("utf-8", "replace")
    return "not found" in text and "Cannot initialize" not in text


class _FatVolume:
    kind = Kind.VFAT

    def __init__(self, device: Path, geometry: FatGeometry) -> None:
        self.device = device
        self.geometry = geometry

    @property
    def image(self) -> str:
        # Absolute, so that a relative path starting with "-" is never read as an option.
        return str(self.device.absolute())

    def entry(self, path: str) -> str | None:
        """'file' or 'dir' for the entry at ``path``, None when absent."""
        parts = _components(path)
        parent = "::/" + "/".join(parts[:-1])
        result = _mtools("mdir", "-b", "-a", "-i", self.image, parent)
        if result.returncode != 0:
            if _not_found(result):
                return None
            raise VolumeError(f"FAT filesystem is corrupt: {_mtools_fault('mdir', result)}")
        want = ("::/" + "/".join(parts)).lower()
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            # -b lists one entry per line, its full path; directories end with "/". FAT names
            # are case-insensitive.
            name = line.rstrip("\r").lower()
            if name == want:
                return "file"
            if name == want + "/":
                return "dir"
        return None

    def read(self, path: str, limit: int = MAX_FILE) -> bytes | None:
        found = self.entry(path)
        if found is None:
            return None
        if found == "dir":
            raise VolumeError(f"{path} is a directory, not a file")
        target = "::/" + "/".join(_components(path))
        try:
            proc = subprocess.Popen(["mtype", "-i", self.image, target], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={**os.environ, **_MTOOLS_ENV})
        except FileNotFoundError:
            raise VolumeError("mtype is not installed (mtools is needed to read a vfat seed)") from None
        assert proc.stdout is not None
        # Read at most limit + 1 bytes: a huge file is refused without holding it in memory.
        data = proc.stdout.read(limit + 1)
        if len(data) > limit:
            proc.kill()
            proc.communicate()
            raise VolumeError(f"{path} is larger than the {limit} bytes a seed file may be")
        try:
            _, stderr = proc.communicate(timeout=_TOOL_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise VolumeError(f"mtype did not finish in {_TOOL_TIMEOUT:.0f} s") from None
        # mtype can report a broken cluster chain ("Bad FAT entry") and still exit 0 with
        # nothing on stdout; any complaint means the content cannot be trusted.
        if proc.returncode != 0 or stderr.strip():
            result = subprocess.CompletedProcess(proc.args, proc.returncode, b"", stderr)
            raise VolumeError(f"FAT filesystem is corrupt: {_mtools_fault('mtype', result)}")
        return data

    def clusters(self, path: str) -> list[int]:
        """The data clusters of the file at ``path`` (empty when absent or empty)."""
        target = "::/" + "/".join(_components(path))
        result = _mtools("mshowfat", "-i", self.image, target)
        if result.returncode != 0:
            if _not_found(result):
                return []
            raise VolumeError(f"FAT filesystem is corrupt: {_mtools_fault('mshowfat', result)}")
        # Output: '::/token <5-7> <12>' (ranges of cluster numbers).
        found: list[int] = []
        for first, last in re.findall(r"<(\d+)(?:-(\d+))?>", result.stdout.decode("ascii", "replace")):
            found.extend(range(int(first), int(last or first) + 1))
        return found


def write_file(device: Path, path: str, data: bytes) -> None:
    """Create or replace the file at ``path`` on a vfat volume (``mcopy -o``), creating its
    directories; ISO9660 is read-only, so it raises VolumeError there."""
    head, size = _head(device)
    if _kind(head, size) is not Kind.VFAT:
        raise VolumeError("an ISO9660 volume is read-only")
    volume = _FatVolume(device, _fat(head))
    image = volume.image
    parts = _components(path)
    for depth in range(1, len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if volume.entry(directory) is None:
            result = _mtools("mmd", "-i", image, "::" + directory)
            if result.returncode != 0:
                raise VolumeError(_mtools_fault("mmd", result))
    # "-" makes mcopy read the content from stdin: no copy of it lands in a temporary file.
    result = _mtools("mcopy", "-o", "-i", image, "-", "::/" + "/".join(parts), stdin=data)
    if result.returncode != 0:
        raise VolumeError(_mtools_fault("mcopy", result))


def _fat(head: bytes) -> FatGeometry:
    geometry = fat_geometry(head[:512])
    if geometry is None:  # detect() said FAT, so this is only for the type checker
        raise VolumeError("not a FAT filesystem")
    return geometry


def wipe_file(device: Path, path: str, replacement: bytes) -> None:
    """Destroy the content of ``path`` on a vfat volume, then write ``replacement`` there.

    ``mcopy -o`` alone frees the old clusters without clearing them, so K would stay readable
    on the device. The file's clusters are therefore zeroed in place first (whole clusters,
    the slack after the end of the file too), synced, and only then is the file replaced. A
    crash in between leaves a file of NUL bytes, which reads as a broken channel, never as K.
    The volume must not be mounted meanwhile (the kernel's cached copy would win).
    """
    head, size = _head(device)
    if _kind(head, size) is not Kind.VFAT:
        raise VolumeError("an ISO9660 volume is read-only")
    geometry = _fat(head)
    volume = _FatVolume(device, geometry)
    if volume.entry(path) == "file":
        offsets = [geometry.cluster_offset(c) for c in volume.clusters(path)]
        if any(offset + geometry.cluster_bytes > size for offset in offsets):
            raise VolumeError(f"{path} has clusters past the end of the device")
        zeros = bytes(geometry.cluster_bytes)
        try:
            fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise VolumeError(f"cannot open {device} for writing: {exc.strerror}") from None
        try:
            for offset in offsets:
                os.pwrite(fd, zeros, offset)
            os.fsync(fd)
        except OSError as exc:
            raise VolumeError(f"cannot write {device}: {exc.strerror}") from None
        finally:
            os.close(fd)
    write_file(device, path, replacement)
    try:
        fsync_path(device)
    except OSError as exc:
        raise VolumeError(f"cannot sync {device}: {exc.strerror}") from None


def writable(device: Path) -> bool:
    """Whether the device can be opened for writing (a read-only virtio disk or a CD cannot)."""
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@contextmanager
def open_volume(device: Path) -> Iterator[Volume]:
    """The filesystem on ``device`` (a block device or an image file), for reading files."""
    head, size = _head(device)
    kind = _kind(head, size)
    if kind is Kind.ISO9660:
        with _open_iso(device, head, size) as iso:
            yield iso
    else:
        geometry = _fat(head)
        declared = geometry.total_sectors * geometry.bytes_per_sector
        # mtools reads a truncated image without complaint until it reaches the missing part.
        if declared > size:
            raise VolumeError(f"FAT filesystem is truncated: the volume declares {declared} bytes, "
                              f"the device has {size}")
        yield _FatVolume(device, geometry)
