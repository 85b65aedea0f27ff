"""The cloudinit backend: a cloud-config document from the owner's profile, checked against the
policy (imprint.backends.cloudpolicy) and run by cloud-init in the VM.

Halves: ``guest`` (runs cloud-init), ``owner`` (reads the document from a file).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imprint.backends.cloudinit.schema import SCHEMA
from imprint.backends.plugin import Backend
from imprint.guest.distro import BackendFiles

if TYPE_CHECKING:
    from imprint.backends.plugin import GuestHalf, OwnerHalf


def _guest() -> GuestHalf:
    from imprint.backends.cloudinit.guest import apply

    return apply


def _owner() -> OwnerHalf:
    from imprint.backends.cloudinit import owner

    return owner


_FILES = BackendFiles()  # the defaults (a Distro may name others)
BACKEND = Backend(
    name="cloudinit", guest=_guest, owner=_owner, schema=SCHEMA, rounds=1,
    writes=(_FILES.cloud_config_applied, _FILES.cloud_config_started, _FILES.cloud_config_work),
)
