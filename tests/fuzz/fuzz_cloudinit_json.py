"""cloud-init instance data (and the #cloud-config user-data it points at) through the cloud-init
channel (imprint.guest.channels.cloudinit.read), on files in a private temporary root.

The input is the instance data, optionally followed by ``\\n\\0user-data\\0\\n`` and the user-data
file of the instance ``fuzz``. Only ChannelBroken may leave.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from imprint.guest.channels import ChannelBroken, cloudinit
from imprint.guest.paths import GuestPaths

SEPARATOR = b"\n\0user-data\0\n"
FLAGS = ["-max_len=8192"]
cloudinit.REREAD_PAUSE = 0.0  # a file that does not change between reads: no waiting for it

_ROOT = Path(tempfile.mkdtemp(prefix="cloudinit-"))  # under the runner's private TMPDIR
PATHS = GuestPaths(_ROOT)
PATHS.cloud_init_instance_data.parent.mkdir(parents=True)
USER_DATA = PATHS.cloud_init_user_data("fuzz")
USER_DATA.parent.mkdir(parents=True)


def test_one_input(data: bytes) -> None:
    instance_data, separated, user_data = data.partition(SEPARATOR)
    PATHS.cloud_init_instance_data.write_bytes(instance_data)
    if separated:
        USER_DATA.write_bytes(user_data)
    else:
        USER_DATA.unlink(missing_ok=True)
    try:
        cloudinit.read(PATHS)
    except ChannelBroken:
        pass
