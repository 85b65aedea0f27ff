"""QEMU fw_cfg: ``-fw_cfg name=opt/org.imprint/token,file=<token file>`` appears at
/sys/firmware/qemu_fw_cfg/by_name/opt/org.imprint/token/raw.

The owner addresses are the entry ``opt/org.imprint/owner`` (the list form, comma- or
newline-separated; the site writes it from a second file, ``<out>.owner``). An owner entry
without a token entry is a broken channel.
"""

from __future__ import annotations

import subprocess
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

NAME = "fw_cfg"
ENTRY = "opt/org.imprint/token"
OWNER_ENTRY = "opt/org.imprint/owner"


_tried_modprobe = False


def _load_module(paths: Distro) -> None:
    # The Debian cloud kernel builds qemu_fw_cfg as a module; on -M pc it usually autoloads.
    # Tried once per process: the agent polls channels while it waits for a late token.
    global _tried_modprobe
    if _tried_modprobe or paths.fw_cfg.exists() or not paths.is_real_root:
        return
    _tried_modprobe = True
    subprocess.run([paths.programs.modprobe, "-q", "qemu_fw_cfg"], check=False, capture_output=True, timeout=10)


def read(paths: Distro) -> Offer | None:
    _load_module(paths)
    by_name = paths.fw_cfg / "by_name"
    token = read_token_file(NAME, by_name / ENTRY / "raw")
    owners = read_owner_file(NAME, by_name / OWNER_ENTRY / "raw")
    return offer(NAME, token, owners, f"entry {OWNER_ENTRY}")


def build(token: str, out: Path, owners: Owners = ()) -> Artefact:
    write_private(out, token.encode())
    qemu_args = ["-fw_cfg", f"name={ENTRY},file={out}"]
    if owners:
        owner_file = owner_file_path(out)
        write_private(owner_file, encode_owners(owners).encode())
        qemu_args += ["-fw_cfg", f"name={OWNER_ENTRY},file={owner_file}"]
    return Artefact(NAME, out, qemu_args=qemu_args,
                    note=f"the guest reads /sys/firmware/qemu_fw_cfg/by_name/{ENTRY}/raw (root only)")


CHANNEL = Channel(NAME, read, artefacts=(SiteArtefact("", build),))
