"""vfat seeds: the FAT boot sector parser (imprint.guest.volumes.fat_geometry) on every input, and
for one input in eight (chosen by a CRC of the input: deterministic, whatever the mutation) the
whole read through mtools
(volumes.open_volume, then every seed file), on an image file in a private temporary directory.

The image is the input padded with zeros to the size its boot sector declares (at most 4 MiB), so
small inputs describe whole volumes. Only VolumeError may leave; a geometry accepted is
consistent (a cluster offset lies in the data area); a file read is never larger than the limit.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

from imprint.guest import volumes

MAX_IMAGE = 4 * 1024 * 1024
PATHS = ("/meta-data", "/imprint", "/token", "/openstack/latest/meta_data.json")
FLAGS = ["-max_len=32768", "-timeout=30"]
_IMAGE = Path(tempfile.mkdtemp(prefix="vfat-")) / "seed.img"  # under the runner's private TMPDIR


def _geometry(boot: bytes) -> volumes.FatGeometry | None:
    geometry = volumes.fat_geometry(boot)
    if geometry is None:
        return None
    assert geometry.cluster_bytes > 0 and geometry.data_offset >= 0
    for cluster in (0, 1, 2, 3, geometry.clusters + 1, geometry.clusters + 2):
        try:
            offset = geometry.cluster_offset(cluster)
        except volumes.VolumeError:
            continue
        assert geometry.data_offset <= offset < geometry.data_offset + geometry.clusters * geometry.cluster_bytes
    return geometry


def test_one_input(data: bytes) -> None:
    geometry = _geometry(data[:512])
    if geometry is None or zlib.crc32(data) % 8:
        return  # mtools costs a few milliseconds per run: only every eighth input pays for it
    declared = geometry.total_sectors * geometry.bytes_per_sector
    size = max(len(data), min(declared, MAX_IMAGE))
    with _IMAGE.open("wb") as image:
        image.write(data)
        image.truncate(size)
    try:
        with volumes.open_volume(_IMAGE) as volume:
            for path in PATHS:
                try:
                    content = volume.read(path)
                except volumes.VolumeError:
                    continue
                assert content is None or len(content) <= volumes.MAX_FILE
    except volumes.VolumeError:
        pass
    finally:
        os.truncate(_IMAGE, 0)
