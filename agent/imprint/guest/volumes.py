"""Read small files from a filesystem on a block device or image file, without mounting it.

Seeds (NoCloud ``cidata``, OpenStack ``config-2``, imprint's own ``IMPRINT``) are ISO9660 or FAT
filesystems. Mounting them would need privileges, a mount point and care about what the kernel
does with a hostile image; reading them in user space needs none of that and works the same on
a test root, where ``/dev/disk/by-label/<LABEL>`` is a symlink to an image file.

- ISO9660 is read by imprint's own bounded reader (:mod:`imprint.guest.iso9660`), which follows
  only the path asked for: a seed is someone else's image, and a general reader that walks the
  whole tree on open loops on a directory cycle. Rock Ridge, Joliet and plain ISO9660 8.3 names
  (``META_DAT.;1``) are read, so images made by genisoimage, xorriso, pycdlib or a cloud's own
  tools are all read. (pycdlib stays on the site's side, which builds images.)
- FAT (vfat) is read with mtools (``mdir``, ``mtype``; the names come from the caller's
  :class:`~imprint.guest.distro.Programs`); ``mcopy -o`` rewrites a file, which is
  how K is wiped from a writable ``IMPRINT`` seed (see :func:`wipe_file`). Each run has an
  overall deadline and a bound on its output (:func:`imprint.boundedio.run_tool`), any complaint
  on stderr makes the volume corrupt (mtools reports a cluster chain loop and goes on), and the
  size a directory entry declares must be what its clusters hold (mtools silently outputs the
  chain when the size is a lie).
- The device is opened without blocking and must be a block device or an image file: a FIFO
  under the label is refused at once.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imprint import boundedio
from imprint.fsatomic import fsync_path
from imprint.guest import iso9660
from imprint.guest.distro import Programs
from imprint.safetext import printable

# Seed files are a few hundred bytes; a bound keeps a hostile or mistaken volume from making
# the agent read megabytes into memory while it polls the boot channels.
MAX_FILE = 64 * 1024
DEFAULT_PROGRAMS = Programs()

ISO_MAGIC = iso9660.ISO_MAGIC
ISO_PVD_OFFSET = iso9660.DESCRIPTORS_OFFSET
FAT_SIGNATURE = b"\x55\xaa"

# mtools must not depend on the caller's configuration: skip its geometry sanity check (image
# files made by mkfs.vfat -C rarely have a "disk-like" geometry) and keep its messages, which
# are parsed for "not found", in one language.
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
# mtools answers a seed-sized volume in milliseconds; the deadline covers a whole run.
TOOL_TIMEOUT = 10.0
# A listing of one entry is a few hundred bytes; this only stops a runaway one.
MAX_TOOL_OUTPUT = 256 * 1024


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


def _open_device(device: Path, *, write: bool = False) -> int:
    """A descriptor for ``device`` (udev's by-label link is followed on purpose), known to be a
    block device or an image file: a FIFO or a directory under the label is refused at once."""
    try:
        fd = boundedio.open_checked(device, boundedio.FileType.DEVICE, follow_links=True, write=write)
    except boundedio.InputError as exc:
        raise VolumeError(str(exc)) from None
    if fd is None:
        raise VolumeError(f"cannot open {device}: it went away")
    return fd


def _head_of(fd: int, device: Path) -> tuple[bytes, int]:
    try:
        return os.pread(fd, ISO_PVD_OFFSET + 2048, 0), boundedio.device_size(fd)
    except OSError as exc:
        raise VolumeError(f"cannot read {device}: {exc.strerror}") from None


def _head(device: Path) -> tuple[bytes, int]:
    fd = _open_device(device)
    try:
        return _head_of(fd, device)
    finally:
        os.close(fd)


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
    geometry = fat_geometry(head[:512])
    if geometry is not None:
        # Checked before mtools sees it: a FAT32 BPB (no fixed root directory) whose tables end
        # beyond the device made mtools spend ~9 s on one 512-byte image (found by fuzz_vfat).
        # FAT12/16 fields that disagree are mtools' to report, as it does at once.
        if geometry.root_entries == 0 and geometry.data_offset >= size:
            raise VolumeError(f"FAT filesystem is truncated: its tables end at byte {geometry.data_offset}, "
                              f"beyond the device's {size} bytes")
        return Kind.VFAT
    raise VolumeError("it holds neither an ISO9660 nor a FAT filesystem (the only kinds a seed can be)")


def _components(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"not an absolute file path on a volume: {path!r}")
    return parts


# -- ISO9660


class _IsoVolume:
    kind = Kind.ISO9660

    def __init__(self, device: Path, fd: int, size: int) -> None:
        self.device = device
        self._fd = fd
        try:
            self._image = iso9660.Image(self._read_at, size)
        except iso9660.IsoError as exc:
            raise VolumeError(str(exc)) from None

    def _read_at(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self._fd, size, offset)
        except OSError as exc:
            raise VolumeError(f"cannot read {self.device}: {exc.strerror}") from None

    def read(self, path: str, limit: int = MAX_FILE) -> bytes | None:
        _components(path)
        try:
            return self._image.read(path, limit)
        except iso9660.IsoError as exc:
            raise VolumeError(str(exc)) from None


# -- FAT (mtools)


def _mtools(tool: str, *args: str, stdin: bytes = b"", limit: int = MAX_TOOL_OUTPUT) -> boundedio.ToolResult:
    try:
        return boundedio.run_tool([tool, *args], stdin=stdin, limit=limit, timeout=TOOL_TIMEOUT,
                                  env={**os.environ, **_MTOOLS_ENV})
    except boundedio.ToolMissing as exc:
        raise VolumeError(f"{exc} (mtools is needed to read a vfat seed)") from None
    except boundedio.InputError as exc:
        raise VolumeError(f"FAT filesystem is corrupt or too large: {exc}") from None


def _mtools_fault(tool: str, result: boundedio.ToolResult) -> str:
    message = " ".join(result.stderr.decode("utf-8", "replace").split())
    return f"{tool} failed: {printable(message, 300) or f'exit status {result.returncode}'}"


def _not_found(result: boundedio.ToolResult) -> bool:
    # mtools says 'File "::/x" not found' for a missing file or directory, and "Cannot
    # initialize" (non DOS media, bad FAT) when the filesystem itself is unreadable.
    text = result.stderr.decode("utf-8", "replace")
    return "not found" in text and "Cannot initialize" not in text


# mdir's listing of one file ends with its count and total size ("1 file   6 756 bytes").
_LISTED_DIRECTORY = re.compile(rb"^Directory for (.*?)\r?$", re.MULTILINE)
_LISTED_FILES = re.compile(rb"^\s*(\d+) files?\s+([\d ]+) bytes\r?$", re.MULTILINE)


class _FatVolume:
    kind = Kind.VFAT

    def __init__(self, device: Path, geometry: FatGeometry, programs: Programs) -> None:
        self.device = device
        self.geometry = geometry
        self.programs = programs

    @property
    def image(self) -> str:
        # Absolute, so that a relative path starting with "-" is never read as an option.
        return str(self.device.absolute())

    def stat(self, path: str) -> tuple[str, int] | None:
        """('file', declared size) or ('dir', 0) for the entry at ``path``; None when absent.

        ``mdir -a -f ::/x`` lists the directory itself when x is one, else x's own entry under its
        parent's heading. Any complaint (a cluster chain loop, a bad FAT entry) is corruption."""
        target = "::/" + "/".join(_components(path))
        result = _mtools(self.programs.mdir, "-a", "-f", "-i", self.image, target)
        if result.returncode != 0:
            if _not_found(result):
                return None
            raise VolumeError(f"FAT filesystem is corrupt: {_mtools_fault('mdir', result)}")
        if result.stderr.strip():
            raise VolumeError(f"FAT filesystem is corrupt: {_mtools_fault('mdir', result)}")
        heading = _LISTED_DIRECTORY.search(result.stdout)
        if heading is None:
            raise VolumeError(f"FAT filesystem: mdir gave no listing for {path}")
        if heading.group(1).decode("utf-8", "replace").rstrip("/").lower() == target.lower():
            return ("dir", 0)
        summary = _LISTED_FILES.search(result.stdout)
        if summary is None:
            raise VolumeError(f"FAT filesystem: mdir did not give the size of {path}")
        if summary.group(1) != b"1":
            raise VolumeError(f"FAT filesystem is corrupt: {int(summary.group(1))} entries are named {path}")
        return ("file", int(summary.group(2).replace(b" ", b"")))

    def entry(self, path: str) -> str | None:
        """'file' or 'dir' for the entry at ``path``, None when absent."""
        found = self.stat(path)
        return None if found is None else found[0]

    def read(self, path: str, limit: int = MAX_FILE) -> bytes | None:
        found = self.stat(path)
        if found is None:
            return None
        kind, declared = found
        if kind == "dir":
            raise VolumeError(f"{path} is a directory, not a file")
        if declared > limit:
            raise VolumeError(f"{path} is {declared} bytes, larger than the {limit} bytes a seed file may be")
        target = "::/" + "/".join(_components(path))
        try:
            result = boundedio.run_tool([self.programs.mtype, "-i", self.image, target], limit=limit,
                                        timeout=TOOL_TIMEOUT, env={**os.environ, **_MTOOLS_ENV})
        except boundedio.TooLarge:
            raise VolumeError(f"{path} is larger than the {limit} bytes a seed file may be") from None
        except boundedio.ToolMissing as exc:
            raise VolumeError(f"{exc} (mtools is needed to read a vfat seed)") from None
        except boundedio.InputError as exc:
            raise VolumeError(f"FAT filesystem is corrupt or unreadable: {exc}") from None
        # mtype can report a broken cluster chain ("Bad FAT entry", "loop detected") and still
        # exit 0; any complaint means the content cannot be trusted.
        if result.returncode != 0 or result.stderr.strip():
            raise VolumeError(f"FAT filesystem is corrupt: {_mtools_fault('mtype', result)}")
        if len(result.stdout) != declared:
            raise VolumeError(f"FAT filesystem is corrupt: {path} declares {declared} bytes, "
                              f"its clusters hold {len(result.stdout)}")
        return result.stdout

    def clusters(self, path: str) -> list[int]:
        """The data clusters of the file at ``path`` (empty when absent or empty)."""
        target = "::/" + "/".join(_components(path))
        result = _mtools(self.programs.mshowfat, "-i", self.image, target)
        if result.returncode != 0 or result.stderr.strip():
            if result.returncode != 0 and _not_found(result):
                return []
            raise VolumeError(f"FAT filesystem is corrupt: {_mtools_fault('mshowfat', result)}")
        # Output: '::/token <5-7> <12>' (ranges of cluster numbers).
        found: list[int] = []
        for first, last in re.findall(rb"<(\d+)(?:-(\d+))?>", result.stdout):
            start, stop = int(first), int(last or first)
            if not 2 <= start <= stop < self.geometry.clusters + 2:
                raise VolumeError(f"{path} has clusters outside the volume")
            found.extend(range(start, stop + 1))
            if len(found) > self.geometry.clusters:
                raise VolumeError(f"{path} has more clusters than the volume (its chain loops)")
        return found


def write_file(device: Path, path: str, data: bytes, programs: Programs = DEFAULT_PROGRAMS) -> None:
    """Create or replace the file at ``path`` on a vfat volume (``mcopy -o``), creating its
    directories; ISO9660 is read-only, so it raises VolumeError there."""
    head, size = _head(device)
    if _kind(head, size) is not Kind.VFAT:
        raise VolumeError("an ISO9660 volume is read-only")
    volume = _FatVolume(device, _fat(head), programs)
    image = volume.image
    parts = _components(path)
    for depth in range(1, len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if volume.entry(directory) is None:
            result = _mtools(programs.mmd, "-i", image, "::" + directory)
            if result.returncode != 0:
                raise VolumeError(_mtools_fault("mmd", result))
    # "-" makes mcopy read the content from stdin: no copy of it lands in a temporary file.
    result = _mtools(programs.mcopy, "-o", "-i", image, "-", "::/" + "/".join(parts), stdin=data)
    if result.returncode != 0:
        raise VolumeError(_mtools_fault("mcopy", result))


def _fat(head: bytes) -> FatGeometry:
    geometry = fat_geometry(head[:512])
    if geometry is None:  # detect() said FAT, so this is only for the type checker
        raise VolumeError("not a FAT filesystem")
    return geometry


def wipe_file(device: Path, path: str, replacement: bytes, programs: Programs = DEFAULT_PROGRAMS) -> None:
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
    volume = _FatVolume(device, geometry, programs)
    if volume.entry(path) == "file":
        offsets = [geometry.cluster_offset(c) for c in volume.clusters(path)]
        if any(offset + geometry.cluster_bytes > size for offset in offsets):
            raise VolumeError(f"{path} has clusters past the end of the device")
        zeros = bytes(geometry.cluster_bytes)
        fd = _open_device(device, write=True)
        try:
            for offset in offsets:
                os.pwrite(fd, zeros, offset)
            os.fsync(fd)
        except OSError as exc:
            raise VolumeError(f"cannot write {device}: {exc.strerror}") from None
        finally:
            os.close(fd)
    write_file(device, path, replacement, programs)
    try:
        fsync_path(device)
    except OSError as exc:
        raise VolumeError(f"cannot sync {device}: {exc.strerror}") from None


def writable(device: Path) -> bool:
    """Whether the device can be opened for writing (a read-only virtio disk or a CD cannot)."""
    try:
        fd = _open_device(device, write=True)
    except VolumeError:
        return False
    os.close(fd)
    return True


@contextmanager
def open_volume(device: Path, programs: Programs = DEFAULT_PROGRAMS) -> Iterator[Volume]:
    """The filesystem on ``device`` (a block device or an image file), for reading files; a vfat
    one is read with ``programs``' mtools."""
    fd = _open_device(device)
    try:
        head, size = _head_of(fd, device)
        kind = _kind(head, size)
        if kind is Kind.ISO9660:
            yield _IsoVolume(device, fd, size)
            return
        geometry = _fat(head)
        declared = geometry.total_sectors * geometry.bytes_per_sector
        # mtools reads a truncated image without complaint until it reaches the missing part.
        if declared > size:
            raise VolumeError(f"FAT filesystem is truncated: the volume declares {declared} bytes, "
                              f"the device has {size}")
        yield _FatVolume(device, geometry, programs)
    finally:
        os.close(fd)
