"""systemd credentials: ``imprint.token`` (from SMBIOS type 11 or fw_cfg, passed by systemd),
read from $CREDENTIALS_DIRECTORY or /run/credentials/@system. The site passes it as a fw_cfg
entry (``credentials``) or an SMBIOS OEM string (``credentials-smbios``)."""

from __future__ import annotations

from pathlib import Path

from imprint import tokens
from imprint.channels.channel import Artefact, Channel, SiteArtefact, read_token_file, write_private
from imprint.guest.distro import Distro

NAME = "credentials"
CREDENTIAL = "imprint.token"
# systemd imports fw_cfg entries under this prefix as system credentials.
FW_CFG_ENTRY = f"opt/io.systemd.credentials/{CREDENTIAL}"


def read(paths: Distro) -> tokens.Token | None:
    for directory in paths.credential_dirs:
        token = read_token_file(NAME, directory / CREDENTIAL)
        if token is not None:
            return token
    return None


def build_fw_cfg(token: str, out: Path) -> Artefact:
    write_private(out, token.encode())
    return Artefact(
        NAME, out, qemu_args=["-fw_cfg", f"name={FW_CFG_ENTRY},file={out}"],
        note=f"systemd imports it as the system credential {CREDENTIAL} (or use --channel {NAME}-smbios)",
    )


def build_smbios(token: str, out: Path) -> Artefact:
    # QEMU (7.2 here) reads an SMBIOS type 11 string from a file with path=, so the token stays
    # out of argv; systemd (>= 252) imports io.systemd.credential:NAME=VALUE strings as credentials.
    write_private(out, f"io.systemd.credential:{CREDENTIAL}={token}".encode())
    return Artefact(NAME, out, qemu_args=["-smbios", f"type=11,path={out}"],
                    note="SMBIOS type 11 (OEM strings): any root process in the guest can read the DMI tables")


CHANNEL = Channel(NAME, read, artefacts=(SiteArtefact("", build_fw_cfg), SiteArtefact("smbios", build_smbios)))
