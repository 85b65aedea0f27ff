"""The sans-IO rule, whole: for any input from the peer, only a protocol error leaves the core.

Two depths (issue 9, item 5):

* the crypto facade: every parser of peer bytes raises CryptoError and nothing else, whatever the
  library underneath raises. cryptography 38 (Debian 12) says ValueError for an SPKI with an
  unknown algorithm OID, 50 says UnsupportedAlgorithm; the hand-built SPKIs below exercise the
  real library of whatever release the suite runs on, the injected exceptions every release.
* the state machines: any exception raised while processing received bytes is a
  RemoteProtocolError, with the state FAILED and an Alert queued; local misuse is a
  LocalProtocolError that changes nothing.

And end to end: `imprint bind` against an agent whose VmHello key has an unknown algorithm
exits 3 with one line (not 1 with a traceback); a real agent sent such an owner certificate
answers with an Alert and keeps serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from imprint import crypto, tls, tokens
from imprint.protocol.driver import ExchangeDriver
from imprint.protocol.errors import AlertCode, LocalProtocolError, RemoteProtocolError
from imprint.protocol.exchange import Local, OwnerExchange, State, VmExchange
from imprint.protocol.messages import (
    MESSAGE_TYPES,
    WIRE_MODE,
    Alert,
    FrameBuffer,
    Message,
    MessageType,
    OwnerHello,
    VmHello,
    WireMode,
    decode_body,
    encode_frame,
)
from imprint.tokens import Mode

from tests.helpers import AgentFactory, Owner
from tests.helpers.exchange import (
    decoded,
    owner_listening_session,
    owner_session,
    split_frames,
    vm_dialling_session,
    vm_session,
)
from tests.helpers.keys import NOSECRET, OWNER_CERT, OWNER_KEY, VM_CERT, VM_TOKEN, K

IO_TIMEOUT = 20.0  # upper bound on a socket wait in the hand-made peers below

# ---- DER by hand: the library must not be the one to build what it is asked to refuse


def der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def oid(*arcs: int) -> bytes:
    def base128(value: int) -> bytes:
        out = [value & 0x7F]
        while value := value >> 7:
            out.append(0x80 | (value & 0x7F))
        return bytes(reversed(out))

    return der(0x06, base128(40 * arcs[0] + arcs[1]) + b"".join(base128(a) for a in arcs[2:]))


def spki(algorithm: bytes, key: bytes, params: bytes = b"") -> bytes:
    return der(0x30, der(0x30, algorithm + params) + der(0x03, b"\0" + key))


KEY32 = hashlib.sha256(b"imprint tests sans-io key").digest()
ED25519 = oid(1, 3, 101, 112)
# 1.3.101.99: the Ed25519 arc with an unassigned last number; same length as Ed25519's, so it
# can replace the OID inside a certificate without touching any length.
UNKNOWN = oid(1, 3, 101, 99)
UNKNOWN_OID_SPKI = spki(UNKNOWN, KEY32)
HOSTILE_SPKIS = {
    "unknown OID 1.3.101.99": UNKNOWN_OID_SPKI,
    "unknown OID 1.4.101.112 (what the property test found)": spki(oid(1, 4, 101, 112), KEY32),
    "unknown private-arc OID 1.3.6.1.4.1.99999.1": spki(oid(1, 3, 6, 1, 4, 1, 99999, 1), KEY32),
    "huge OID arc": spki(oid(1, 3, 2**200), KEY32),
    "Ed448 OID with a 32-byte key": spki(oid(1, 3, 101, 113), KEY32),
    "X25519 (a valid key, not a signing key)": spki(oid(1, 3, 101, 110), KEY32),
    "RSA OID with garbage": spki(oid(1, 2, 840, 113549, 1, 1, 1), KEY32, der(0x05, b"")),
    "EC with an unknown curve": spki(oid(1, 2, 840, 10045, 2, 1), b"\x04" + KEY32 * 2, oid(1, 3, 99, 1)),
    "Ed25519 with NULL parameters (not canonical)": spki(ED25519, KEY32, der(0x05, b"")),
    "Ed25519 key of 31 bytes": spki(ED25519, KEY32[:31]),
}


MODES = list(Mode)


def with_unknown_key_oid(cert: bytes) -> bytes:
    """``cert`` with its SubjectPublicKeyInfo's Ed25519 OID replaced by 1.3.101.99."""
    spki_der = crypto.certificate_spki(cert)
    assert cert.count(spki_der) == 1
    return cert.replace(spki_der, spki_der.replace(ED25519, UNKNOWN, 1))


def test_the_der_builder_builds_what_the_library_builds() -> None:
    # The builder is right (so the hostile SPKIs are what they say): it reproduces a real key.
    assert spki(ED25519, OWNER_KEY.public.spki[-32:]) == OWNER_KEY.public.spki
    assert len(UNKNOWN_OID_SPKI) == crypto.SPKI_BYTES


# ---- the crypto facade


@pytest.mark.parametrize("name", list(HOSTILE_SPKIS))
def test_hostile_spki_is_a_crypto_error_on_this_cryptography(name: str) -> None:
    with pytest.raises(crypto.CryptoError):
        crypto.PublicKey.from_spki(HOSTILE_SPKIS[name])


def test_certificate_with_an_unknown_key_algorithm_is_a_crypto_error() -> None:
    hostile = with_unknown_key_oid(OWNER_CERT)
    for parse in (crypto.self_signed_certificate_spki, crypto.certificate_spki):
        with pytest.raises(crypto.CryptoError):
            parse(hostile)
    pem = ssl.DER_cert_to_PEM_cert(hostile).encode()
    with pytest.raises(crypto.CryptoError):
        crypto.certificate_spki(pem)


class Surprise(Exception):
    """An exception type no caller could have listed."""


# What a library may raise for hostile bytes in some release: the real UnsupportedAlgorithm of
# cryptography 50 (a plain Exception subclass, not ValueError), and kinds no one lists.
INJECTED: list[Callable[[], BaseException]] = [
    lambda: UnsupportedAlgorithm("Unknown key type: 1.3.101.99"),
    Surprise,
    lambda: KeyError("x"),
    lambda: TypeError("x"),
    lambda: OverflowError("x"),
    lambda: RecursionError("x"),
    lambda: AssertionError("x"),
]
INJECTED_IDS = ["UnsupportedAlgorithm", "Surprise", "KeyError", "TypeError", "OverflowError", "RecursionError",
                "AssertionError"]


def raiser(make: Callable[[], BaseException]) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        raise make()

    return fail


FACADE_PARSERS: dict[str, tuple[object, str, Callable[[], object]]] = {
    # A canonical Ed25519 SPKI is parsed from its raw 32 bytes (crypto._ED25519_SPKI_HEADER).
    "PublicKey.from_spki": (ed25519.Ed25519PublicKey, "from_public_bytes",
                            lambda: crypto.PublicKey.from_spki(OWNER_KEY.public.spki)),
    "PublicKey.verify": (ed25519.Ed25519PublicKey, "from_public_bytes",
                         lambda: OWNER_KEY.public.verify(OWNER_KEY.sign(b"m"), b"m")),
    "PrivateKey.from_pem": (serialization, "load_pem_private_key",
                            lambda: crypto.PrivateKey.from_pem(OWNER_KEY.to_pem())),
    "self_signed_certificate_spki": (x509, "load_der_x509_certificate",
                                     lambda: crypto.self_signed_certificate_spki(OWNER_CERT)),
    "certificate_spki": (x509, "load_der_x509_certificate", lambda: crypto.certificate_spki(OWNER_CERT)),
    "certificate_der": (x509, "load_pem_x509_certificate",
                        lambda: crypto.certificate_der(OWNER_KEY.self_signed_certificate("o"))),
}


@pytest.mark.parametrize("make", INJECTED, ids=INJECTED_IDS)
@pytest.mark.parametrize("parser", list(FACADE_PARSERS))
def test_every_facade_parser_turns_any_library_exception_into_crypto_error(
        monkeypatch: pytest.MonkeyPatch, parser: str, make: Callable[[], BaseException]) -> None:
    module, attribute, call = FACADE_PARSERS[parser]
    call()  # works before the library is made to fail
    monkeypatch.setattr(module, attribute, raiser(make))
    with pytest.raises(crypto.CryptoError) as info:
        call()
    assert type(make()).__name__ in str(info.value)
    assert isinstance(info.value.__cause__, type(make()))  # kept for a debug log


def test_a_signature_failure_inside_the_library_is_a_crypto_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ed25519.Ed25519PublicKey, "verify", raiser(Surprise), raising=False)
    key = crypto.PublicKey.from_spki(OWNER_KEY.public.spki)
    with pytest.raises(crypto.CryptoError):
        key.verify(bytes(64), b"m")


# ---- the state machines


def assert_refused(session: OwnerExchange | VmExchange, info: pytest.ExceptionInfo[RemoteProtocolError],
                   code: AlertCode) -> None:
    """The failed side is FAILED, refuses further input as misuse, and has exactly one Alert to send."""
    assert info.type is RemoteProtocolError
    assert info.value.code is code and not info.value.from_peer
    assert session.state is State.FAILED
    assert decoded(session.data_to_send()) == [Alert(int(code), _alert_text(code))]
    with pytest.raises(LocalProtocolError):
        session.receive_data(b"\0")


def _alert_text(code: AlertCode) -> bytes:
    from imprint.protocol.errors import ALERT_TEXT

    return ALERT_TEXT[code].encode()


def vm_hello_frame(mode: Mode, vm_spki: bytes) -> bytes:
    return encode_frame(VmHello(mode=int(WIRE_MODE[mode]), vm_nonce=bytes(32), vm_spki=vm_spki))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(HOSTILE_SPKIS))
def test_owner_refuses_a_vm_hello_with_a_hostile_key(mode: Mode, name: str) -> None:
    owner = owner_session(mode)
    owner.initiate()
    with pytest.raises(RemoteProtocolError) as info:
        owner.receive_data(vm_hello_frame(mode, HOSTILE_SPKIS[name]))
    assert_refused(owner, info, AlertCode.MALFORMED)
    assert "peer public key" in info.value.detail


@pytest.mark.parametrize("mode", MODES)
def test_vm_refuses_an_owner_certificate_with_an_unknown_key_algorithm(mode: Mode) -> None:
    hello = OwnerHello(mode=int(WIRE_MODE[mode]),
                       token_id=(K if mode is Mode.SHARED else NOSECRET).token_id, owner_nonce=bytes(32),
                       owner_cert=with_unknown_key_oid(OWNER_CERT),
                       seen_server_cert_sha256=crypto.sha256(VM_CERT))
    vm = vm_session(mode)
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(encode_frame(hello))
    assert_refused(vm, info, AlertCode.MALFORMED)
    assert vm.peer_key is None


def vm_dial_frame(token_mode: Mode, **changes: object) -> bytes:
    """The genuine VmDial of ``token_mode`` with ``changes``: bytes a hostile dialler may send."""
    import dataclasses

    (dial,) = decoded(vm_dialling_session(token_mode).initiate())
    return encode_frame(dataclasses.replace(dial, **changes))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("case", "changes"), [
    ("mode 0", {"mode": 0}), ("mode 3", {"mode": 3}), ("mode 255", {"mode": 255}),
    ("address with NUL", {"owner_address": b"owner\x00:7444"}),
    ("address with ESC", {"owner_address": b"\x1b[2Jowner:7444"}),
    ("address with newline", {"owner_address": b"owner:7444\nIMPRINT-VM-TOKEN x"}),
    ("address with DEL", {"owner_address": b"owner\x7f:7444"}),
    ("address not ASCII (Latin-1)", {"owner_address": b"\xf3wner:7444"}),
    ("address not ASCII (UTF-8)", {"owner_address": "ówner:7444".encode()}),
    ("certificate with an unknown key algorithm", {"vm_cert": with_unknown_key_oid(VM_CERT)}),
    ("certificate not DER", {"vm_cert": b"\x30\x03\x02\x01\x01"}),
    ("certificate not self-signed", {"vm_cert": VM_CERT[:-1] + bytes([VM_CERT[-1] ^ 1])}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_the_listener_refuses_a_hostile_vm_dial_as_malformed(mode: Mode, case: str, changes: dict[str, object]) -> None:
    listener = owner_listening_session()
    with pytest.raises(RemoteProtocolError) as info:
        listener.receive_data(vm_dial_frame(mode, **changes))
    assert_refused(listener, info, AlertCode.MALFORMED)
    assert listener.dial is None


def reach_vm_dial(mode: Mode) -> tuple[OwnerExchange | VmExchange, bytes]:
    return owner_listening_session(), vm_dialling_session(mode).initiate()


def reach_dialled_owner_hello(mode: Mode) -> tuple[OwnerExchange | VmExchange, bytes]:
    owner, vm = owner_listening_session(), vm_dialling_session(mode)
    owner.receive_data(vm.initiate())
    owner.accept(*((K, None) if mode is Mode.SHARED else (NOSECRET, VM_TOKEN)))
    return vm, owner.data_to_send()


# Each step of each side, and the crypto function it calls on the peer's bytes there. ``reach``
# brings a fresh pair to the step and returns the side under test and the bytes it is fed next.
Reach = Callable[[str], tuple[OwnerExchange | VmExchange, bytes]]


def reach_owner_hello(mode: Mode) -> tuple[OwnerExchange | VmExchange, bytes]:
    return vm_session(mode), owner_session(mode).initiate()


def reach_owner_proof(mode: Mode) -> tuple[OwnerExchange | VmExchange, bytes]:
    owner, vm = owner_session(mode), vm_session(mode)
    vm.receive_data(owner.initiate())
    owner.receive_data(vm.data_to_send())
    return vm, owner.data_to_send()


def reach_vm_flight(mode: Mode) -> tuple[OwnerExchange | VmExchange, bytes]:
    owner, vm = owner_session(mode), vm_session(mode)
    vm.receive_data(owner.initiate())
    return owner, vm.data_to_send()


def reach_vm_confirm(mode: Mode) -> tuple[OwnerExchange | VmExchange, bytes]:
    owner, vm = owner_session(mode), vm_session(mode)
    vm.receive_data(owner.initiate())
    owner.receive_data(vm.data_to_send())
    vm.receive_data(owner.data_to_send())
    vm.confirm()
    return owner, vm.data_to_send()


STEPS: dict[str, tuple[Reach, object, str]] = {
    "vm/OwnerHello/self_signed_certificate_spki": (reach_owner_hello, crypto, "self_signed_certificate_spki"),
    "vm/OwnerHello/from_spki": (reach_owner_hello, crypto.PublicKey, "from_spki"),
    "vm/OwnerHello/digests_equal": (reach_owner_hello, crypto, "digests_equal"),
    "vm/OwnerProof/verify": (reach_owner_proof, crypto.PublicKey, "verify"),
    "vm/OwnerProof/hkdf": (reach_owner_proof, crypto, "hkdf"),
    "owner/VmHello/from_spki": (reach_vm_flight, crypto.PublicKey, "from_spki"),
    "owner/VmProof/verify": (reach_vm_flight, crypto.PublicKey, "verify"),
    "owner/VmConfirm/verify": (reach_vm_confirm, crypto.PublicKey, "verify"),
    "owner/VmConfirm/sha256": (reach_vm_confirm, crypto, "sha256"),
    # dial-out: the listener at AWAIT_VM_DIAL, the dialling VM at its OwnerHello
    "owner/VmDial/self_signed_certificate_spki": (reach_vm_dial, crypto, "self_signed_certificate_spki"),
    "owner/VmDial/digests_equal": (reach_vm_dial, crypto, "digests_equal"),
    "owner/VmDial/sha256": (reach_vm_dial, crypto, "sha256"),
    "vm/OwnerHello/certificate_spki": (reach_dialled_owner_hello, crypto, "certificate_spki"),
    "vm/OwnerHello/digests_equal (dial-out)": (reach_dialled_owner_hello, crypto, "digests_equal"),
}


@pytest.mark.parametrize("make", INJECTED, ids=INJECTED_IDS)
@pytest.mark.parametrize(("mode", "step"), [(mode, step) for mode in MODES for step in STEPS
                                            if not (mode is Mode.NOSECRET and step.endswith("/hkdf"))])  # no MAC key
def test_an_exception_injected_while_processing_peer_bytes_is_a_remote_protocol_error(
        monkeypatch: pytest.MonkeyPatch, mode: Mode, step: str, make: Callable[[], BaseException]) -> None:
    reach, target, attribute = STEPS[step]
    session, data = reach(mode)
    before = session.state
    monkeypatch.setattr(target, attribute, raiser(make))
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(data)
    monkeypatch.undo()
    assert_refused(session, info, AlertCode.MALFORMED)
    assert before is not State.FAILED
    assert isinstance(info.value.__cause__, type(make()))
    assert type(make()).__name__ in info.value.detail
    assert step.split("/")[1] in info.value.detail  # names the message that could not be processed


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_injected_rng_while_answering_is_a_remote_protocol_error(mode: Mode) -> None:
    vm = vm_session(mode, rng=raiser(lambda: OSError("getrandom failed")))  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(owner_session(mode).initiate())
    assert_refused(vm, info, AlertCode.MALFORMED)


def test_keyboard_interrupt_is_not_converted_but_the_session_is_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    vm, data = reach_owner_hello(Mode.SHARED)
    monkeypatch.setattr(crypto, "self_signed_certificate_spki", raiser(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        vm.receive_data(data)
    assert vm.state is State.FAILED
    assert vm.data_to_send() == b""  # no half-built flight leaves


def test_the_peers_alert_text_is_rendered_printable() -> None:
    owner = owner_session(Mode.SHARED)
    owner.initiate()
    detail = b"\x1b[2J\x1b]0;owned\x07line one\r\nIMPRINT-VM-TOKEN imprint1v-x \xff\\"
    with pytest.raises(RemoteProtocolError) as info:
        owner.receive_data(encode_frame(Alert(int(AlertCode.WRONG_TOKEN), detail)))
    text = info.value.detail
    assert info.value.from_peer and info.value.code is AlertCode.WRONG_TOKEN
    assert text.isprintable(), text
    assert text == "peer refused: \\x1b[2J\\x1b]0;owned\\x07line one\\r\\nIMPRINT-VM-TOKEN imprint1v-x \\xff\\"
    assert owner.state is State.FAILED and owner.data_to_send() == b""  # the peer said why; nothing to add


def test_the_peers_alert_text_keeps_printable_utf8_and_escapes_the_rest() -> None:
    vm = vm_session(Mode.SHARED)
    detail = "café \u202eevil\u2028next \u00a0\u009b2J".encode()
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(encode_frame(Alert(int(AlertCode.INTERNAL), detail)))
    assert info.value.detail == "peer refused: café \\u202eevil\\u2028next \\xa0\\x9b2J"


def test_an_unknown_alert_code_is_internal() -> None:
    vm = vm_session(Mode.SHARED)
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(encode_frame(Alert(200, b"")))
    assert info.value.code is AlertCode.INTERNAL and info.value.from_peer


# ---- the table owns every transition


OWNER_STATES = [State.START, State.AWAIT_VM_DIAL, State.AWAIT_LOCAL_ACCEPT, State.AWAIT_VM_HELLO,
                State.AWAIT_VM_PROOF, State.AWAIT_VM_CONFIRM, State.DONE]
VM_STATES = [State.START, State.AWAIT_OWNER_HELLO, State.AWAIT_OWNER_PROOF, State.AWAIT_LOCAL_CONFIRM, State.DONE]
# Where each direction starts: a state no transition leads to.
INITIAL = {"owner": {State.START, State.AWAIT_VM_DIAL}, "vm": {State.START}}
# (direction, state) of every state a genuine exchange brings each side to.
REACHED = {
    "owner": [("dial-in", s) for s in (State.START, State.AWAIT_VM_HELLO, State.AWAIT_VM_PROOF,
                                       State.AWAIT_VM_CONFIRM, State.DONE)]
    + [("dial-out", s) for s in (State.AWAIT_VM_DIAL, State.AWAIT_LOCAL_ACCEPT, State.AWAIT_VM_HELLO,
                                 State.AWAIT_VM_PROOF, State.AWAIT_VM_CONFIRM, State.DONE)],
    "vm": [("dial-in", s) for s in (State.AWAIT_OWNER_HELLO, State.AWAIT_OWNER_PROOF, State.AWAIT_LOCAL_CONFIRM,
                                    State.DONE)]
    + [("dial-out", s) for s in VM_STATES],
}


def session_at(side: str, mode: Mode, state: State, direction: str = "dial-in") -> OwnerExchange | VmExchange:
    """A fresh session of ``side`` driven by the genuine exchange, frame by frame, to ``state``
    (each side under the one driver; the VM confirms, and the dial-out owner accepts, as steps
    of their own)."""
    if direction == "dial-out":
        owner, vm = owner_listening_session(), vm_dialling_session(mode)
    else:
        owner, vm = owner_session(mode), vm_session(mode)
    owner_driver, vm_driver = ExchangeDriver(owner), ExchangeDriver(vm)
    me = owner if side == "owner" else vm
    flight: list[bytes] = []
    opening: list[Callable[[], object]] = [
        lambda: flight.extend(split_frames(vm_driver.feed(owner_driver.opening()).to_send)),
    ] if direction == "dial-in" else [
        lambda: flight.append(vm_driver.opening()),
        lambda: owner_driver.feed(flight.pop()),  # VmDial: the listener is told VmDialled
        lambda: owner.accept(*((K, None) if mode is Mode.SHARED else (NOSECRET, VM_TOKEN))),
        lambda: flight.extend(split_frames(vm_driver.feed(owner.data_to_send()).to_send)),
    ]
    steps: list[Callable[[], object]] = [
        *opening,
        lambda: owner_driver.feed(flight.pop(0)),  # VmHello alone
        lambda: flight.append(owner_driver.feed(flight.pop(0)).to_send),  # VmProof, answered by OwnerProof
        lambda: vm_driver.feed(flight.pop()),
        vm.confirm,
        lambda: owner_driver.feed(vm.data_to_send()),
    ]
    for step in [lambda: None, *steps]:
        step()
        if me.state is state:
            me.data_to_send()
            return me
    raise AssertionError(f"the genuine exchange never brings the {side} to {state}")


def some_message(message_type: MessageType) -> bytes:
    cls = MESSAGE_TYPES[message_type]
    values: list[object] = []
    for spec in cls.SCHEMA:
        size = getattr(spec, "size", None) or getattr(spec, "lo", None)
        values.append(1 if size is None else bytes(max(size, 1)))
    return encode_frame(cls(*values))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["owner", "vm"])
def test_every_message_the_table_does_not_list_is_unexpected(side: str, mode: Mode) -> None:
    cls = OwnerExchange if side == "owner" else VmExchange
    states = OWNER_STATES if side == "owner" else VM_STATES
    # The table names exactly the live states; DONE and FAILED have no way on; every state but
    # the initial ones is reached by a transition.
    assert list(cls.TRANSITIONS) == states[:-1]
    assert {next_state for steps in cls.TRANSITIONS.values() for _, next_state in steps.values()} == \
        set(states) - INITIAL[side]
    assert {state for _, state in REACHED[side]} == set(states)
    for direction, state in REACHED[side]:
        listed = cls.TRANSITIONS.get(state, {})
        for message_type in MessageType:
            if message_type in listed or message_type is MessageType.ALERT:
                continue
            session = session_at(side, mode, state, direction)
            with pytest.raises(RemoteProtocolError) as info:
                session.receive_data(some_message(message_type))
            assert info.value.code is AlertCode.UNEXPECTED_MESSAGE, (direction, state, message_type)
            assert session.state is State.FAILED


def test_local_calls_go_through_the_table_and_misuse_changes_nothing() -> None:
    assert OwnerExchange.TRANSITIONS[State.START] == {
        Local.INITIATE: (OwnerExchange._on_initiate, State.AWAIT_VM_HELLO)}
    assert VmExchange.TRANSITIONS[State.AWAIT_LOCAL_CONFIRM] == {Local.CONFIRM: (VmExchange._on_confirm, State.DONE)}
    owner = owner_session(Mode.SHARED)
    hello = owner.initiate()
    assert owner.state is State.AWAIT_VM_HELLO
    with pytest.raises(LocalProtocolError, match=r"initiate\(\) in state await-vm-hello"):
        owner.initiate()
    assert owner.state is State.AWAIT_VM_HELLO and owner.data_to_send() == b""
    vm = vm_session(Mode.SHARED)
    with pytest.raises(LocalProtocolError, match=r"confirm\(\) in state await-owner-hello"):
        vm.confirm()
    assert vm.state is State.AWAIT_OWNER_HELLO
    vm.receive_data(hello)
    with pytest.raises(LocalProtocolError):
        vm.confirm()
    assert vm.state is State.AWAIT_OWNER_PROOF


def test_receive_data_of_the_wrong_type_is_local_misuse() -> None:
    vm = vm_session(Mode.SHARED)
    with pytest.raises(LocalProtocolError):
        vm.receive_data("OwnerHello")  # type: ignore[arg-type]
    assert vm.state is State.AWAIT_OWNER_HELLO


def test_abort_fails_every_live_state_and_leaves_terminal_ones() -> None:
    for side in ("owner", "vm"):
        for direction, state in REACHED[side]:
            session = session_at(side, Mode.SHARED, state, direction)
            session.abort(AlertCode.INTERNAL, "storage failed")
            sent = decoded(session.data_to_send())
            if state is State.DONE:
                assert session.state is State.DONE and sent == []
            else:
                assert session.state is State.FAILED
                assert sent == [Alert(int(AlertCode.INTERNAL), b"storage failed")]


# ---- end to end: the real CLI and a real agent


class HostileAgent:
    """A TLS listener that answers the owner's OwnerHello with a VmHello carrying ``vm_spki``."""

    def __init__(self, workdir: Path, vm_spki: bytes) -> None:
        key = crypto.PrivateKey.generate()
        self.cert_file, self.key_file = workdir / "hostile.crt", workdir / "hostile.key"
        self.cert_file.write_bytes(key.self_signed_certificate("hostile"))
        self.key_file.write_bytes(key.to_pem())
        self._spki = vm_spki
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(IO_TIMEOUT)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.received: list[Message] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
            conn.settimeout(IO_TIMEOUT)
            ctx = tls.agent_bind_context(str(self.cert_file), str(self.key_file))
            with ctx.wrap_socket(conn, server_side=True) as sock:
                frames = FrameBuffer()
                while (data := sock.recv(4096)):
                    frames.feed(data)
                    while (body := frames.next_body()) is not None:
                        message = decode_body(body)
                        self.received.append(message)
                        if isinstance(message, OwnerHello):
                            sock.sendall(vm_hello_frame(Mode.SHARED, self._spki))
        except (OSError, ssl.SSLError) as exc:
            if not isinstance(exc, ssl.SSLEOFError):
                self.errors.append(exc)

    @contextlib.contextmanager
    def running(self) -> Iterator[HostileAgent]:
        self._thread.start()
        try:
            yield self
        finally:
            self._thread.join(IO_TIMEOUT)
            self._listener.close()
            assert not self._thread.is_alive()


def test_bind_to_an_agent_whose_key_has_an_unknown_algorithm_exits_3(tmp_path: Path, owner: Owner) -> None:
    owner.token("web1", "shared")
    with HostileAgent(tmp_path, UNKNOWN_OID_SPKI).running() as agent:
        result = owner.run("bind", "web1", "--address", agent.address, check=3)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MALFORMED" in lines[0] and "nothing was pinned" in lines[0], result.stderr
    assert not agent.errors, agent.errors
    # The owner told the hostile agent why, in an Alert, after its OwnerHello.
    assert [type(m) for m in agent.received] == [OwnerHello, Alert]
    assert agent.received[1] == Alert(int(AlertCode.MALFORMED), _alert_text(AlertCode.MALFORMED))
    assert owner.json("list")["vms"][0]["state"] == "unbound"  # type: ignore[index]


def test_a_real_agent_refuses_an_owner_certificate_with_an_unknown_key_algorithm(
        agents: AgentFactory, owner: Owner) -> None:
    token_text = owner.token("web1", "shared")
    agent = agents.start(agents.make_root(token_text))
    hostile_cert = with_unknown_key_oid(OWNER_CERT)
    hello = OwnerHello(mode=int(WireMode.SHARED), token_id=tokens.parse(token_text).token_id,
                       owner_nonce=bytes(32), owner_cert=hostile_cert, seen_server_cert_sha256=bytes(32))
    raw = socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT)
    with tls.owner_bind_context().wrap_socket(raw) as sock:
        sock.sendall(encode_frame(hello))
        reply = b""
        while (data := sock.recv(4096)):
            reply += data
    assert decoded(reply) == [Alert(int(AlertCode.MALFORMED), _alert_text(AlertCode.MALFORMED))]
    assert agent.proc.poll() is None, agent.log()
    assert "Traceback" not in agent.log()
    # ...and still binds its genuine owner afterwards.
    owner.run("bind", "web1", "--address", agent.address)
