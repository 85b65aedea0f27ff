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
MAX_HANDOVER = 16 * 1024


@dataclass(frozen=True)
class Handover:
    vm: str
    vm_cert_pem: str
    address: str
    mode: tokens.Mode
    owner_fingerprint: str  # the new owner's, as the VM now pins it

    def to_json(self) -> bytes:
        return json.dumps({"kind": HANDOVER_KIND, "vm": self.vm, "vm_cert": self.vm_cert_pem,
                           "address": self.address, "mode": self.mode.value,
                           "owner_fingerprint": self.owner_fingerprint}, indent=2, sort_keys=True).encode() + b"\n"

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
    if not isinstance(data, dict) or data.get("kind") != HANDOVER_KIND:
        raise UsageError(f"{path} is not an imprint handover file ({HANDOVER_KIND})")
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
    return Handover(vm, pin.pem, address, parsed_mode, owner)


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
