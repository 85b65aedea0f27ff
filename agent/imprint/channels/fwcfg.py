"""QEMU fw_cfg: ``-fw_cfg name=opt/org.imprint/token,file=<token file>`` appears at
/sys/firmware/qemu_fw_cfg/by_name/opt/org.imprint/token/raw."""

from __future__ import annotations

import subprocess
from pathlib import Path

from imprint import tokens
from imprint.channels.channel import Artefact, Channel, SiteArtefact, read_token_file, write_private
from imprint.guest.distro import Distro

NAME = "fw_cfg"
ENTRY = "opt/org.imprint/token"


_tried_modprobe = False


def _load_module(paths: Distro) -> None:
    # The Debian cloud kernel builds qemu_fw_cfg as a module; on -M pc it usually autoloads.
    # Tried once per process: the agent polls channels while it waits for a late token.
    global _tried_modprobe
    if _tried_modprobe or paths.fw_cfg.exists() or not paths.is_real_root:
        return
    _tried_modprobe = True
    subprocess.run([paths.programs.modprobe, "-q", "qemu_fw_cfg"], check=False, capture_output=True, timeout=10)


def read(paths: Distro) -> tokens.Token | None:
    _load_module(paths)
    return read_token_file(NAME, paths.fw_cfg / "by_name" / ENTRY / "raw")


def build(token: str, out: Path) -> Artefact:
    write_private(out, token.encode())
    return Artefact(NAME, out, qemu_args=["-fw_cfg", f"name={ENTRY},file={out}"],
                    note=f"the guest reads /sys/firmware/qemu_fw_cfg/by_name/{ENTRY}/raw (root only)")


CHANNEL = Channel(NAME, read, artefacts=(SiteArtefact("", build),))
