"""Channel artefacts (``imprint-site seed``): one builder per boot channel, in one registry.

Each builder writes what the site attaches to the VM at ``out`` and returns how to attach it
(QEMU arguments and a short note). Files that carry a token are written 0600; where QEMU can
take the token from a file, it does, so a shared-mode K never appears in a process's argv.
"""

from __future__ import annotations

import os
from pathlib import Path

from imprint import metadisk
from imprint.fsatomic import write_atomic
from imprint.site import isoseeds
from imprint.site.artefact import Artefact, Builder

FW_CFG_ENTRY = "opt/org.imprint/token"
CREDENTIAL_FW_CFG_ENTRY = "opt/io.systemd.credentials/imprint.token"
METADISK_SERIAL = "imprint"




def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600)


def build_cmdline(token: str, out: Path) -> Artefact:
    fragment = f"imprint.token={token}"
    _write_private(out, (fragment + "\n").encode())
    return Artefact("cmdline", out, kernel_cmdline=fragment,
                    note="append the fragment to the kernel command line (it is world-readable in the guest)")


def build_fw_cfg(token: str, out: Path) -> Artefact:
    _write_private(out, token.encode())
    return Artefact("fw_cfg", out, qemu_args=["-fw_cfg", f"name={FW_CFG_ENTRY},file={out}"],
                    note="the guest reads /sys/firmware/qemu_fw_cfg/by_name/opt/org.imprint/token/raw (root only)")


def build_credentials(token: str, out: Path) -> Artefact:
    _write_private(out, token.encode())
    return Artefact(
        "credentials", out, qemu_args=["-fw_cfg", f"name={CREDENTIAL_FW_CFG_ENTRY},file={out}"],
        note="systemd imports it as the system credential imprint.token (or use --channel credentials-smbios)",
    )


def build_credentials_smbios(token: str, out: Path) -> Artefact:
    # QEMU (7.2 here) reads an SMBIOS type 11 string from a file with path=, so the token stays
    # out of argv; systemd (>= 252) imports io.systemd.credential:NAME=VALUE strings as credentials.
    _write_private(out, f"io.systemd.credential:imprint.token={token}".encode())
    return Artefact("credentials", out, qemu_args=["-smbios", f"type=11,path={out}"],
                    note="SMBIOS type 11 (OEM strings): any root process in the guest can read the DMI tables")


def build_metadisk(token: str, out: Path) -> Artefact:
    _write_private(out, metadisk.build(token))
    return Artefact(
        "metadata-disk", out,
        qemu_args=["-drive", f"file={out},if=none,id=imprint-meta,format=raw",
                   "-device", f"virtio-blk-pci,drive=imprint-meta,serial={METADISK_SERIAL}"],
        note="the guest sees /dev/disk/by-id/virtio-imprint and writes its VM token into the reply area",
    )


BUILDERS: dict[str, Builder] = {
    "cmdline": build_cmdline,
    "fw_cfg": build_fw_cfg,
    "credentials": build_credentials,
    "credentials-smbios": build_credentials_smbios,
    "metadata-disk": build_metadisk,
    **isoseeds.BUILDERS,
}


def build(channel: str, token: str, out: Path) -> Artefact:
    try:
        builder = BUILDERS[channel]
    except KeyError:
        raise ValueError(f"no seed builder for channel '{channel}'; known: {', '.join(sorted(BUILDERS))}") from None
    old_umask = os.umask(0o077)
    try:
        return builder(token, out)
    finally:
        os.umask(old_umask)
