"""The key-exchange state machines, sans-IO: bytes in, events and bytes out.

No sockets, no clock; randomness is injected. Each side runs inside one TLS connection and is
told the TLS server's certificate (its own, or the one the handshake showed), so the exchange is
bound to that connection. Either side may be the TLS server: the owner dials the VM's agent
(dial-in, the VM is the TLS server) or the VM dials the owner's listener (dial-out, the owner is
the TLS server). There is one state machine per role, not one per direction: dial-out adds the
VM's opening VmDial (and, on the owner's side, the local ``accept()`` once the listener knows
which token the VM holds); every later message is the same in both directions.

    owner                                            VM
                       (dial-out only)  <-  VmDial(mode, token_id, vm_cert, address, H(server cert))
    OwnerHello(mode, token_id, Na, owner_cert, H(server cert))  ->
                        <-  VmHello(mode, Nb, vm_spki), VmProof(sig_vm, mac_vm)
    OwnerProof(sig_owner, mac_owner)                          ->
                        <-  VmConfirm(sig_vm', mac_vm')   (after the VM pinned the owner key)

Channel binding, both directions: the TLS server's exchange key must be the key of its TLS
certificate (the owner checks VmHello's key dial-in, the VM checks OwnerHello's certificate
dial-out), and the TLS client reports the hash of the server certificate it saw, which the
server compares with its own. Every message body is folded into a running transcript hash TH.
Proofs cover TH up to and including the message before them, under role-specific labels, so a
proof cannot be reflected or moved to another session. In shared mode the MACs use keys derived
from K with one HKDF label per direction; in no-secrets mode each public key must hash to the
token the other side holds. See docs/protocol.md.

The sans-IO rule, whole (as in h11): for any bytes from the peer, ``receive_data`` returns events
or raises RemoteProtocolError, nothing else. Whatever else is raised while processing received
bytes (a crypto library's exception for a hostile key, a bug) becomes a RemoteProtocolError too,
with the state set to FAILED and an Alert queued. LocalProtocolError is only ever this side's own
misuse of the API (a call in the wrong state), never something a peer can cause. Every transition
is in the class's TRANSITIONS table, local calls (``initiate``, ``accept``, ``confirm``) included;
the one rule outside the table is that every state but DONE and FAILED goes to FAILED on a
protocol error, a close mid-exchange, or ``abort``.
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
    MAX_ADDRESS_BYTES,
    MESSAGE_TYPES,
    WIRE_MODE,
    Alert,
    FrameBuffer,
    Message,
    MessageType,
    OwnerHello,
    OwnerProof,
    VmConfirm,
    VmDial,
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
class VmDialled:
    """Owner side, dial-out: a VM dialled the listener. The listener finds the token it issued
    with ``token_id`` (and, in no-secrets mode, the VM token whose payload is ``vm_key_sha256``)
    and calls ``accept()``, or ``abort()`` when it expects no such VM. ``vm_cert`` is the VM's
    self-signed certificate of the key it is about to prove (the pin, once it has); ``owner_address``
    is what the VM dialled (VM-supplied text: printable ASCII, not yet checked as an address)."""

    mode: Mode
    token_id: bytes
    vm_key_sha256: bytes
    vm_cert: bytes
    owner_address: str


@dataclass(frozen=True)
class ExchangeComplete:
    """Both sides: the exchange finished; ``peer_key`` is the key to pin."""

    peer_key: crypto.PublicKey


Event = VmDialled | VmAuthenticated | OwnerAuthenticated | ExchangeComplete


class State(Enum):
    START = "start"
    AWAIT_VM_DIAL = "await-vm-dial"
    AWAIT_LOCAL_ACCEPT = "await-local-accept"
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
    ACCEPT = "accept()"
    CONFIRM = "confirm()"


class TlsRole(Enum):
    """This side's role in the TLS connection the exchange runs in."""

    SERVER = "server"
    CLIENT = "client"


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


def called(call: Local, handler: Callable[..., list[Event]], next_state: State) -> tuple[Trigger, Transition]:
    """A table row for a local call (``initiate()``, ``accept()``, ``confirm()``); the call's own
    arguments reach the handler."""
    return call, Transition(handler, next_state)


# ---- shared machinery ----------------------------------------------------------------------


class _Session:
    """Framing, transcript, the transition table and error handling shared by both roles."""

    role: str
    # state -> {trigger -> (handler, next state)}. A message absent here is out of order (a
    # RemoteProtocolError); a local call absent here is misuse (a LocalProtocolError).
    TRANSITIONS: ClassVar[dict[State, dict[Trigger, Transition]]]

    def __init__(self, *, key: crypto.PrivateKey, token: Token | None, rng: Random, initial: State,
                 tls_role: TlsRole) -> None:
        self._key = key
        self._token = token  # None only on a listening owner until accept()
        self._mode = token.mode if token is not None else Mode.SHARED
        self._rng = rng
        self.tls_role = tls_role
        self._frames = FrameBuffer()
        self._out = bytearray()
        self._th = crypto.sha256(_TRANSCRIPT_LABEL)
        self._mac_keys: dict[str, bytes] = {}
        self.state = initial
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

    def _local(self, trigger: Local, *args: object) -> list[Event]:
        """Run a local call through the table: misuse raises before anything changes. A check of
        the peer's TLS certificate that fails here is the peer's fault: FAILED, nothing sent."""
        handler, next_state = self._step(trigger)
        try:
            events = handler(self, *args)
        except RemoteProtocolError:
            self._out.clear()
            self.state = State.FAILED
            raise
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
            assert self._token is not None  # a MAC is made or checked only after OwnerHello
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
    """The owner's side.

    ``owner_cert`` is the owner's self-signed DER certificate; the VM pins it as the single
    trust anchor for the owner's later mutual-TLS connections.
    ``token`` is the owner's token for this VM: K in shared mode, or the no-secrets owner token
    (which must be the hash of ``owner_key``). ``vm_token`` is the VM token that came back
    through the site, required in no-secrets mode.

    Dial-in (the constructor: the owner is the TLS client): ``seen_server_cert`` is the DER
    certificate the TLS handshake showed; ``initiate()`` gives the OwnerHello.
    Dial-out (:meth:`listening`: the owner is the TLS server, presenting ``owner_cert``): the
    VM speaks first; on :class:`VmDialled` the listener calls ``accept(token, vm_token)``.
    """

    role = "owner"

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
        self._check_tokens(owner_key, token, vm_token)
        self._check_cert(owner_key, owner_cert)
        super().__init__(key=owner_key, token=token, rng=rng, initial=State.START, tls_role=TlsRole.CLIENT)
        self._owner_cert = owner_cert
        self._vm_token = vm_token
        self._server_cert = seen_server_cert
        self._dial: VmDialled | None = None
        try:
            self._seen_spki = crypto.certificate_spki(seen_server_cert)
        except crypto.CryptoError:
            self._seen_spki = b""

    @classmethod
    def listening(cls, *, owner_key: crypto.PrivateKey, owner_cert: bytes,
                  rng: Random = os.urandom) -> OwnerExchange:
        """The owner's side of a connection a VM dialled: the TLS server's certificate is
        ``owner_cert``, and the token is chosen by ``accept()`` once VmDial names it."""
        cls._check_cert(owner_key, owner_cert)
        self = cls.__new__(cls)
        _Session.__init__(self, key=owner_key, token=None, rng=rng, initial=State.AWAIT_VM_DIAL,
                          tls_role=TlsRole.SERVER)
        self._owner_cert = owner_cert
        self._vm_token = None
        self._server_cert = owner_cert
        self._dial = None
        self._seen_spki = b""
        return self

    @staticmethod
    def _check_tokens(owner_key: crypto.PrivateKey, token: Token, vm_token: Token | None) -> None:
        if token.kind is TokenKind.VM:
            raise LocalProtocolError("the owner's token must be a shared or no-secrets token")
        if token.mode is Mode.NOSECRET:
            if not crypto.digests_equal(token.payload, owner_key.public.digest):
                raise LocalProtocolError("the no-secrets token is not the hash of this owner's key")
            if vm_token is None or vm_token.kind is not TokenKind.VM:
                raise LocalProtocolError("no-secrets mode needs the VM token that came back through the site")

    @staticmethod
    def _check_cert(owner_key: crypto.PrivateKey, owner_cert: bytes) -> None:
        if not crypto.digests_equal(_own_certificate_spki(owner_cert), owner_key.public.spki):
            raise LocalProtocolError("the owner certificate does not carry the owner key")

    @property
    def seen_spki(self) -> bytes:
        """Dial-in: the key of the certificate the TLS handshake showed (b"" if it has none this
        side reads): what VmHello must name, and, in no-secrets mode, what must hash to the VM token."""
        return self._seen_spki

    @property
    def dial(self) -> VmDialled | None:
        """Dial-out: what the VM's VmDial said (None before it, and dial-in)."""
        return self._dial

    def initiate(self) -> bytes:
        """Dial-in: the OwnerHello to send first."""
        self._local(Local.INITIATE)
        return self.data_to_send()

    def accept(self, token: Token, vm_token: Token | None = None) -> None:
        """Dial-out: answer the VM's VmDial with the token issued for it (and in no-secrets mode
        the VM token the owner was given); queues the OwnerHello (``data_to_send``), as
        ``confirm()`` queues VmConfirm, so a driver's event handler may call it. A token that is
        not the one VmDial named is this side's mistake (LocalProtocolError, nothing changes)."""
        self._local(Local.ACCEPT, token, vm_token)

    def _send_hello(self) -> None:
        assert self._token is not None
        self._send(
            OwnerHello(
                mode=WIRE_MODE[self._mode],
                token_id=self._token.token_id,
                owner_nonce=self._rng(crypto.NONCE_BYTES),
                owner_cert=self._owner_cert,
                seen_server_cert_sha256=crypto.sha256(self._server_cert),
            )
        )

    def _on_initiate(self) -> list[Event]:
        self._send_hello()
        return []

    def _on_vm_dial(self, msg: VmDial, body: bytes) -> list[Event]:
        try:
            mode = next(m for m, wire in WIRE_MODE.items() if wire == msg.mode)
        except StopIteration:
            raise RemoteProtocolError(AlertCode.MALFORMED, f"VmDial names unknown mode {msg.mode}") from None
        if not crypto.digests_equal(msg.seen_server_cert_sha256, crypto.sha256(self._owner_cert)):
            raise RemoteProtocolError(
                AlertCode.CHANNEL_BINDING_MISMATCH,
                "the VM saw a different TLS certificate than this listener's: the connection is relayed",
            )
        address = msg.owner_address
        if not (address.isascii() and address.decode().isprintable()):
            raise RemoteProtocolError(AlertCode.MALFORMED, "the dialled owner address is not printable ASCII")
        try:
            vm_spki = crypto.self_signed_certificate_spki(msg.vm_cert)
        except crypto.CryptoError as exc:
            raise RemoteProtocolError(AlertCode.MALFORMED, f"VM certificate: {exc}") from None
        self._dial = VmDialled(mode, msg.token_id, crypto.sha256(vm_spki), msg.vm_cert, address.decode())
        self._absorb(body)
        return [self._dial]

    def _on_accept(self, token: Token, vm_token: Token | None) -> list[Event]:
        dial = self._dial
        assert dial is not None  # the only way into AWAIT_LOCAL_ACCEPT
        self._check_tokens(self._key, token, vm_token)
        if token.mode is not dial.mode or not crypto.digests_equal(token.token_id, dial.token_id):
            raise LocalProtocolError(f"accept() with token {token.token_id.hex()} ({token.mode.value}); "
                                     f"the VM dialled with {dial.token_id.hex()} ({dial.mode.value})")
        if vm_token is not None and not crypto.digests_equal(vm_token.payload, dial.vm_key_sha256):
            raise LocalProtocolError("accept() with a VM token that is not the one VmDial named")
        self._token, self._mode, self._vm_token = token, token.mode, vm_token
        self._send_hello()
        return []

    def _on_vm_hello(self, msg: VmHello, body: bytes) -> list[Event]:
        self._check_mode(msg.mode)
        vm_key = self._parse_key(msg.vm_spki)
        if self.tls_role is TlsRole.CLIENT and not crypto.digests_equal(vm_key.spki, self._seen_spki):
            raise RemoteProtocolError(
                AlertCode.KEY_MISMATCH,
                "the VM key in the exchange is not the key of the TLS certificate this connection showed",
            )
        if self._dial is not None and not crypto.digests_equal(vm_key.digest, self._dial.vm_key_sha256):
            raise RemoteProtocolError(
                AlertCode.KEY_MISMATCH,
                f"the VM key {vm_key.fingerprint} is not the key of the certificate the VM sent when it dialled",
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

    # Every transition of the owner's side, sent and received, both directions (see
    # _Session.TRANSITIONS): dial-in starts at START, dial-out at AWAIT_VM_DIAL.
    TRANSITIONS = {
        State.START: dict([called(Local.INITIATE, _on_initiate, State.AWAIT_VM_HELLO)]),
        State.AWAIT_VM_DIAL: dict([received(VmDial, _on_vm_dial, State.AWAIT_LOCAL_ACCEPT)]),
        State.AWAIT_LOCAL_ACCEPT: dict([called(Local.ACCEPT, _on_accept, State.AWAIT_VM_HELLO)]),
        State.AWAIT_VM_HELLO: dict([received(VmHello, _on_vm_hello, State.AWAIT_VM_PROOF)]),
        State.AWAIT_VM_PROOF: dict([received(VmProof, _on_vm_proof, State.AWAIT_VM_CONFIRM)]),
        State.AWAIT_VM_CONFIRM: dict([received(VmConfirm, _on_vm_confirm, State.DONE)]),
    }


# ---- VM ------------------------------------------------------------------------------------


class VmExchange(_Session):
    """The VM's side.

    Dial-in (the constructor: the VM is the TLS server): ``own_cert`` is the DER certificate
    it presents in TLS, and the owner speaks first.
    Dial-out (:meth:`dialling`: the VM is the TLS client): ``server_cert`` is the certificate
    the owner's listener showed and ``owner_address`` what the VM dialled; ``initiate()``
    gives the VmDial, after checking (in no-secrets mode) that the listener's key hashes to
    the owner token, so nothing at all is sent to a listener that is not the owner.
    """

    role = "vm"

    def __init__(
        self, *, vm_key: crypto.PrivateKey, token: Token, own_cert: bytes, rng: Random = os.urandom
    ) -> None:
        if not crypto.digests_equal(crypto.certificate_spki(own_cert), vm_key.public.spki):
            raise LocalProtocolError("the TLS certificate does not carry the VM key")
        self._setup(vm_key, token, rng, State.AWAIT_OWNER_HELLO, TlsRole.SERVER, own_cert, b"")
        self._own_cert = own_cert

    @classmethod
    def dialling(cls, *, vm_key: crypto.PrivateKey, token: Token, own_cert: bytes, server_cert: bytes,
                 owner_address: str, rng: Random = os.urandom) -> VmExchange:
        encoded = owner_address.encode("ascii", "strict") if owner_address.isascii() else b""
        if not encoded or len(encoded) > MAX_ADDRESS_BYTES or not owner_address.isprintable():
            raise LocalProtocolError(f"the owner address must be 1..{MAX_ADDRESS_BYTES} printable ASCII characters")
        if not crypto.digests_equal(crypto.certificate_spki(own_cert), vm_key.public.spki):
            raise LocalProtocolError("the VM certificate does not carry the VM key")
        self = cls.__new__(cls)
        self._setup(vm_key, token, rng, State.START, TlsRole.CLIENT, server_cert, encoded)
        self._own_cert = own_cert
        return self

    def _setup(self, vm_key: crypto.PrivateKey, token: Token, rng: Random, initial: State, tls_role: TlsRole,
               server_cert: bytes, owner_address: bytes) -> None:
        if token.kind is TokenKind.VM:
            raise LocalProtocolError("the VM must be given the owner's token, not its own")
        _Session.__init__(self, key=vm_key, token=token, rng=rng, initial=initial, tls_role=tls_role)
        self._server_cert = server_cert
        self._server_cert_digest = crypto.sha256(server_cert)
        self._owner_address = owner_address
        self.peer_cert: bytes | None = None

    def initiate(self) -> bytes:
        """Dial-out: the VmDial to send first. RemoteProtocolError (FAILED, nothing to send)
        when the listener's certificate cannot be the owner's."""
        self._local(Local.INITIATE)
        return self.data_to_send()

    def _server_spki(self) -> bytes:
        try:
            return crypto.certificate_spki(self._server_cert)
        except crypto.CryptoError as exc:
            raise RemoteProtocolError(AlertCode.MALFORMED, f"the listener's TLS certificate: {exc}") from None

    def _on_initiate(self) -> list[Event]:
        assert self._token is not None
        if self._mode is Mode.NOSECRET:
            server_key = self._parse_key(self._server_spki())
            if not crypto.digests_equal(server_key.digest, self._token.payload):
                raise RemoteProtocolError(
                    AlertCode.KEY_MISMATCH,
                    f"the listener's TLS key {server_key.fingerprint} does not hash to the owner token "
                    "this VM holds: it is not the owner (nothing was sent)",
                )
        self._send(VmDial(mode=WIRE_MODE[self._mode], token_id=self._token.token_id,
                          vm_cert=self._own_cert, owner_address=self._owner_address,
                          seen_server_cert_sha256=self._server_cert_digest))
        return []

    def _on_owner_hello(self, msg: OwnerHello, body: bytes) -> list[Event]:
        assert self._token is not None
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
        if self.tls_role is TlsRole.CLIENT and not crypto.digests_equal(owner_key.spki, self._server_spki()):
            raise RemoteProtocolError(
                AlertCode.KEY_MISMATCH,
                "the owner key in the exchange is not the key of the TLS certificate the listener showed",
            )
        if not crypto.digests_equal(msg.seen_server_cert_sha256, self._server_cert_digest):
            raise RemoteProtocolError(
                AlertCode.CHANNEL_BINDING_MISMATCH,
                "the owner names a different TLS server certificate than this connection's: it is relayed",
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

    # Every transition of the VM's side, sent and received, both directions (see
    # _Session.TRANSITIONS): dial-in starts at AWAIT_OWNER_HELLO, dial-out at START.
    TRANSITIONS = {
        State.START: dict([called(Local.INITIATE, _on_initiate, State.AWAIT_OWNER_HELLO)]),
        State.AWAIT_OWNER_HELLO: dict([received(OwnerHello, _on_owner_hello, State.AWAIT_OWNER_PROOF)]),
        State.AWAIT_OWNER_PROOF: dict([received(OwnerProof, _on_owner_proof, State.AWAIT_LOCAL_CONFIRM)]),
        State.AWAIT_LOCAL_CONFIRM: dict([called(Local.CONFIRM, _on_confirm, State.DONE)]),
    }
