"""The ssh backend: users and their keys, host-key attestation, host certificates signed by the
owner's SSH CA, trust in that CA for users; on the owner's side also ``imprint ssh``, the
per-VM known_hosts and ``imprint ca init``.

Halves: ``guest`` (in the VM), ``owner`` (prepare and review the rounds), ``cli`` (the owner's
commands), ``schema`` (the agent's config, checked on both sides).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imprint.backends.plugin import Backend
from imprint.backends.ssh.schema import SCHEMA

if TYPE_CHECKING:
    from imprint.backends.plugin import GuestHalf, OwnerCli, OwnerHalf


def _guest() -> GuestHalf:
    from imprint.backends.ssh.guest import apply

    return apply


def _owner() -> OwnerHalf:
    from imprint.backends.ssh import owner

    return owner


def _cli() -> OwnerCli:
    from imprint.backends.ssh.cli import CLI

    return CLI


BACKEND = Backend(
    name="ssh", guest=_guest, owner=_owner, cli=_cli, schema=SCHEMA, rounds=2, default_ca=True,
    writes=("/etc/ssh/ssh_host_*_key", "/etc/ssh/ssh_host_*_key-cert.pub", "/etc/ssh/imprint_user_ca.pub",
            "/etc/ssh/sshd_config.d/imprint.conf", "/etc/sudoers.d/imprint-*", "/etc/passwd",
            "~user/.ssh/authorized_keys"),
)
