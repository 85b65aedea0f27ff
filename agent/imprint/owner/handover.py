"""Release and transfer (issue 13 item 3): the owner lets a VM go, or hands it to a new owner in
one step over the pinned channel, without the site.

* release: ``POST /v1/release`` {"wipe"}: the agent forgets its owner (with wipe, its own key
  too) and starts again unbound, so a new token on its next boot binds it again; this owner's
  pin goes, the audit log keeps the history.
* transfer: ``POST /v1/transfer`` {"owner_cert", "owner_addresses"?}: the agent pins the new
  owner's certificate, keeps nothing of this owner, and starts again trusting only the new one.
  This owner writes a handover file (the VM's name, pinned certificate, address and mode:
  nothing secret) for the new owner's `imprint import FILE`, and drops its pin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imprint import crypto, tls, tokens
from imprint.fsatomic import write_atomic
from imprint.owner.errors import AuthenticationFailed, UsageError
from imprint.owner.names import split_address, valid_vm_name

HANDOVER_KIND = "imprint-handover/1"
GRANT_KIND = "imprint-grant/1"
MAX_HANDOVER = 16 * 1024


@dataclass(frozen=True)
class Handover:
    """What an owner gives another for `imprint import`: a transferred VM (``role`` None: the
    recipient is its owner now) or a grant (``role``: the recipient is a delegate)."""

    vm: str
    vm_cert_pem: str
    address: str
    mode: tokens.Mode
    owner_fingerprint: str  # the recipient's, as the VM now trusts it
    role: str | None = None
    granted_by: str | None = None  # a grant: the VM's owner, whom the VM's status names

    def to_json(self) -> bytes:
        data = {"kind": HANDOVER_KIND if self.role is None else GRANT_KIND, "vm": self.vm, "vm_cert": self.vm_cert_pem,
                "address": self.address, "mode": self.mode.value, "owner_fingerprint": self.owner_fingerprint}
        if self.role is not None:
            data["role"] = self.role
            data["granted_by"] = self.granted_by or ""
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    def write(self, path: Path) -> None:
        if path.exists():
            raise UsageError(f"{path} exists: the handover file is written to a new file only")
        write_atomic(path, self.to_json(), mode=0o600)


def read_handover(path: Path) -> Handover:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_HANDOVER:
        raise UsageError(f"{path} is not a handover file (over {MAX_HANDOVER} bytes)")
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError):
        raise UsageError(f"{path} is not a handover file (not JSON)") from None
    if not isinstance(data, dict) or data.get("kind") not in (HANDOVER_KIND, GRANT_KIND):
        raise UsageError(f"{path} is not an imprint handover or grant file ({HANDOVER_KIND}, {GRANT_KIND})")
    role = data.get("role") if data.get("kind") == GRANT_KIND else None
    granted_by = data.get("granted_by") if data.get("kind") == GRANT_KIND else None
    if data.get("kind") == GRANT_KIND and (role not in ("read", "operator", "admin")
                                           or not (isinstance(granted_by, str) and granted_by.startswith("SHA256:"))):
        raise UsageError(f"{path}: a grant file with a missing or unknown role or granting owner")
    try:
        vm, cert, address, mode, owner = (data["vm"], data["vm_cert"], data["address"], data["mode"],
                                          data["owner_fingerprint"])
        if not all(isinstance(v, str) for v in (vm, cert, address, mode, owner)):
            raise TypeError
        valid_vm_name(vm)
        split_address(address)
        pin = tls.PinnedCert(crypto.certificate_der(cert.encode()))
        crypto.self_signed_certificate_spki(pin.der)
        parsed_mode = tokens.Mode(mode)
    except (KeyError, TypeError, ValueError, crypto.CryptoError):
        raise UsageError(f"{path}: a handover file with a missing or malformed field") from None
    return Handover(vm, pin.pem, address, parsed_mode, owner, role, granted_by)


def principal_cert(text: str) -> tuple[str | None, str]:
    """(PEM or None, fingerprint) from ``--to``/``--from``: a certificate file (another imprint
    home's owner.crt), or a fingerprint (SHA256:...), enough to revoke but not to grant."""
    if text.startswith("SHA256:"):
        return None, text
    return new_owner_cert(Path(text))


def new_owner_cert(path: Path) -> tuple[str, str]:
    """(PEM, fingerprint) of the new owner's certificate (their owner.crt), checked here first."""
    try:
        pem = path.read_bytes()
        der = crypto.certificate_der(pem)
        spki = crypto.self_signed_certificate_spki(der)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except crypto.CryptoError as exc:
        raise UsageError(f"{path} is not an owner certificate (the new owner's owner.crt): {exc}") from None
    return tls.PinnedCert(der).pem, crypto.fingerprint(spki)


def check_answer(answer: dict[str, Any], key: str, expected: object, vm: str) -> None:
    if answer.get(key) != expected:
        raise AuthenticationFailed(f"{vm} answered {key}={str(answer.get(key))[:80]!r}, not {expected!r}: "
                                   "nothing was changed in this owner's record")
