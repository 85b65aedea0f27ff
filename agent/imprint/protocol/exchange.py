"""The key-exchange state machines, sans-IO: bytes in, events and bytes out.

No sockets, no clock; randomness is injected. Each side runs inside one TLS connection in which
the VM (agent) is the TLS server and the owner the TLS client, and each is told the TLS
certificate it presented (VM) or saw (owner), so the exchange is bound to that connection.

    owner                                            VM
    OwnerHello(mode, token_id, Na, owner_cert, H(cert seen))  ->
                        <-  VmHello(mode, Nb, vm_spki), VmProof(sig_vm, mac_vm)
    OwnerProof(sig_owner, mac_owner)                          ->
                        <-  VmConfirm(sig_vm', mac_vm')   (after the VM pinned the owner key)

Every message body is folded into a running transcript hash TH. Proofs cover TH up to and
including the message before them, under role-specific labels, so a proof cannot be reflected
or moved to another session. In shared mode the MACs use keys derived from K with one HKDF
label per direction; in no-secrets mode each public key must hash to the token the other side
holds. See docs/protocol.md.

The sans-IO rule, whole (as in h11): for any bytes from the peer, ``receive_data`` returns events
or raises RemoteProtocolError, nothing else. Whatever else is raised while processing received
bytes (a crypto library's exception for a hostile key, a bug) becomes a RemoteProtocolError too,
with the state set to FAILED and an Alert queued. LocalProtocolError is only ever this side's own
misuse of the API (a call in the wrong state), never something a peer can cause. Every transition
is in the class's TRANSITIONS table, local calls (``initiate``, ``confirm``) included; the one
rule outside the table is that every state but DONE and FAILED goes to FAILED on a protocol
error, a close mid-exchange, or ``abort``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, NamedTuple, TypeVar

from imprint import crypto
from imprint.protocol.errors import ALERT_TEXT, AlertCode, LocalProtocolError, RemoteProtocolError
from imprint.protocol.messages import (
    MESSAGE_TYPES,
    WIRE_MODE,
    Alert,
    FrameBuffer,
    Message,
    MessageType,
    OwnerHello,
    OwnerProof,
    VmConfirm,
    VmHello,
    VmProof,
    decode_body,
    encode_body,
)
from imprint.safetext import printable
from imprint.tokens import Mode, Token, TokenKind

Random = Callable[[int], bytes]

_TRANSCRIPT_LABEL = b"imprint/1 transcript\0"
_PROOF_LABEL = {
    "owner": b"imprint/1 proof owner\0",
    "vm": b"imprint/1 proof vm\0",
    "vm-confirm": b"imprint/1 confirm vm\0",
}
_MAC_INFO = {"owner": b"imprint/1 shared mac owner->vm", "vm": b"imprint/1 shared mac vm->owner"}


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmAuthenticated:
    """Owner side: the VM proved its key. The owner may record it as a pending pin."""

    vm_key: crypto.PublicKey


@dataclass(frozen=True)
class OwnerAuthenticated:
    """VM side: the owner proved its key. The driver pins it, then calls ``confirm()``."""

    owner_key: crypto.PublicKey


@dataclass(frozen=True)
class ExchangeComplete:
    """Both sides: the exchange finished; ``peer_key`` is the key to pin."""

    peer_key: crypto.PublicKey


Event = VmAuthenticated | OwnerAuthenticated | ExchangeComplete


class State(Enum):
    START = "start"
    AWAIT_OWNER_HELLO = "await-owner-hello"
    AWAIT_VM_HELLO = "await-vm-hello"
    AWAIT_VM_PROOF = "await-vm-proof"
    AWAIT_OWNER_PROOF = "await-owner-proof"
    AWAIT_LOCAL_CONFIRM = "await-local-confirm"
    AWAIT_VM_CONFIRM = "await-vm-confirm"
    DONE = "done"
    FAILED = "failed"


class Local(Enum):
    """The local calls that move a state machine, next to the message types that arrive."""

    INITIATE = "initiate()"
    CONFIRM = "confirm()"


Trigger = MessageType | Local
_TERMINAL = (State.DONE, State.FAILED)


class Transition(NamedTuple):
    """One row of a TRANSITIONS table: the handler that runs, and the state after it."""

    handler: Callable[..., list[Event]]
    next_state: State


_S = TypeVar("_S", bound="_Session")
_M = TypeVar("_M", bound=Message)


def received(message: type[_M], handler: Callable[[_S, _M, bytes], list[Event]],
             next_state: State) -> tuple[Trigger, Transition]:
    """A table row for a message from the peer. The type checker holds ``handler`` to taking
    exactly ``message`` (and its body), so the table cannot pair a message with another's handler."""
    return message.TYPE, Transition(handler, next_state)


def called(call: Local, handler: Callable[[_S], list[Event]], next_state: State) -> tuple[Trigger, Transition]:
    """A table row for a local call (``initiate()``, ``confirm()``)."""
    return call, Transition(handler, next_state)


# ---- shared machinery ----------------------------------------------------------------------


class _Session:
    """Framing, transcript, the transition table and error handling shared by both roles."""

    role: str
    INITIAL: ClassVar[State]
    # state -> {trigger -> (handler, next state)}. A message absent here is out of order (a
    # RemoteProtocolError); a local call absent here is misuse (a LocalProtocolError).
    TRANSITIONS: ClassVar[dict[State, dict[Trigger, Transition]]]

    def __init__(self, *, key: crypto.PrivateKey, token: Token, rng: Random) -> None:
        self._key = key
        self._token = token
        self._mode = token.mode
        self._rng = rng
        self._frames = FrameBuffer()
        self._out = bytearray()
        self._th = crypto.sha256(_TRANSCRIPT_LABEL)
        self._mac_keys: dict[str, bytes] = {}
        self.state = self.INITIAL
        self.peer_key: crypto.PublicKey | None = None
        self._reading = "a frame"  # what receive_data is processing, for an unexpected error's detail

    # -- public API
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; ``b""`` means the peer closed the connection.

        Returns the events, or raises RemoteProtocolError (state FAILED, an Alert queued unless
        the peer sent one): no other exception, whatever the bytes."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise LocalProtocolError(f"receive_data() takes bytes, not {type(data).__name__}")
        if self.state is State.FAILED:
            raise LocalProtocolError("the exchange already failed")
        if not data:
            if self.state is State.DONE:
                return []
            self.state = State.FAILED
            raise RemoteProtocolError(AlertCode.CLOSED, "the peer closed the connection mid-exchange")
        events: list[Event] = []
        self._reading = "a frame"
        try:
            self._frames.feed(data)
            while (body := self._frames.next_body()) is not None:
                self._reading = "a message"
                message = decode_body(body)
                self._reading = type(message).__name__
                events.extend(self._handle(message, body))
                self._reading = "a frame"
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        except Exception as exc:
            # Not a refusal this side knows how to name (a library's exception for a hostile
            # value, or a bug): still the peer's bytes that could not be processed, so still a
            # refusal of them, never a foreign exception out of the state machine. The original
            # stays chained for the driver's debug log.
            error = RemoteProtocolError(
                AlertCode.MALFORMED,
                f"the peer's {self._reading} could not be processed ({type(exc).__name__})",
            )
            self._fail(error)
            raise error from exc
        except BaseException:
            # KeyboardInterrupt and the like: not the peer's doing and not ours to convert, but
            # a half-processed exchange must not be resumed or flush a half-built flight.
            self._out.clear()
            self.state = State.FAILED
            raise
        return events

    def abort(self, code: AlertCode, detail: str) -> None:
        """Stop the exchange for a local reason (e.g. storage failed); tells the peer why."""
        if self.state in _TERMINAL:
            return
        self._send(Alert(int(code), detail.encode()[:200]))
        self.state = State.FAILED

    # -- internals
    def _fail(self, exc: RemoteProtocolError) -> None:
        # Whatever a failed read queued (e.g. OwnerProof before a bad duplicate frame) must not
        # leave: the caller flushes only the Alert.
        self._out.clear()
        if not exc.from_peer:
            self._send(Alert(int(exc.code), ALERT_TEXT[exc.code].encode()))
        self.state = State.FAILED

    def _step(self, trigger: Trigger) -> Transition:
        """The table's (handler, next state) for ``trigger`` in the current state."""
        step = self.TRANSITIONS.get(self.state, {}).get(trigger)
        if step is not None:
            return step
        if isinstance(trigger, Local):
            raise LocalProtocolError(f"{trigger.value} in state {self.state.value}")
        raise RemoteProtocolError(
            AlertCode.UNEXPECTED_MESSAGE,
            f"{MESSAGE_TYPES[trigger].__name__} is not expected in state {self.state.value}",
        )

    def _local(self, trigger: Local) -> list[Event]:
        """Run a local call through the table: misuse raises before anything changes."""
        handler, next_state = self._step(trigger)
        events = handler(self)
        self.state = next_state
        return events

    def _send(self, message: Message) -> None:
        body = encode_body(message)
        if not isinstance(message, Alert):
            self._absorb(body)
        self._out += len(body).to_bytes(2, "big") + body

    def _absorb(self, body: bytes) -> None:
        self._th = crypto.sha256(self._th + len(body).to_bytes(2, "big") + body)

    def _handle(self, message: Message, body: bytes) -> list[Event]:
        if isinstance(message, Alert):
            try:
                code = AlertCode(message.code)
            except ValueError:
                code = AlertCode.INTERNAL
            # The peer's words reach terminals and logs: one printable line, every non-printable
            # character escaped visibly; bytes that are not UTF-8 read as \xNN.
            text = printable(message.detail.decode("utf-8", "backslashreplace"))
            raise RemoteProtocolError(code, f"peer refused: {text}", from_peer=True)
        handler, next_state = self._step(message.TYPE)
        events = handler(self, message, body)
        self.state = next_state
        return events

    def _check_mode(self, wire_mode: int) -> None:
        if wire_mode != WIRE_MODE[self._mode]:
            raise RemoteProtocolError(
                AlertCode.MODE_MISMATCH,
                f"peer uses mode {wire_mode}, this side {self._mode.value}: the mode cannot be changed in flight",
            )

    def _parse_key(self, spki: bytes) -> crypto.PublicKey:
        try:
            return crypto.PublicKey.from_spki(spki)
        except crypto.CryptoError as exc:
            raise RemoteProtocolError(AlertCode.MALFORMED, f"peer public key: {exc}") from None

    def _mac_key(self, direction: str) -> bytes:
        # Derived once per direction and session (three MACs use two keys; an HKDF through
        # cryptography 38's Python HMAC objects costs ~0.2 ms).
        key = self._mac_keys.get(direction)
        if key is None:
            key = self._mac_keys[direction] = crypto.hkdf(self._token.payload, info=_MAC_INFO[direction])
        return key

    def _prove(self, label: str) -> tuple[bytes, bytes]:
        data = _PROOF_LABEL[label] + self._th
        signature = self._key.sign(data)
        tag = crypto.mac(self._mac_key(self.role), data) if self._mode is Mode.SHARED else b""
        return signature, tag

    def _verify_proof(self, peer_role: str, signature: bytes, tag: bytes, label: str | None = None) -> None:
        assert self.peer_key is not None
        data = _PROOF_LABEL[label or peer_role] + self._th
        if self._mode is Mode.SHARED:
            if len(tag) != crypto.MAC_BYTES:
                raise RemoteProtocolError(AlertCode.MALFORMED, "shared-mode proof without a 32-byte MAC")
            try:
                crypto.verify_mac(self._mac_key(peer_role), data, tag)
            except crypto.CryptoError:
                raise RemoteProtocolError(
                    AlertCode.AUTHENTICATION_FAILED,
                    f"the {peer_role}'s MAC under K does not verify: wrong token, or a man in the middle",
                ) from None
        elif tag:
            raise RemoteProtocolError(AlertCode.MALFORMED, "no-secrets proof carries a MAC")
        try:
            self.peer_key.verify(signature, data)
        except crypto.CryptoError:
            raise RemoteProtocolError(
                AlertCode.AUTHENTICATION_FAILED,
                f"the {peer_role}'s signature over the transcript does not verify",
            ) from None


# ---- owner ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _own_certificate_spki(cert: bytes) -> bytes:
    """The key in this side's own certificate (a check of the caller, not of peer input): the
    owner's is the same for every bind of a home, so it is parsed once per process."""
    return crypto.certificate_spki(cert)


class OwnerExchange(_Session):
    """The owner's side (TLS client).

    ``owner_cert`` is the owner's self-signed DER certificate; the VM pins it as the single
    trust anchor for the owner's later mutual-TLS connections.
    ``token`` is the owner's token for this VM: K in shared mode, or the no-secrets owner token
    (which must be the hash of ``owner_key``). ``vm_token`` is the VM token that came back
    through the site, required in no-secrets mode. ``seen_server_cert`` is the DER certificate
    the TLS handshake showed.
    """

    role = "owner"
    INITIAL = State.START

    def __init__(
        self,
        *,
        owner_key: crypto.PrivateKey,
        owner_cert: bytes,
        token: Token,
        seen_server_cert: bytes,
        vm_token: Token | None = None,
        rng: Random = os.urandom,
    ) -> None:
        if token.kind is TokenKind.VM:
            raise LocalProtocolError("the owner's token must be a shared or no-secrets token")
        if token.mode is Mode.NOSECRET:
            if not crypto.digests_equal(token.payload, owner_key.public.digest):
                raise LocalProtocolError("the no-secrets token is not the hash of this owner's key")
            if vm_token is None or vm_token.kind is not TokenKind.VM:
                raise LocalProtocolError("no-secrets mode needs the VM token that came back through the site")
        if not crypto.digests_equal(_own_certificate_spki(owner_cert), owner_key.public.spki):
            raise LocalProtocolError("the owner certificate does not carry the owner key")
        super().__init__(key=owner_key, token=token, rng=rng)
        self._owner_cert = owner_cert
        self._vm_token = vm_token
        self._seen_cert = seen_server_cert
        try:
            self._seen_spki = crypto.certificate_spki(seen_server_cert)
        except crypto.CryptoError:
            self._seen_spki = b""

    @property
    def seen_spki(self) -> bytes:
        """The key of the certificate the TLS handshake showed (b"" if it has none this side
        reads): what VmHello must name, and, in no-secrets mode, what must hash to the VM token."""
        return self._seen_spki

    def initiate(self) -> bytes:
        """The OwnerHello to send first."""
        self._local(Local.INITIATE)
        return self.data_to_send()

    def _on_initiate(self) -> list[Event]:
        self._send(
            OwnerHello(
                mode=WIRE_MODE[self._mode],
                token_id=self._token.token_id,
                owner_nonce=self._rng(crypto.NONCE_BYTES),
                owner_cert=self._owner_cert,
                seen_server_cert_sha256=crypto.sha256(self._seen_cert),
            )
        )
        return []

    def _on_vm_hello(self, msg: VmHello, body: bytes) -> list[Event]:
        self._check_mode(msg.mode)
        vm_key = self._parse_key(msg.vm_spki)
        if not crypto.digests_equal(vm_key.spki, self._seen_spki):
            raise RemoteProtocolError(
                AlertCode.KEY_MISMATCH,
                "the VM key in the exchange is not the key of the TLS certificate this connection showed",
            )
        if self._vm_token is not None and not crypto.digests_equal(vm_key.digest, self._vm_token.payload):
            raise RemoteProtocolError(
                AlertCode.KEY_MISMATCH,
                f"the VM key {vm_key.fingerprint} does not hash to the VM token that came through the site",
            )
        self.peer_key = vm_key
        self._absorb(body)
        return []

    def _on_vm_proof(self, msg: VmProof, body: bytes) -> list[Event]:
        self._verify_proof("vm", msg.signature, msg.mac)
        self._absorb(body)
        signature, tag = self._prove("owner")
        self._send(OwnerProof(signature=signature, mac=tag))
        assert self.peer_key is not None
        return [VmAuthenticated(self.peer_key)]

    def _on_vm_confirm(self, msg: VmConfirm, body: bytes) -> list[Event]:
        assert self.peer_key is not None
        self._verify_proof("vm", msg.signature, msg.mac, label="vm-confirm")
        self._absorb(body)
        return [ExchangeComplete(self.peer_key)]

    # Every transition of the owner's side, sent and received (see _Session.TRANSITIONS).
    TRANSITIONS = {
        State.START: dict([called(Local.INITIATE, _on_initiate, State.AWAIT_VM_HELLO)]),
        State.AWAIT_VM_HELLO: dict([received(VmHello, _on_vm_hello, State.AWAIT_VM_PROOF)]),
        State.AWAIT_VM_PROOF: dict([received(VmProof, _on_vm_proof, State.AWAIT_VM_CONFIRM)]),
        State.AWAIT_VM_CONFIRM: dict([received(VmConfirm, _on_vm_confirm, State.DONE)]),
    }


# ---- VM ------------------------------------------------------------------------------------


class VmExchange(_Session):
    """The VM's side (TLS server). ``own_cert`` is the DER certificate it presents in TLS."""

    role = "vm"
    INITIAL = State.AWAIT_OWNER_HELLO

    def __init__(
        self, *, vm_key: crypto.PrivateKey, token: Token, own_cert: bytes, rng: Random = os.urandom
    ) -> None:
        if token.kind is TokenKind.VM:
            raise LocalProtocolError("the VM must be given the owner's token, not its own")
        if not crypto.digests_equal(crypto.certificate_spki(own_cert), vm_key.public.spki):
            raise LocalProtocolError("the TLS certificate does not carry the VM key")
        super().__init__(key=vm_key, token=token, rng=rng)
        self._own_cert_digest = crypto.sha256(own_cert)
        self.peer_cert: bytes | None = None

    def _on_owner_hello(self, msg: OwnerHello, body: bytes) -> list[Event]:
        self._check_mode(msg.mode)
        if not crypto.digests_equal(msg.token_id, self._token.token_id):
            raise RemoteProtocolError(
                AlertCode.WRONG_TOKEN,
                f"owner uses token {msg.token_id.hex()}, this VM holds token {self._token.token_id.hex()}",
            )
        try:
            owner_key = crypto.PublicKey.from_spki(crypto.self_signed_certificate_spki(msg.owner_cert))
        except crypto.CryptoError as exc:
            raise RemoteProtocolError(AlertCode.MALFORMED, f"owner certificate: {exc}") from None
        if self._mode is Mode.NOSECRET and not crypto.digests_equal(owner_key.digest, self._token.payload):
            raise RemoteProtocolError(
                AlertCode.KEY_MISMATCH,
                f"owner key {owner_key.fingerprint} does not hash to the owner token this VM holds",
            )
        if not crypto.digests_equal(msg.seen_server_cert_sha256, self._own_cert_digest):
            raise RemoteProtocolError(
                AlertCode.CHANNEL_BINDING_MISMATCH,
                "the owner saw a different TLS certificate than this VM's: the connection is relayed",
            )
        self.peer_key = owner_key
        self.peer_cert = msg.owner_cert
        self._absorb(body)
        self._send(VmHello(mode=WIRE_MODE[self._mode], vm_nonce=self._rng(crypto.NONCE_BYTES),
                           vm_spki=self._key.public.spki))
        signature, tag = self._prove("vm")
        self._send(VmProof(signature=signature, mac=tag))
        return []

    def _on_owner_proof(self, msg: OwnerProof, body: bytes) -> list[Event]:
        self._verify_proof("owner", msg.signature, msg.mac)
        self._absorb(body)
        assert self.peer_key is not None
        return [OwnerAuthenticated(self.peer_key)]

    def confirm(self) -> ExchangeComplete:
        """Call once the owner key is pinned and the token recorded as consumed."""
        (event,) = self._local(Local.CONFIRM)
        assert isinstance(event, ExchangeComplete)
        return event

    def _on_confirm(self) -> list[Event]:
        assert self.peer_key is not None  # set by _on_owner_hello, the only way into this state
        signature, tag = self._prove("vm-confirm")
        self._send(VmConfirm(signature=signature, mac=tag))
        return [ExchangeComplete(self.peer_key)]

    # Every transition of the VM's side, sent and received (see _Session.TRANSITIONS).
    TRANSITIONS = {
        State.AWAIT_OWNER_HELLO: dict([received(OwnerHello, _on_owner_hello, State.AWAIT_OWNER_PROOF)]),
        State.AWAIT_OWNER_PROOF: dict([received(OwnerProof, _on_owner_proof, State.AWAIT_LOCAL_CONFIRM)]),
        State.AWAIT_LOCAL_CONFIRM: dict([called(Local.CONFIRM, _on_confirm, State.DONE)]),
    }
