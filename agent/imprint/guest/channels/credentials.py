"""systemd credentials: ``imprint.token`` (from SMBIOS type 11 or fw_cfg, passed by systemd),
read from $CREDENTIALS_DIRECTORY or /run/credentials/@system."""

from __future__ import annotations

from imprint import tokens
from imprint.guest.channels._common import read_token_file
from imprint.guest.distro import Distro

NAME = "credentials"
CREDENTIAL = "imprint.token"


def read(paths: Distro) -> tokens.Token | None:
    for directory in paths.credential_dirs:
        token = read_token_file(NAME, directory / CREDENTIAL)
        if token is not None:
            return token
    return None
