"""Channel artefacts (``imprint-site seed``, ``boot --channel``, ``attach --channel``): the site's
front to the builders the channel objects declare (imprint.channels; one list, no names here).

An artefact's name is its channel's name, with ``-<variant>`` when the channel offers several
(``imprint-seed-iso``, ``imprint-seed-vfat``, ``credentials-smbios``). Each builder writes what
the site attaches to the VM at ``out`` and returns how to attach it (QEMU arguments and a short
note). Files that carry a token are written 0600; where QEMU can take the token from a file, it
does, so a shared-mode K never appears in a process's argv. The owner addresses, when given, go
under the channel's owner key beside the token (each channel module's docstring says where).
"""

from __future__ import annotations

import os
from pathlib import Path

from imprint.channels import site_artefacts
from imprint.channels.channel import Artefact, Owners, SiteArtefact

ARTEFACTS: dict[str, SiteArtefact] = site_artefacts()
# The disks a site can attach to a running VM.
HOTPLUG: tuple[str, ...] = tuple(name for name, artefact in ARTEFACTS.items() if artefact.hotplug)


def build(name: str, token: str, out: Path, owners: Owners = ()) -> Artefact:
    try:
        artefact = ARTEFACTS[name]
    except KeyError:
        raise ValueError(f"no seed builder for channel '{name}'; known: {', '.join(sorted(ARTEFACTS))}") from None
    old_umask = os.umask(0o077)
    try:
        return artefact.build(token, out, owners)
    finally:
        os.umask(old_umask)
