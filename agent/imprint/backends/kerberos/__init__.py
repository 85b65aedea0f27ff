"""The kerberos backend: the VM's principals made in the owner's realm, their keys extracted with
kadmin on the owner's side and delivered as a keytab, and krb5.conf pointed at the realm.

Halves: ``guest`` (merges the keytab in the VM), ``owner`` (kadmin, the rounds), ``keytab`` (the
format both read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imprint.backends.kerberos.schema import SCHEMA
from imprint.backends.plugin import Backend
from imprint.guest.distro import BackendFiles

if TYPE_CHECKING:
    from imprint.backends.plugin import GuestHalf, OwnerHalf


def _guest() -> GuestHalf:
    from imprint.backends.kerberos.guest import apply

    return apply


def _owner() -> OwnerHalf:
    from imprint.backends.kerberos import owner

    return owner


_FILES = BackendFiles()  # the defaults (a Distro may name others)
BACKEND = Backend(
    name="kerberos", guest=_guest, owner=_owner, schema=SCHEMA, rounds=2,
    writes=(_FILES.krb5_keytab, _FILES.krb5_snippet, _FILES.krb5_conf),
)
