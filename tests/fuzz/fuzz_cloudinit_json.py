"""cloud-init instance data (and the #cloud-config user-data it points at) through the cloud-init
channel (imprint.channels.cloudinit.read), on files in a private temporary root.

The input is the instance data, optionally followed by ``\\n\\0user-data\\0\\n`` and the user-data
file of the instance ``fuzz`` (empty without it: the same as no file to the channel). Only
ChannelBroken may leave. The two files stay open and are rewritten in place: creating a file
per input cost more than the channel's whole read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from imprint.channels import ChannelBroken, cloudinit
from imprint.guest.distro import Distro

SEPARATOR = b"\n\0user-data\0\n"
FLAGS = ["-max_len=8192"]
REREAD_PAUSE = 0.0  # a file that does not change between reads: no waiting for it

_ROOT = Path(tempfile.mkdtemp(prefix="cloudinit-"))  # under the runner's private TMPDIR
PATHS = Distro(_ROOT)
PATHS.cloud_init_instance_data.parent.mkdir(parents=True)
USER_DATA = PATHS.cloud_init_user_data("fuzz")
USER_DATA.parent.mkdir(parents=True)
_FILES = [os.open(path, os.O_RDWR | os.O_CREAT, 0o600) for path in (PATHS.cloud_init_instance_data, USER_DATA)]


def _rewrite(fd: int, content: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, content, 0)


def test_one_input(data: bytes) -> None:
    instance_data, _, user_data = data.partition(SEPARATOR)
    _rewrite(_FILES[0], instance_data)
    _rewrite(_FILES[1], user_data)
    try:
        cloudinit.read(PATHS, reread_pause=REREAD_PAUSE)
    except ChannelBroken:
        pass
