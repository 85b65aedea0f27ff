"""The agent's durable state under <root>/var/lib/imprint (0700; files 0600, written atomically).

    vm.key       the VM's Ed25519 private key (born here, never leaves)
    vm.crt       self-signed certificate of that key, presented in TLS
    owner.crt    the pinned owner certificate (present once bound)
    delegates.json  the owner's delegates: {fingerprint: {"cert": PEM, "role": ...}} (issue 13)
    journal.log  the VM's append-only, hash-chained record of its trust (imprint.guest.journal)
    state.json   {"bound": ..., "mode": ..., "owner_fingerprint": ..., "bound_at": ...,
                  "consumed_tokens": [token ids], "owner_addresses": [HOST:PORT where it dials]}

The pin and the consumed-token record are written together in state.json, after owner.crt, so
a crash between the two leaves the VM unbound (it keeps listening for its genuine owner).

Crash points (imprint.faults, via write_atomic): agent.identity-key.*, agent.identity-cert.*
(first boot), agent.owner-cert.* and agent.bind-record.* (the bind: pin and consumed token).
Temp files a crash left are swept at every start (ensure_identity).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imprint.fsatomic import ensure_private_dir, remove_stale_temps, write_atomic
from imprint.tokens import Mode


class StateError(Exception):
    """The state directory is unreadable or corrupt: the agent refuses to guess."""


@dataclass
class BindRecord:
    bound: bool = False
    mode: str | None = None  # a tokens.Mode's value, as state.json holds it
    owner_fingerprint: str | None = None
    owner_spki_sha256: str | None = None
    bound_at: float | None = None
    consumed_tokens: list[str] = field(default_factory=list)
    # Where the bound VM dials its owner (owneraddr text forms), from the boot channel at the bind.
    owner_addresses: list[str] = field(default_factory=list)
    # The owner's pinned sessions so far (clone and rollback detection, docs/protocol.md §4.7).
    session_counter: int = 0

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> BindRecord:
        try:
            data: Any = json.loads(raw)
            record = cls(**data)
        except (ValueError, TypeError) as exc:
            raise StateError(f"state.json is corrupt: {exc}") from None
        if not isinstance(record.consumed_tokens, list):
            raise StateError("state.json is corrupt: consumed_tokens is not a list")
        if not isinstance(record.session_counter, int) or isinstance(record.session_counter, bool) \
                or record.session_counter < 0:
            raise StateError("state.json is corrupt: session_counter is not a counter")
        if not (isinstance(record.owner_addresses, list) and all(isinstance(a, str) for a in record.owner_addresses)):
            raise StateError("state.json is corrupt: owner_addresses is not a list of strings")
        return record


class AgentState:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.key_file = state_dir / "vm.key"
        self.cert_file = state_dir / "vm.crt"
        self.owner_cert_file = state_dir / "owner.crt"
        self.record_file = state_dir / "state.json"
        self.journal_file = state_dir / "journal.log"
        self.delegates_file = state_dir / "delegates.json"

    def load_record(self) -> BindRecord:
        try:
            raw = self.record_file.read_bytes()
        except FileNotFoundError:
            return BindRecord()
        except OSError as exc:
            raise StateError(f"cannot read {self.record_file}: {exc.strerror}") from None
        record = BindRecord.from_json(raw)
        if record.bound and not self.owner_cert_file.exists():
            raise StateError(f"state says bound but {self.owner_cert_file} is missing")
        return record

    def ensure_identity(self) -> None:
        """Create the VM key and its certificate on first boot. When both exist nothing is
        parsed here: the TLS layer loads them and reports a mismatch, keeping start-up cheap."""
        ensure_private_dir(self.dir)
        remove_stale_temps(self.dir)  # what a crash left between write and rename
        if self.key_file.exists() and self.cert_file.exists():
            return
        from imprint import crypto  # lazy: only the first boot pays for key generation

        if self.key_file.exists():
            try:
                key = crypto.PrivateKey.from_pem(self.key_file.read_bytes())
            except crypto.CryptoError as exc:
                raise StateError(f"{self.key_file}: {exc}") from None
        else:
            key = crypto.PrivateKey.generate()
            write_atomic(self.key_file, key.to_pem(), label="agent.identity-key")
        # A name of its own per VM: OpenSSL finds a trust anchor by its subject name, and an owner's
        # listener trusts every pinned VM certificate at once (tls.owner_listener_context): under
        # one shared name only the first of them would ever verify.
        name = f"imprint-vm {key.public.digest.hex()[:32]}"
        write_atomic(self.cert_file, key.self_signed_certificate(name), mode=0o644,
                     label="agent.identity-cert")

    def record_bind(self, *, owner_cert_pem: bytes, mode: Mode, owner_fingerprint: str,
                    owner_spki_sha256: str, token_id: str, owner_addresses: list[str] | None = None,
                    reached: str = "dial-in") -> BindRecord:
        record = self.load_record()
        # state.json's write syncs the directory for both
        write_atomic(self.owner_cert_file, owner_cert_pem, sync_dir=False, label="agent.owner-cert")
        record.bound = True
        record.mode = mode.value
        record.owner_fingerprint = owner_fingerprint
        record.owner_spki_sha256 = owner_spki_sha256
        record.bound_at = time.time()
        record.owner_addresses = list(owner_addresses or [])
        if token_id not in record.consumed_tokens:
            record.consumed_tokens.append(token_id)
        write_atomic(self.record_file, record.to_json(), label="agent.bind-record")
        from imprint.guest import journal

        # After the bind record: the journal tells what happened, the record decides what is.
        journal.append(self.journal_file, "bound", owner_fingerprint=owner_fingerprint, mode=mode.value,
                       token_id=token_id, reached=reached)
        return record

    def advance_session(self, proposed: int) -> tuple[int, int]:
        """The session counter before, and after raising it to ``proposed`` (never lowered),
        written before the answer leaves (the owner confirms what it was told)."""
        record = self.load_record()
        before = record.session_counter
        if proposed > before:
            record.session_counter = proposed
            write_atomic(self.record_file, record.to_json(), label="agent.session-counter")
        return before, record.session_counter

    def release(self, *, wipe: bool) -> BindRecord:
        """Forget the owner: the pin goes, the VM is unbound (consumed token ids stay: a used
        token never binds again). With ``wipe`` the VM key and certificate go too, so the next
        start makes a new identity. Journalled (fingerprints only)."""
        from imprint.guest import journal

        record = self.load_record()
        journal.append(self.journal_file, "released", wipe=wipe)
        fresh = BindRecord(consumed_tokens=record.consumed_tokens)
        write_atomic(self.record_file, fresh.to_json(), label="agent.release-record")
        self.owner_cert_file.unlink(missing_ok=True)
        self.delegates_file.unlink(missing_ok=True)
        if wipe:
            for path in (self.key_file, self.cert_file):
                path.unlink(missing_ok=True)
        return fresh

    def transfer(self, *, owner_cert_pem: bytes, owner_fingerprint: str, owner_spki_sha256: str,
                 owner_addresses: list[str] | None) -> BindRecord:
        """A new owner, in one step: its certificate becomes the pin and the record names it;
        nothing of the old owner is kept (its addresses neither, unless none are given)."""
        from imprint.guest import journal

        record = self.load_record()
        write_atomic(self.owner_cert_file, owner_cert_pem, sync_dir=False, label="agent.transfer-cert")
        record.owner_fingerprint = owner_fingerprint
        record.owner_spki_sha256 = owner_spki_sha256
        record.owner_addresses = list(owner_addresses or [])
        record.session_counter = 0  # the new owner's sessions
        write_atomic(self.record_file, record.to_json(), label="agent.transfer-record")
        # The journal is the record of one owner's relationship: a transferred VM keeps nothing
        # of the old owner, so the new owner's journal starts here (the old owner's audit log
        # keeps that history on its side).
        self.journal_file.unlink(missing_ok=True)
        self.delegates_file.unlink(missing_ok=True)  # the old owner's delegates: nothing of it stays
        journal.append(self.journal_file, "transferred", owner_fingerprint=owner_fingerprint)
        return record

    # -- delegates (docs/protocol.md §4.9): other principals the owner let in, with a role
    def load_delegates(self) -> dict[str, dict[str, str]]:
        try:
            raw = self.delegates_file.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"cannot read {self.delegates_file}: {exc.strerror}") from None
        try:
            data: Any = json.loads(raw)
        except ValueError as exc:
            raise StateError(f"{self.delegates_file} is corrupt: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(fp, str) and isinstance(d, dict) and isinstance(d.get("cert"), str)
                and d.get("role") in DELEGATE_ROLES for fp, d in data.items()):
            raise StateError(f"{self.delegates_file} is corrupt: not {{fingerprint: {{cert, role}}}}")
        return data

    def save_delegates(self, delegates: dict[str, dict[str, str]], event: str, **fields: Any) -> None:
        from imprint.guest import journal

        write_atomic(self.delegates_file, json.dumps(delegates, indent=2, sort_keys=True).encode() + b"\n",
                     label="agent.delegates")
        journal.append(self.journal_file, event, **fields)


# Lowest first: each role may do what the ones before it may.
DELEGATE_ROLES = ("read", "operator", "admin")
