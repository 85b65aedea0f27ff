"""The x509 backend: a key made in the VM, its CSR signed by the owner's X.509 CA under the
profile's name policy, and the certificate and chain installed.

Halves: ``guest`` (key, CSR, install), ``owner`` (policy, signing, ``imprint ca init --x509``),
``schema`` (the names and limits both halves check).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imprint.backends.plugin import Backend
from imprint.backends.x509.schema import SCHEMA
from imprint.guest.distro import BackendFiles

if TYPE_CHECKING:
    from imprint.backends.plugin import GuestHalf, OwnerCli, OwnerHalf


def _guest() -> GuestHalf:
    from imprint.backends.x509.guest import apply

    return apply


def _owner() -> OwnerHalf:
    from imprint.backends.x509 import owner

    return owner


def _cli() -> OwnerCli:
    from imprint.backends.x509.cli import CLI

    return CLI


_FILES = BackendFiles()  # the defaults (a Distro may name others)
BACKEND = Backend(
    name="x509", guest=_guest, owner=_owner, schema=SCHEMA, cli=_cli, rounds=2,
    writes=(_FILES.tls_key, _FILES.tls_cert, _FILES.tls_chain, _FILES.tls_fullchain),
)
