"""systemd credentials: ``imprint.token`` (from SMBIOS type 11 or fw_cfg, passed by systemd),
read from $CREDENTIALS_DIRECTORY or /run/credentials/@system. The site passes it as a fw_cfg
entry (``credentials``) or an SMBIOS OEM string (``credentials-smbios``).

The owner addresses are the credential ``imprint.owner`` (the list form, comma- or
newline-separated) in the same directory as the token: the first directory holding either
credential is the channel's, and ``imprint.owner`` there without ``imprint.token`` is broken.
The site writes it to a second file beside the artefact (``<out>.owner``), passed as a second
fw_cfg entry or SMBIOS string.
"""

from __future__ import annotations

from pathlib import Path

from imprint.channels.channel import (
    Artefact,
    Channel,
    Offer,
    Owners,
    SiteArtefact,
    encode_owners,
    offer,
    owner_file_path,
    read_owner_file,
    read_token_file,
    write_private,
)
from imprint.guest.distro import Distro

NAME = "credentials"
CREDENTIAL = "imprint.token"
OWNER_CREDENTIAL = "imprint.owner"
# systemd imports fw_cfg entries under this prefix as system credentials.
FW_CFG_PREFIX = "opt/io.systemd.credentials"
FW_CFG_ENTRY = f"{FW_CFG_PREFIX}/{CREDENTIAL}"
FW_CFG_OWNER_ENTRY = f"{FW_CFG_PREFIX}/{OWNER_CREDENTIAL}"


def read(paths: Distro) -> Offer | None:
    for directory in paths.credential_dirs:
        token = read_token_file(NAME, directory / CREDENTIAL)
        owners = read_owner_file(NAME, directory / OWNER_CREDENTIAL)
        if token is not None or owners:
            return offer(NAME, token, owners, f"credential {OWNER_CREDENTIAL} in {directory}")
    return None


def build_fw_cfg(token: str, out: Path, owners: Owners = ()) -> Artefact:
    write_private(out, token.encode())
    qemu_args = ["-fw_cfg", f"name={FW_CFG_ENTRY},file={out}"]
    if owners:
        owner_file = owner_file_path(out)
        write_private(owner_file, encode_owners(owners).encode())
        qemu_args += ["-fw_cfg", f"name={FW_CFG_OWNER_ENTRY},file={owner_file}"]
    return Artefact(
        NAME, out, qemu_args=qemu_args,
        note=f"systemd imports it as the system credential {CREDENTIAL} (or use --channel {NAME}-smbios)",
    )


def build_smbios(token: str, out: Path, owners: Owners = ()) -> Artefact:
    # QEMU (7.2 here) reads an SMBIOS type 11 string from a file with path=, so the token stays
    # out of argv; systemd (>= 252) imports io.systemd.credential:NAME=VALUE strings as credentials.
    write_private(out, f"io.systemd.credential:{CREDENTIAL}={token}".encode())
    qemu_args = ["-smbios", f"type=11,path={out}"]
    if owners:
        owner_file = owner_file_path(out)
        write_private(owner_file, f"io.systemd.credential:{OWNER_CREDENTIAL}={encode_owners(owners)}".encode())
        qemu_args += ["-smbios", f"type=11,path={owner_file}"]
    return Artefact(NAME, out, qemu_args=qemu_args,
                    note="SMBIOS type 11 (OEM strings): any root process in the guest can read the DMI tables")


CHANNEL = Channel(NAME, read, artefacts=(SiteArtefact("", build_fw_cfg), SiteArtefact("smbios", build_smbios)))
