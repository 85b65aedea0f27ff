"""The agent's ISO9660 reader (imprint.guest.iso9660) on arbitrary images.

The input is an image without its 32 KiB system area (zeros, which the reader never looks at), so
the fuzzer starts at the volume descriptors; bytes past the end of the input read as zeros up to
the size the primary descriptor declares (at most 16 MiB), so a small input can still describe a
whole volume. Every path a seed channel looks up is read. Only IsoError may leave; a file read is
never larger than the limit asked for.
"""

from __future__ import annotations

from imprint.guest import iso9660

SYSTEM_AREA = bytes(iso9660.DESCRIPTORS_OFFSET)
MAX_SIZE = 16 * 1024 * 1024
LIMIT = 64 * 1024
PATHS = ("/meta-data", "/imprint", "/token", "/user-data", "/openstack/latest/meta_data.json")
FLAGS = ["-max_len=65536"]


def _declared(image: bytes) -> int:
    pvd = image[iso9660.DESCRIPTORS_OFFSET : iso9660.DESCRIPTORS_OFFSET + 2048]
    if len(pvd) < 132:
        return 0
    return int.from_bytes(pvd[80:84], "little") * int.from_bytes(pvd[128:130], "little")


def test_one_input(data: bytes) -> None:
    image = SYSTEM_AREA + data
    size = min(max(len(image), _declared(image)), MAX_SIZE)

    def read_at(offset: int, count: int) -> bytes:
        assert offset >= 0 and count >= 0, (offset, count)
        end = min(offset + count, size)
        chunk = image[offset:end]
        return chunk + bytes(max(end - offset, 0) - len(chunk))

    try:
        volume = iso9660.Image(read_at, size)
    except iso9660.IsoError:
        return
    for path in PATHS:
        try:
            content = volume.read(path, LIMIT)
        except iso9660.IsoError:
            continue
        assert content is None or len(content) <= LIMIT
