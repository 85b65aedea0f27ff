"""A bounded ISO9660 reader: looks up the few files a seed channel asks for, and nothing else.

A seed is someone else's image: a general reader (pycdlib) walks and indexes the whole tree when it
opens it, so a directory that points back at the root makes it loop with memory growing without
bound. This reader never walks a tree: it follows one path, component by component, reading only
the directories on it, each bounded in size, with a visited set so that a cycle on the path is
refused; the image's other directories are never read.

What it reads: the primary volume descriptor; a Joliet supplementary descriptor (UCS-2 names);
Rock Ridge names (SUSP ``NM`` entries, continuation areas ``CE`` followed a bounded number of
times); plain ISO9660 identifiers (``META_DAT.;1``), as the mastering tools write them. One name
space is used, as a mount would show it: Rock Ridge when the root carries the SUSP ``SP`` entry
(a record without ``NM`` is known by its ISO9660 name there, as under Linux), else Joliet when
present, else ISO9660 names. Two entries that answer to the same name are refused, not chosen
between. Not read: multi-extent and interleaved files, Rock Ridge relocated directories (seed
files sit one to three levels deep, relocation starts at eight).

Errors are :class:`IsoError`, whose message begins with the fault class ("ISO9660 image is
corrupt:" or "... is truncated:") and never quotes file contents.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SECTOR = 2048  # descriptors and directory records are laid out in 2048-byte sectors
DESCRIPTORS_OFFSET = 16 * SECTOR  # after the system area
ISO_MAGIC = b"CD001"
MAX_DESCRIPTORS = 32  # a boot record, a primary, a Joliet, a terminator: a few in practice
MAX_DIRECTORY = 512 * 1024  # ~10,000 records; a seed's directory holds a handful
MAX_DEPTH = 8
MAX_CONTINUATIONS = 8  # Rock Ridge CE areas per directory record
_JOLIET_ESCAPES = (b"%/@", b"%/C", b"%/E")
_DIRECTORY, _ASSOCIATED, _MULTI_EXTENT = 0x02, 0x04, 0x80

# (offset, size) -> bytes, short at the end of the device.
ReadAt = Callable[[int, int], bytes]


class IsoError(Exception):
    """The image cannot be read as a seed; the message names the fault."""


def _corrupt(fault: str) -> IsoError:
    return IsoError(f"ISO9660 image is corrupt: {fault}")


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


def _plain_key(identifier: str) -> str:
    """An ISO9660 identifier without its version and a trailing dot (``META_DAT.;1`` -> ``META_DAT``)."""
    return identifier.partition(";")[0].rstrip(".").upper()


def _both_endian(data: bytes, offset: int, size: int, what: str) -> int:
    little = int.from_bytes(data[offset : offset + size], "little")
    big = int.from_bytes(data[offset + size : offset + 2 * size], "big")
    if little != big:
        raise _corrupt(f"{what}: the two copies of its {'extent location' if size == 4 else 'value'} disagree")
    return little


@dataclass(frozen=True)
class _Record:
    extent: int
    size: int
    flags: int
    xattr_blocks: int
    interleaved: bool
    identifier: bytes
    rr_name: bytes | None = None
    relocated: bool = False  # Rock Ridge RE: hidden in the Rock Ridge view
    child_link: bool = False  # Rock Ridge CL: a placeholder for a relocated directory

    @property
    def is_dir(self) -> bool:
        return bool(self.flags & _DIRECTORY)

    @property
    def is_self_or_parent(self) -> bool:
        return self.identifier in (b"\x00", b"\x01")


def _parse_record(raw: bytes, what: str) -> tuple[_Record, bytes]:
    """A directory record and its system use area."""
    if len(raw) < 34 or raw[0] < 34 or raw[0] > len(raw):
        raise _corrupt(f"{what} is cut short")
    length = raw[0]
    extent = _both_endian(raw, 2, 4, what)
    size = _both_endian(raw, 10, 4, what)
    name_length = raw[32]
    if 33 + name_length > length:
        raise _corrupt(f"{what}: its name runs past the end of the record")
    identifier = raw[33 : 33 + name_length]
    system_use = raw[33 + name_length + (1 - name_length % 2) : length]
    record = _Record(extent=extent, size=size, flags=raw[25], xattr_blocks=raw[1],
                     interleaved=bool(raw[26] or raw[27]), identifier=identifier)
    return record, system_use


@dataclass(frozen=True)
class _Tree:
    root: _Record
    joliet: bool


class Image:
    """An ISO9660 image read through ``read_at``; ``size`` is the device's size in bytes."""

    def __init__(self, read_at: ReadAt, size: int) -> None:
        self._read_at = read_at
        self._size = size
        self.block = SECTOR
        self.volume_bytes = 0
        primary, joliet = self._descriptors()
        root, _ = _parse_record(primary[156:190], "the root directory record")
        self._primary = _Tree(root, joliet=False)
        self._joliet_descriptor = joliet
        self._rr_skip = self._rock_ridge_skip()

    @property
    def has_joliet(self) -> bool:
        return self._joliet_descriptor is not None

    @property
    def has_rock_ridge(self) -> bool:
        return self._rr_skip is not None

    # -- reading, bounded

    def _read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or offset + size > self.volume_bytes:
            raise _corrupt(f"{what} lies outside the volume")
        data = self._read_at(offset, size)
        if len(data) != size:
            raise IsoError(f"ISO9660 image is truncated: {what} ends past the end of the device")
        return data

    def _check_size(self, primary: bytes) -> None:
        """A truncated image is corrupt, not "file absent": compare the size the volume declares."""
        self.block = _both_endian(primary, 128, 2, "the primary volume descriptor's block size")
        if self.block not in (512, 1024, 2048):
            raise _corrupt(f"logical block size {self.block} (ISO9660 allows 512, 1024 or 2048)")
        blocks = _both_endian(primary, 80, 4, "the primary volume descriptor's volume size")
        self.volume_bytes = blocks * self.block
        if self.volume_bytes > self._size:
            raise IsoError(f"ISO9660 image is truncated: the volume declares {self.volume_bytes} bytes, "
                           f"the device has {self._size}")

    def _descriptors(self) -> tuple[bytes, bytes | None]:
        primary: bytes | None = None
        joliet: bytes | None = None
        for index in range(MAX_DESCRIPTORS):
            offset = DESCRIPTORS_OFFSET + index * SECTOR
            descriptor = self._read_at(offset, SECTOR)
            if len(descriptor) < SECTOR:
                raise IsoError(f"ISO9660 image is truncated: {self._size} bytes, the volume descriptors "
                               f"end past the end of the device")
            if descriptor[1:6] != ISO_MAGIC:
                raise _corrupt(f"volume descriptor {index} has no {ISO_MAGIC.decode()} identifier")
            kind = descriptor[0]
            if kind == 255:
                break
            if kind == 1 and primary is None:
                self._check_size(descriptor)
                primary = descriptor
            elif kind == 2 and joliet is None and any(e in descriptor[88:120] for e in _JOLIET_ESCAPES):
                joliet = descriptor
        else:
            raise _corrupt(f"no volume descriptor set terminator in the first {MAX_DESCRIPTORS} descriptors")
        if primary is None:
            raise _corrupt("no primary volume descriptor")
        return primary, joliet

    def _records(self, directory: _Record, what: str) -> Iterator[tuple[_Record, bytes]]:
        if directory.size > MAX_DIRECTORY:
            raise _corrupt(f"{what} is {directory.size} bytes (a seed's directories hold at most {MAX_DIRECTORY})")
        data = self._read((directory.extent + directory.xattr_blocks) * self.block, directory.size, what)
        position = 0
        while position < len(data):
            length = data[position]
            if length == 0:  # the rest of this sector is padding: records never cross a sector
                position = (position // SECTOR + 1) * SECTOR
                continue
            end = position + length
            if end > len(data) or position // SECTOR != (end - 1) // SECTOR:
                raise _corrupt(f"{what}: a record crosses the end of its sector")
            yield _parse_record(data[position:end], f"a record in {what}")
            position = end

    # -- Rock Ridge (SUSP)

    def _rock_ridge_skip(self) -> int | None:
        """SUSP's skip length when the root's first record carries the SP entry, else None."""
        for record, system_use in self._records(self._primary.root, "the root directory"):
            # Only the first record (".") may carry SP, at the very start of its system use area.
            if record.is_self_or_parent and system_use[:2] == b"SP" and system_use[4:6] == b"\xbe\xef" \
                    and len(system_use) >= 7:
                return system_use[6]
            return None
        return None

    def _susp_entries(self, system_use: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
        areas = [system_use]
        seen: set[tuple[int, int]] = set()
        while areas:
            area = areas.pop(0)
            position = 0
            while position + 4 <= len(area):
                signature, length = area[position : position + 2], area[position + 2]
                if length < 4 or position + length > len(area):
                    break  # padding or a damaged tail: no further entries in this area
                data = area[position + 4 : position + length]
                position += length
                if signature == b"ST":
                    break
                if signature != b"CE":
                    yield signature, data
                    continue
                if len(data) < 24:
                    raise _corrupt(f"{what}: a Rock Ridge continuation entry is cut short")
                block = _both_endian(data, 0, 4, f"{what}: a Rock Ridge continuation entry")
                offset = _both_endian(data, 8, 4, f"{what}: a Rock Ridge continuation entry")
                size = _both_endian(data, 16, 4, f"{what}: a Rock Ridge continuation entry")
                if (block, offset) in seen or len(seen) >= MAX_CONTINUATIONS:
                    raise _corrupt(f"{what}: Rock Ridge continuation areas loop or are too many")
                if offset + size > self.block:
                    raise _corrupt(f"{what}: a Rock Ridge continuation area runs past its block")
                seen.add((block, offset))
                areas.append(self._read(block * self.block + offset, size, f"{what}: a Rock Ridge continuation area"))

    def _with_rock_ridge(self, record: _Record, system_use: bytes, what: str) -> _Record:
        assert self._rr_skip is not None
        name: bytes | None = None
        relocated = child_link = False
        for signature, data in self._susp_entries(system_use[self._rr_skip :], what):
            if signature == b"NM" and data and not data[0] & 0x06:  # 0x02/0x04: "." and ".."
                name = (name or b"") + data[1:]
            elif signature == b"RE":
                relocated = True
            elif signature == b"CL":
                child_link = True
        return _Record(record.extent, record.size, record.flags, record.xattr_blocks, record.interleaved,
                       record.identifier, rr_name=name, relocated=relocated, child_link=child_link)

    # -- names

    @staticmethod
    def _matches(record: _Record, tree: _Tree, component: str) -> bool:
        """Whether ``record`` is the entry named ``component`` in the name space used."""
        if tree.joliet:
            return len(record.identifier) % 2 == 0 and \
                record.identifier.decode("utf-16-be", "replace").partition(";")[0] == component
        if record.rr_name is not None:
            return record.rr_name == component.encode("utf-8")
        wanted = _plain_key(iso9660_name(component, directory=record.is_dir))
        return _plain_key(record.identifier.decode("ascii", "replace")) == wanted

    def _tree(self) -> _Tree:
        """The tree whose names are used; a Joliet descriptor is parsed only when it is that one,
        so damage in a tree the agent does not use cannot break someone else's seed."""
        if self.has_rock_ridge or self._joliet_descriptor is None:
            return self._primary
        joliet_root, _ = _parse_record(self._joliet_descriptor[156:190], "the Joliet root directory record")
        return _Tree(joliet_root, joliet=True)

    def lookup(self, path: str) -> _Record | None:
        """The record of the file or directory at ``path``; None when it is not there."""
        parts = [part for part in path.split("/") if part]
        if not parts or len(parts) > MAX_DEPTH or any(part in (".", "..") for part in parts):
            raise ValueError(f"not an absolute path of at most {MAX_DEPTH} components on a volume: {path!r}")
        tree = self._tree()
        rock_ridge = self.has_rock_ridge and not tree.joliet
        directory, where = tree.root, "the root directory"
        visited = {directory.extent}
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            found: _Record | None = None
            for record, system_use in self._records(directory, where):
                if record.is_self_or_parent or record.flags & _ASSOCIATED:
                    continue
                if rock_ridge:
                    record = self._with_rock_ridge(record, system_use, where)
                    if record.relocated:
                        continue
                if not self._matches(record, tree, part):
                    continue
                if found is not None:
                    raise _corrupt(f"{where} has two entries named {part!r}")
                found = record
            if found is None:
                return None
            if found.child_link:
                raise _corrupt(f"/{'/'.join(parts[: depth + 1])} is a relocated Rock Ridge directory, "
                               "which a seed never needs")
            if last:
                return found
            if not found.is_dir:
                return None  # a file where a directory belongs: the path is not there
            if found.extent in visited:
                raise _corrupt(f"/{'/'.join(parts[: depth + 1])} points back at a directory above it (a cycle)")
            visited.add(found.extent)
            directory, where = found, f"directory /{'/'.join(parts[: depth + 1])}"
        return None  # not reached: the loop returns at the last component

    def read(self, path: str, limit: int) -> bytes | None:
        """The content of the file at ``path``, at most ``limit`` bytes; None when it is not there."""
        record = self.lookup(path)
        if record is None:
            return None
        if record.is_dir:
            raise IsoError(f"{path} is a directory, not a file")
        if record.flags & _MULTI_EXTENT or record.interleaved:
            raise IsoError(f"{path} is stored in several or interleaved extents, which a seed file never is")
        if record.size > limit:
            raise IsoError(f"{path} is {record.size} bytes, larger than the {limit} bytes a seed file may be")
        return self._read((record.extent + record.xattr_blocks) * self.block, record.size, path)

