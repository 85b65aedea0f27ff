"""imprint-motd: the owner's message of the day, written to /etc/motd.d/imprint in the VM.

Profile table::

    [motd]
    text = "Maintenance on Sunday."

The owner half adds the VM's name to what is sent and, when the VM has written it, records the
message's SHA-256 for the VM in the owner's database (``backend_data``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imprint.backends.plugin import Backend

from imprint_motd.schema import SCHEMA

if TYPE_CHECKING:
    from imprint.backends.plugin import GuestHalf, OwnerHalf


def _guest() -> GuestHalf:
    from imprint_motd.guest import apply

    return apply


def _owner() -> OwnerHalf:
    from imprint_motd import owner

    return owner


BACKEND = Backend(name="motd", guest=_guest, owner=_owner, schema=SCHEMA, rounds=1,
                  writes=("/etc/motd.d/imprint",))
