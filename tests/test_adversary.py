"""An adversary in the link of the sans-IO key exchange.

An owner session (TLS client side) and a VM session (TLS server side) talk through a link that
is pumped frame by frame. An attacker callback sees every frame and decides what each side
receives: it may forward, alter, drop (the link then closes), duplicate, delay, reflect or inject.

Invariants checked after every attack (``check_invariants``):

* a side that did not complete ends with a RemoteProtocolError, in state FAILED;
* no event on either side ever carries a key other than the genuine peer's;
* the VM pins only after the owner's genuine OwnerProof reached it, and when it pins, the owner
  holds at least a pending pin (VmAuthenticated) for the genuine VM key;
* the owner's ExchangeComplete means the VM really pinned the owner.

Attacks on OwnerHello, VmHello, VmProof or OwnerProof must leave no pinned key on either side
(``assert_no_pins``). Attacks on the final VmConfirm hit the documented two-generals limit: the
VM has legitimately pinned the genuine owner, the owner fails and recovers from its pending pin.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pytest
from imprint import crypto
from imprint.protocol import exchange, messages
from imprint.protocol.driver import ExchangeDriver
from imprint.protocol.errors import AlertCode, LocalProtocolError, RemoteProtocolError
from imprint.protocol.exchange import (
    Event,
    ExchangeComplete,
    OwnerAuthenticated,
    OwnerExchange,
    State,
    VmAuthenticated,
    VmExchange,
)
from imprint.protocol.messages import (
    MAX_BODY,
    Alert,
    Message,
    MessageType,
    OwnerHello,
    OwnerProof,
    VmConfirm,
    VmHello,
    VmProof,
    WireMode,
    decode_body,
    encode_frame,
)
from imprint.tokens import Mode, Token, TokenKind

from tests.helpers import keys
from tests.helpers.exchange import split_frames

Side = Literal["owner", "vm"]
MODES: tuple[Mode, ...] = (Mode.SHARED, Mode.NOSECRET)
SIDES: tuple[Side, ...] = ("owner", "vm")

GENUINE_TYPES = (
    MessageType.OWNER_HELLO,
    MessageType.VM_HELLO,
    MessageType.VM_PROOF,
    MessageType.OWNER_PROOF,
    MessageType.VM_CONFIRM,
)
# An attack on one of these leaves no pinned key on either side.
BEFORE_OWNER_PROOF_DELIVERED = GENUINE_TYPES[:4]
SENDER: dict[MessageType, Side] = {
    MessageType.OWNER_HELLO: "owner",
    MessageType.VM_HELLO: "vm",
    MessageType.VM_PROOF: "vm",
    MessageType.OWNER_PROOF: "owner",
    MessageType.VM_CONFIRM: "vm",
}


def other(side: Side) -> Side:
    return "vm" if side == "owner" else "owner"


def type_id(t: MessageType) -> str:
    return t.name.lower()


# ---- the cast: genuine owner and VM, and an attacker with keys and a TLS certificate of its own


def fixed_key(label: str) -> crypto.PrivateKey:
    """A deterministic key, so that frame layouts (and the parametrised bit positions) are stable."""
    return keys.fixed_key(label, domain="imprint tests adversary")


@dataclass(frozen=True)
class Cast:
    owner: crypto.PrivateKey
    owner_cert: bytes
    vm: crypto.PrivateKey
    vm_cert: bytes
    attacker_owner: crypto.PrivateKey  # plays the owner toward the VM
    attacker_owner_cert: bytes
    attacker_vm: crypto.PrivateKey  # plays the VM toward the owner
    attacker_cert: bytes  # the attacker's own TLS certificate (its VM-role key)


def make_cast() -> Cast:
    owner, vm = fixed_key("owner"), fixed_key("vm")
    attacker_owner, attacker_vm = fixed_key("attacker owner"), fixed_key("attacker vm")
    return Cast(
        owner=owner,
        owner_cert=keys.cert_der(owner, "owner"),
        vm=vm,
        vm_cert=keys.cert_der(vm, "vm"),
        attacker_owner=attacker_owner,
        attacker_owner_cert=keys.cert_der(attacker_owner, "owner"),
        attacker_vm=attacker_vm,
        attacker_cert=keys.cert_der(attacker_vm, "vm"),
    )


CAST = make_cast()


@dataclass(frozen=True)
class Scenario:
    """One imprint: the tokens each side holds, in one mode."""

    mode: Mode
    cast: Cast
    owner_token: Token
    owner_vm_token: Token | None  # the VM token that came back through the site (no-secrets mode)
    vm_token: Token  # the token the VM is given (K, or the owner's no-secrets token)

    def owner_session(self, *, seen_cert: bytes | None = None) -> OwnerExchange:
        return OwnerExchange(
            owner_key=self.cast.owner,
            owner_cert=self.cast.owner_cert,
            token=self.owner_token,
            seen_server_cert=self.cast.vm_cert if seen_cert is None else seen_cert,
            vm_token=self.owner_vm_token,
        )

    def vm_session(self) -> VmExchange:
        return VmExchange(vm_key=self.cast.vm, token=self.vm_token, own_cert=self.cast.vm_cert)

    def sessions(self) -> tuple[OwnerExchange, VmExchange]:
        return self.owner_session(), self.vm_session()


def make_scenario(mode: Mode, cast: Cast = CAST) -> Scenario:
    if mode is Mode.SHARED:
        k = Token(TokenKind.SHARED, os.urandom(32))
        return Scenario(mode, cast, owner_token=k, owner_vm_token=None, vm_token=k)
    owner_token = Token(TokenKind.NOSECRET, cast.owner.public.digest)
    vm_token = Token(TokenKind.VM, cast.vm.public.digest)
    return Scenario(mode, cast, owner_token=owner_token, owner_vm_token=vm_token, vm_token=owner_token)


@pytest.fixture(params=MODES)
def scenario(request: pytest.FixtureRequest) -> Scenario:
    mode: Mode = request.param
    return make_scenario(mode)


# ---- the link driver


@dataclass(frozen=True)
class Frame:
    """One frame a session emitted, as the attacker sees it on the link."""

    src: Side
    seq: int  # index among the frames this side emitted
    data: bytes

    @property
    def dst(self) -> Side:
        return other(self.src)

    @property
    def type(self) -> MessageType:
        return MessageType(self.data[3])

    @property
    def body(self) -> bytes:
        return self.data[2:]

    @property
    def message(self) -> Message:
        return decode_body(self.body)


@dataclass(frozen=True)
class Deliver:
    """Hand ``data`` to ``to`` in one receive_data call (it may hold several frames, or junk)."""

    to: Side
    data: bytes


# What the attacker does with a frame: the deliveries to make, or None to cut the link.
Action = Sequence[Deliver] | None
Attacker = Callable[[Frame], Action]


def forward(frame: Frame) -> Action:
    return [Deliver(frame.dst, frame.data)]


def on(actions: dict[MessageType, Callable[[Frame], Action]]) -> Attacker:
    """Apply an action to the genuine frame of each given type; forward everything else."""

    def attacker(frame: Frame) -> Action:
        action = actions.get(frame.type)
        if action is not None and frame.src == SENDER[frame.type]:
            return action(frame)
        return forward(frame)

    return attacker


@dataclass
class Outcome:
    """What one side did during a run."""

    events: list[Event] = field(default_factory=list)
    error: RemoteProtocolError | None = None
    sent: list[bytes] = field(default_factory=list)  # frames it emitted
    received: list[bytes] = field(default_factory=list)  # chunks handed to receive_data
    pinned: list[tuple[crypto.PublicKey, bytes | None]] = field(default_factory=list)  # VM: (key, cert)

    @property
    def completed(self) -> bool:
        return any(isinstance(e, ExchangeComplete) for e in self.events)

    def has(self, kind: type) -> bool:
        return any(isinstance(e, kind) for e in self.events)


@dataclass
class LinkResult:
    owner: OwnerExchange
    vm: VmExchange
    out: dict[Side, Outcome]
    cut: bool  # the attacker cut the link

    def frame(self, t: MessageType) -> bytes:
        """The genuine frame of type ``t`` its sender emitted."""
        side = SENDER[t]
        found = [f for f in self.out[side].sent if f[3] == t]
        assert len(found) == 1, f"{side} emitted {len(found)} {t.name} frames"
        return found[0]

    @property
    def owner_proof_delivered(self) -> bool:
        proofs = [f for f in self.out["owner"].sent if f[3] == MessageType.OWNER_PROOF]
        return any(p in chunk for p in proofs for chunk in self.out["vm"].received)

    def session(self, side: Side) -> OwnerExchange | VmExchange:
        return self.owner if side == "owner" else self.vm


def run_link(
    owner: OwnerExchange, vm: VmExchange, attacker: Attacker = forward, *, auto_confirm: bool = True
) -> LinkResult:
    """Pump frames between the two sessions through ``attacker`` until the link is quiet or cut,
    then close it: a side still waiting gets ``receive_data(b"")``.

    Each side runs under imprint.protocol.driver's ExchangeDriver, the agent's and the owner's
    driver, one ``feed`` per delivery. A side that failed is not fed any more (its driver stops
    reading). When the VM authenticates the owner its handler pins the key and calls
    ``confirm()``, as the agent's does.
    """
    sessions: dict[Side, OwnerExchange | VmExchange] = {"owner": owner, "vm": vm}
    out: dict[Side, Outcome] = {"owner": Outcome(), "vm": Outcome()}
    queue: deque[Frame] = deque()

    def emit(side: Side, data: bytes) -> None:
        for data_frame in split_frames(data):
            out[side].sent.append(data_frame)
            queue.append(Frame(side, len(out[side].sent) - 1, data_frame))

    def on_vm_event(event: Event) -> None:
        out["vm"].events.append(event)
        if auto_confirm and isinstance(event, OwnerAuthenticated):
            out["vm"].pinned.append((event.owner_key, vm.peer_cert))
            out["vm"].events.append(vm.confirm())

    drivers: dict[Side, ExchangeDriver] = {
        "owner": ExchangeDriver(owner, out["owner"].events.append),
        "vm": ExchangeDriver(vm, on_vm_event),
    }

    def deliver(side: Side, data: bytes) -> None:
        if sessions[side].state is State.FAILED:
            return
        out[side].received.append(data)
        step = drivers[side].feed(data)
        if step.error is not None:
            assert out[side].error is None
            out[side].error = step.error
        emit(side, step.to_send)

    emit("owner", drivers["owner"].opening())
    cut = False
    while queue:
        action = attacker(queue.popleft())
        if action is None:
            cut = True
            break
        for delivery in action:
            deliver(delivery.to, delivery.data)
    for side in SIDES:
        if sessions[side].state not in (State.DONE, State.FAILED):
            deliver(side, b"")
    return LinkResult(owner, vm, out, cut)


def genuine_run(scenario: Scenario) -> LinkResult:
    result = run_link(*scenario.sessions())
    assert result.owner.state is State.DONE and result.vm.state is State.DONE
    return result


# ---- the transcript, as an attacker who sees every frame can compute it


def transcript(*bodies: bytes) -> bytes:
    th = crypto.sha256(exchange._TRANSCRIPT_LABEL)
    for body in bodies:
        th = crypto.sha256(th + len(body).to_bytes(2, "big") + body)
    return th


def forged_proof(role: str, key: crypto.PrivateKey, k: bytes | None, *bodies: bytes) -> tuple[bytes, bytes]:
    """A proof signed by ``key`` over the transcript; the MAC is right only if K (``k``) is known."""
    data = exchange._PROOF_LABEL[role] + transcript(*bodies)
    mac = crypto.mac(crypto.hkdf(k, info=exchange._MAC_INFO[role]), data) if k is not None else os.urandom(32)
    return key.sign(data), mac


# ---- assertions


def check_invariants(result: LinkResult, *, owner_peer: crypto.PublicKey, vm_peer: crypto.PublicKey,
                     owner_cert: bytes) -> None:
    owner, vm = result.out["owner"], result.out["vm"]
    for event in owner.events:
        assert isinstance(event, VmAuthenticated | ExchangeComplete), event
        key = event.vm_key if isinstance(event, VmAuthenticated) else event.peer_key
        assert key == owner_peer, "the owner accepted a key that is not the genuine VM's"
    for event in vm.events:
        assert isinstance(event, OwnerAuthenticated | ExchangeComplete), event
        key = event.owner_key if isinstance(event, OwnerAuthenticated) else event.peer_key
        assert key == vm_peer, "the VM accepted a key that is not the genuine owner's"
    for side in SIDES:
        if not result.out[side].completed:
            assert isinstance(result.out[side].error, RemoteProtocolError), f"{side} did not fail cleanly"
            assert result.session(side).state is State.FAILED
    assert vm.pinned in ([], [(vm_peer, owner_cert)])
    if vm.has(OwnerAuthenticated):
        assert result.owner_proof_delivered, "the VM authenticated an owner without its genuine OwnerProof"
    if vm.pinned:
        assert VmAuthenticated(owner_peer) in owner.events, \
            "the VM pinned the owner, but the owner holds no pending pin for the VM key"
    if owner.completed:
        assert vm.pinned, "the owner completed although the VM never pinned it"


def check_genuine(result: LinkResult, scenario: Scenario) -> None:
    cast = scenario.cast
    check_invariants(result, owner_peer=cast.vm.public, vm_peer=cast.owner.public, owner_cert=cast.owner_cert)


def assert_no_pins(result: LinkResult) -> None:
    """No pinned key on either side: no OwnerAuthenticated and no ExchangeComplete anywhere."""
    for side in SIDES:
        assert not result.out[side].has(OwnerAuthenticated), side
        assert not result.out[side].completed, side
    assert result.out["vm"].pinned == []


def assert_defeated(result: LinkResult, scenario: Scenario, target: MessageType) -> None:
    """The attack on ``target`` was detected and nothing but the genuine keys was accepted."""
    check_genuine(result, scenario)
    if target in BEFORE_OWNER_PROOF_DELIVERED:
        assert_no_pins(result)
        for side in SIDES:
            assert isinstance(result.out[side].error, RemoteProtocolError), side
            assert result.session(side).state is State.FAILED, side
    else:
        # Documented limit (two generals): VmConfirm is lost after the VM legitimately pinned the
        # genuine owner; the owner fails and recovers through its pending pin.
        assert isinstance(result.out["owner"].error, RemoteProtocolError)
        assert result.owner.state is State.FAILED
        assert not result.out["owner"].completed
        assert VmAuthenticated(scenario.cast.vm.public) in result.out["owner"].events
        assert result.out["vm"].pinned == [(scenario.cast.owner.public, scenario.cast.owner_cert)]
        assert result.vm.peer_key == scenario.cast.owner.public


def error_of(result: LinkResult, side: Side) -> RemoteProtocolError:
    error = result.out[side].error
    assert isinstance(error, RemoteProtocolError), f"{side} raised no RemoteProtocolError"
    return error


def assert_detected_by(result: LinkResult, side: Side, code: AlertCode) -> None:
    """``side`` itself detected the fault (not told by an Alert) with ``code``."""
    error = error_of(result, side)
    assert error.code is code, (error.code, error.detail)
    assert not error.from_peer


def rewrite(frame: Frame, **changes: object) -> bytes:
    """Re-encode the frame's message with some fields changed: a properly formed forgery."""
    return encode_frame(dataclasses.replace(frame.message, **changes))


# ---- positive control


def test_untouched_link_completes(scenario: Scenario) -> None:
    result = genuine_run(scenario)
    check_genuine(result, scenario)
    cast = scenario.cast
    assert result.out["owner"].events == [VmAuthenticated(cast.vm.public), ExchangeComplete(cast.vm.public)]
    assert result.out["vm"].events == [OwnerAuthenticated(cast.owner.public), ExchangeComplete(cast.owner.public)]
    assert result.owner.peer_key == cast.vm.public
    assert result.vm.peer_key == cast.owner.public
    assert result.vm.peer_cert == cast.owner_cert
    assert result.out["vm"].pinned == [(cast.owner.public, cast.owner_cert)]
    assert result.out["owner"].error is None and result.out["vm"].error is None
    assert [f[3] for f in result.out["owner"].sent] == [MessageType.OWNER_HELLO, MessageType.OWNER_PROOF]
    assert [f[3] for f in result.out["vm"].sent] == [MessageType.VM_HELLO, MessageType.VM_PROOF,
                                                     MessageType.VM_CONFIRM]
    # Closing the connection after the exchange finished is not an error.
    assert result.owner.receive_data(b"") == []
    assert result.vm.receive_data(b"") == []


@pytest.mark.parametrize("chunking", ["byte-by-byte", "whole-flights"])
def test_untouched_link_completes_with_any_chunking(scenario: Scenario, chunking: str) -> None:
    owner, vm = scenario.sessions()
    owner_events: list[Event] = []
    vm_events: list[Event] = []

    def feed(session: OwnerExchange | VmExchange, data: bytes, events: list[Event]) -> None:
        chunks = [data[i : i + 1] for i in range(len(data))] if chunking == "byte-by-byte" else [data]
        for chunk in chunks:
            events.extend(session.receive_data(chunk))

    feed(vm, owner.initiate(), vm_events)
    feed(owner, vm.data_to_send(), owner_events)
    feed(vm, owner.data_to_send(), vm_events)
    vm_events.append(vm.confirm())
    feed(owner, vm.data_to_send(), owner_events)
    assert owner_events == [VmAuthenticated(scenario.cast.vm.public), ExchangeComplete(scenario.cast.vm.public)]
    assert vm_events == [OwnerAuthenticated(scenario.cast.owner.public), ExchangeComplete(scenario.cast.owner.public)]
    assert owner.state is State.DONE and vm.state is State.DONE


# ---- tamper: flip one bit at many positions in every frame


def frame_layout(frame: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of the header and of every field (and length prefix) of a frame."""
    msg = decode_body(frame[2:])
    spans = [("length", 0, 2), ("version", 2, 3), ("type", 3, 4)]
    pos = 4
    for spec, f in zip(type(msg).SCHEMA, dataclasses.fields(msg), strict=True):
        value = getattr(msg, f.name)
        if isinstance(value, int):
            spans.append((f.name, pos, pos + 1))
            pos += 1
            continue
        if hasattr(spec, "lo"):  # variable length: a 2-byte length, then the bytes
            spans.append((f"{f.name}.length", pos, pos + 2))
            pos += 2
        if value:
            spans.append((f.name, pos, pos + len(value)))
            if f.name == "owner_cert":
                # The owner key inside the certificate, and the certificate's self-signature.
                key_at = value.index(crypto.certificate_spki(value)) + crypto.SPKI_BYTES - 32
                spans.append(("owner_cert.key", pos + key_at, pos + key_at + 32))
                spans.append(("owner_cert.signature", pos + len(value) - 64, pos + len(value)))
        pos += len(value)
    assert pos == len(frame)
    return spans


@dataclass(frozen=True)
class Flip:
    mode: Mode
    target: MessageType
    where: str
    pos: int
    mask: int
    size: int  # the frame's length, to check that the layout still applies

    def __str__(self) -> str:
        return f"{self.mode.value}-{type_id(self.target)}-{self.where}@{self.pos}^{self.mask:#04x}"


def flip_cases() -> list[Flip]:
    cases: list[Flip] = []
    for mode in MODES:
        result = genuine_run(make_scenario(mode))
        for target in GENUINE_TYPES:
            frame = result.frame(target)
            seen: set[tuple[int, int]] = set()
            for name, start, end in frame_layout(frame):
                for where, pos, mask in ((f"{name}[first]", start, 0x80), (f"{name}[first]", start, 0x01),
                                         (f"{name}[mid]", (start + end) // 2, 0x10),
                                         (f"{name}[last]", end - 1, 0x01)):
                    if (pos, mask) not in seen:
                        seen.add((pos, mask))
                        cases.append(Flip(mode, target, where, pos, mask, len(frame)))
    return cases


@pytest.mark.parametrize("case", flip_cases(), ids=str)
def test_tamper_one_bit(case: Flip) -> None:
    scenario = make_scenario(case.mode)

    def flip(frame: Frame) -> Action:
        assert len(frame.data) == case.size
        data = bytearray(frame.data)
        data[case.pos] ^= case.mask
        return [Deliver(frame.dst, bytes(data))]

    result = run_link(*scenario.sessions(), on({case.target: flip}))
    assert_defeated(result, scenario, case.target)


# ---- drop: the link closes


@pytest.mark.parametrize("target", GENUINE_TYPES, ids=type_id)
def test_drop_closes_the_link(scenario: Scenario, target: MessageType) -> None:
    result = run_link(*scenario.sessions(), on({target: lambda frame: None}))
    assert result.cut
    assert_defeated(result, scenario, target)
    for side in SIDES:
        if not result.out[side].completed:
            assert_detected_by(result, side, AlertCode.CLOSED)


def test_closed_link_raises_closed_directly() -> None:
    scenario = make_scenario(Mode.SHARED)
    owner, vm = scenario.sessions()
    vm.receive_data(owner.initiate())
    with pytest.raises(RemoteProtocolError) as info:
        owner.receive_data(b"")
    assert info.value.code is AlertCode.CLOSED
    assert owner.state is State.FAILED
    assert owner.data_to_send() == b""  # nobody left to tell


# ---- replay


REPLAYS = [
    (MessageType.OWNER_HELLO,),
    (MessageType.VM_HELLO,),
    (MessageType.VM_PROOF,),
    (MessageType.OWNER_PROOF,),
    (MessageType.VM_HELLO, MessageType.VM_PROOF),
]


@pytest.mark.parametrize("targets", REPLAYS, ids=lambda ts: "+".join(map(type_id, ts)))
def test_replay_frame_from_an_earlier_session(scenario: Scenario, targets: tuple[MessageType, ...]) -> None:
    old = genuine_run(scenario)  # same keys and token, earlier nonces

    def replay(frame: Frame) -> Action:
        return [Deliver(frame.dst, old.frame(frame.type))]

    result = run_link(*scenario.sessions(), on(dict.fromkeys(targets, replay)))
    for target in targets:
        assert old.frame(target) != result.frame(target)
    assert_defeated(result, scenario, targets[0])


def test_replay_whole_owner_side_to_a_fresh_vm(scenario: Scenario) -> None:
    old = genuine_run(scenario)
    vm = scenario.vm_session()
    assert vm.receive_data(old.frame(MessageType.OWNER_HELLO)) == []
    assert [f[3] for f in split_frames(vm.data_to_send())] == [MessageType.VM_HELLO, MessageType.VM_PROOF]
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(old.frame(MessageType.OWNER_PROOF))
    assert info.value.code is AlertCode.AUTHENTICATION_FAILED
    assert vm.state is State.FAILED


@pytest.mark.parametrize("target", GENUINE_TYPES, ids=type_id)
def test_frame_duplicated_within_the_session(scenario: Scenario, target: MessageType) -> None:
    result = run_link(*scenario.sessions(), on({target: lambda f: [Deliver(f.dst, f.data)] * 2}))
    check_genuine(result, scenario)
    assert_detected_by(result, other(SENDER[target]), AlertCode.UNEXPECTED_MESSAGE)
    if target in (MessageType.OWNER_HELLO, MessageType.VM_HELLO):
        assert_no_pins(result)


def test_vm_confirm_from_an_earlier_session_while_owner_proof_is_withheld(scenario: Scenario) -> None:
    # Regression (was a core bug): VmConfirm carries no proof, and every VmConfirm frame is the same 4 bytes. An
    # attacker on the link withholds OwnerProof and hands the owner a VmConfirm (replayed from
    # any earlier session): the owner reports ExchangeComplete ("the VM pinned this owner and
    # consumed the token") although the VM never received OwnerProof, pinned nothing, and still
    # accepts its token. No key substitution happens, but the owner's completion is forgeable.
    old = genuine_run(scenario)
    attacker = on({MessageType.OWNER_PROOF: lambda f: [Deliver("owner", old.frame(MessageType.VM_CONFIRM))]})
    result = run_link(*scenario.sessions(), attacker)
    assert result.out["vm"].pinned == []
    assert not result.out["owner"].completed, "owner completed on a forged VmConfirm; the VM pinned nothing"


# ---- reorder


def reorder_attacker(case: str, old: LinkResult) -> Attacker:
    """Deliver genuine frames (or ones from an earlier session) in an order the protocol forbids."""
    confirm, old_owner_proof = old.frame(MessageType.VM_CONFIRM), old.frame(MessageType.OWNER_PROOF)
    if case == "vm_proof_before_vm_hello":
        held: list[bytes] = []

        def hold(frame: Frame) -> Action:
            held.append(frame.data)
            return []

        def release(frame: Frame) -> Action:
            return [Deliver("owner", frame.data), *(Deliver("owner", h) for h in held)]

        return on({MessageType.VM_HELLO: hold, MessageType.VM_PROOF: release})
    if case == "vm_confirm_before_vm_hello":
        return on({MessageType.VM_HELLO: lambda f: [Deliver("owner", confirm), Deliver("owner", f.data)]})
    if case == "vm_confirm_before_vm_proof":
        return on({MessageType.VM_PROOF: lambda f: [Deliver("owner", confirm), Deliver("owner", f.data)]})
    assert case == "owner_proof_before_owner_hello"
    return on({MessageType.OWNER_HELLO: lambda f: [Deliver("vm", old_owner_proof), Deliver("vm", f.data)]})


REORDERS: dict[str, Side] = {  # case -> the side that must notice
    "vm_proof_before_vm_hello": "owner",
    "vm_confirm_before_vm_hello": "owner",
    "vm_confirm_before_vm_proof": "owner",
    "owner_proof_before_owner_hello": "vm",
}


@pytest.mark.parametrize("case", list(REORDERS))
def test_reorder(scenario: Scenario, case: str) -> None:
    result = run_link(*scenario.sessions(), reorder_attacker(case, genuine_run(scenario)))
    assert_defeated(result, scenario, MessageType.OWNER_HELLO)
    assert_detected_by(result, REORDERS[case], AlertCode.UNEXPECTED_MESSAGE)


# ---- reflection


def reflect(frame: Frame) -> Action:
    return [Deliver(frame.src, frame.data)]


def vm_proof_as_owner_proof(frame: Frame) -> Action:
    msg = frame.message
    assert isinstance(msg, VmProof)
    return [Deliver("owner", frame.data), Deliver("vm", encode_frame(OwnerProof(msg.signature, msg.mac)))]


def owner_hello_as_vm_hello(frame: Frame) -> Action:
    msg = frame.message
    assert isinstance(msg, OwnerHello)
    spki = crypto.certificate_spki(msg.owner_cert)
    return [Deliver("owner", encode_frame(VmHello(msg.mode, msg.owner_nonce, spki)))]


REFLECTIONS: dict[str, tuple[MessageType, Callable[[Frame], Action], Side, AlertCode]] = {
    "owner_hello": (MessageType.OWNER_HELLO, reflect, "owner", AlertCode.UNEXPECTED_MESSAGE),
    "vm_hello": (MessageType.VM_HELLO, reflect, "vm", AlertCode.UNEXPECTED_MESSAGE),
    "vm_proof": (MessageType.VM_PROOF, reflect, "vm", AlertCode.UNEXPECTED_MESSAGE),
    "owner_proof": (MessageType.OWNER_PROOF, reflect, "owner", AlertCode.UNEXPECTED_MESSAGE),
    "vm_confirm": (MessageType.VM_CONFIRM, reflect, "vm", AlertCode.UNEXPECTED_MESSAGE),
    "vm_proof_retyped_as_owner_proof": (MessageType.VM_PROOF, vm_proof_as_owner_proof, "vm",
                                        AlertCode.AUTHENTICATION_FAILED),
    "owner_hello_retyped_as_vm_hello": (MessageType.OWNER_HELLO, owner_hello_as_vm_hello, "owner",
                                        AlertCode.KEY_MISMATCH),
}


@pytest.mark.parametrize("case", list(REFLECTIONS))
def test_reflect(scenario: Scenario, case: str) -> None:
    target, action, detector, code = REFLECTIONS[case]
    result = run_link(*scenario.sessions(), on({target: action}))
    assert_defeated(result, scenario, target)
    assert_detected_by(result, detector, code)


# ---- key substitution


def swap_owner_cert(frame: Frame) -> Action:
    return [Deliver("vm", rewrite(frame, owner_cert=CAST.attacker_owner_cert))]


def swap_vm_key(frame: Frame) -> Action:
    return [Deliver("owner", rewrite(frame, vm_spki=CAST.attacker_vm.public.spki))]


def swap_owner_cert_not_self_signed(frame: Frame) -> Action:
    # The attacker's certificate with the owner's SubjectPublicKeyInfo pasted in: same length,
    # but its signature is the attacker's, not the owner key's.
    forged = CAST.attacker_owner_cert.replace(CAST.attacker_owner.public.spki, CAST.owner.public.spki)
    assert forged != CAST.attacker_owner_cert
    return [Deliver("vm", rewrite(frame, owner_cert=forged))]


SWAPS: dict[str, tuple[MessageType, Callable[[Frame], Action], dict[Mode, tuple[Side, AlertCode]]]] = {
    "owner_hello_attacker_cert": (MessageType.OWNER_HELLO, swap_owner_cert, {
        # shared: the VM cannot tell yet, but the owner's transcript differs from the VM's
        Mode.SHARED: ("owner", AlertCode.AUTHENTICATION_FAILED),
        Mode.NOSECRET: ("vm", AlertCode.KEY_MISMATCH),
    }),
    "owner_hello_owner_key_not_self_signed": (MessageType.OWNER_HELLO, swap_owner_cert_not_self_signed, {
        Mode.SHARED: ("vm", AlertCode.MALFORMED),
        Mode.NOSECRET: ("vm", AlertCode.MALFORMED),
    }),
    "vm_hello_attacker_key": (MessageType.VM_HELLO, swap_vm_key, {
        Mode.SHARED: ("owner", AlertCode.KEY_MISMATCH),
        Mode.NOSECRET: ("owner", AlertCode.KEY_MISMATCH),
    }),
}


@pytest.mark.parametrize("case", list(SWAPS))
def test_swap_keys(scenario: Scenario, case: str) -> None:
    target, action, detectors = SWAPS[case]
    result = run_link(*scenario.sessions(), on({target: action}))
    assert_defeated(result, scenario, target)
    assert_detected_by(result, *detectors[scenario.mode])


@pytest.mark.parametrize("victim", SIDES)
@pytest.mark.parametrize(("mode", "leaked_k"), [(Mode.SHARED, False), (Mode.SHARED, True), (Mode.NOSECRET, False)],
                         ids=["shared-no-k", "shared-leaked-k", "nosecret"])
def test_attacker_impersonating_one_side_with_a_correct_transcript(victim: Side, mode: Mode,
                                                                     leaked_k: bool) -> None:
    """The attacker talks to one genuine side with its own key, signing the right transcript.

    Without K (shared) or the site's cooperation (no secrets) it fails; with a leaked K it
    succeeds in shared mode, which is the documented limit and proves the forgery is otherwise
    well formed.
    """
    scenario = make_scenario(mode)
    cast = scenario.cast
    k = scenario.owner_token.payload if leaked_k else None
    wire_mode = messages.WIRE_MODE[scenario.mode]
    if victim == "vm":
        vm = scenario.vm_session()
        hello = encode_frame(OwnerHello(wire_mode, scenario.vm_token.token_id, os.urandom(32),
                                        cast.attacker_owner_cert, crypto.sha256(cast.vm_cert)))
        if scenario.mode is Mode.NOSECRET:
            with pytest.raises(RemoteProtocolError) as info:
                vm.receive_data(hello)
            assert info.value.code is AlertCode.KEY_MISMATCH
            assert vm.state is State.FAILED
            return
        assert vm.receive_data(hello) == []
        vm_hello, vm_proof = split_frames(vm.data_to_send())
        proof = encode_frame(OwnerProof(*forged_proof("owner", cast.attacker_owner, k,
                                                      hello[2:], vm_hello[2:], vm_proof[2:])))
        if leaked_k:
            assert vm.receive_data(proof) == [OwnerAuthenticated(cast.attacker_owner.public)]
            return
        with pytest.raises(RemoteProtocolError) as info:
            vm.receive_data(proof)
        assert info.value.code is AlertCode.AUTHENTICATION_FAILED
        assert vm.state is State.FAILED
        return
    # The owner's TLS connection ends at the attacker, which shows its own certificate.
    owner = scenario.owner_session(seen_cert=cast.attacker_cert)
    owner_hello = owner.initiate()
    vm_hello = encode_frame(VmHello(wire_mode, os.urandom(32), cast.attacker_vm.public.spki))
    vm_proof = encode_frame(VmProof(*forged_proof("vm", cast.attacker_vm, k, owner_hello[2:], vm_hello[2:])))
    if leaked_k:
        assert owner.receive_data(vm_hello + vm_proof) == [VmAuthenticated(cast.attacker_vm.public)]
        return
    with pytest.raises(RemoteProtocolError) as info:
        owner.receive_data(vm_hello + vm_proof)
    code = AlertCode.AUTHENTICATION_FAILED if scenario.mode is Mode.SHARED else AlertCode.KEY_MISMATCH
    assert info.value.code is code
    assert owner.state is State.FAILED


# ---- downgrade


@pytest.mark.parametrize("target", [MessageType.OWNER_HELLO, MessageType.VM_HELLO], ids=type_id)
@pytest.mark.parametrize("new_mode", ["other", 0, 3, 255])
def test_mode_rewritten_in_flight(scenario: Scenario, target: MessageType, new_mode: str | int) -> None:
    mode = {Mode.SHARED: WireMode.NOSECRET, Mode.NOSECRET: WireMode.SHARED}[scenario.mode] if new_mode == "other" \
        else new_mode
    result = run_link(*scenario.sessions(), on({target: lambda f: [Deliver(f.dst, rewrite(f, mode=mode))]}))
    assert_defeated(result, scenario, target)
    assert_detected_by(result, other(SENDER[target]), AlertCode.MODE_MISMATCH)


@pytest.mark.parametrize("target", [MessageType.VM_PROOF, MessageType.OWNER_PROOF], ids=type_id)
@pytest.mark.parametrize(("mode", "mac_len"), [(Mode.SHARED, 0), (Mode.SHARED, 16), (Mode.SHARED, 64),
                                               (Mode.NOSECRET, 16), (Mode.NOSECRET, 32), (Mode.NOSECRET, 64)])
def test_proof_mac_stripped_or_added(mode: Mode, target: MessageType, mac_len: int) -> None:
    """Stripping the MAC downgrades a shared proof to a no-secrets one; adding one does the reverse."""
    scenario = make_scenario(mode)
    forged_mac = os.urandom(mac_len)
    result = run_link(*scenario.sessions(), on({target: lambda f: [Deliver(f.dst, rewrite(f, mac=forged_mac))]}))
    assert_defeated(result, scenario, target)
    assert_detected_by(result, other(SENDER[target]), AlertCode.MALFORMED)


# ---- wrong tokens


def other_owner_token(scenario: Scenario) -> Scenario:
    stranger = fixed_key("some other owner")
    return dataclasses.replace(scenario, vm_token=Token(TokenKind.NOSECRET, stranger.public.digest))


WRONG_TOKENS: dict[str, tuple[Mode, Callable[[Scenario], Scenario], Attacker, Side, AlertCode]] = {
    "vm_holds_another_k": (Mode.SHARED, lambda s: dataclasses.replace(
        s, vm_token=Token(TokenKind.SHARED, os.urandom(32))), forward, "vm", AlertCode.WRONG_TOKEN),
    "vm_holds_a_nosecret_token": (Mode.SHARED, other_owner_token, forward, "vm", AlertCode.MODE_MISMATCH),
    "vm_holds_another_owner_token": (Mode.NOSECRET, other_owner_token, forward, "vm", AlertCode.WRONG_TOKEN),
    "vm_holds_a_token_with_the_same_id": (Mode.NOSECRET, lambda s: dataclasses.replace(
        s, vm_token=Token(TokenKind.NOSECRET, s.owner_token.payload[:8] + os.urandom(24))),
        forward, "vm", AlertCode.KEY_MISMATCH),
    "vm_holds_a_shared_token": (Mode.NOSECRET, lambda s: dataclasses.replace(
        s, vm_token=Token(TokenKind.SHARED, os.urandom(32))), forward, "vm", AlertCode.MODE_MISMATCH),
    "owner_holds_another_vm_token": (Mode.NOSECRET, lambda s: dataclasses.replace(
        s, owner_vm_token=Token(TokenKind.VM, fixed_key("some other vm").public.digest)),
        forward, "owner", AlertCode.KEY_MISMATCH),
}


@pytest.mark.parametrize("case", list(WRONG_TOKENS))
def test_wrong_token(case: str) -> None:
    mode, alter, attacker, detector, code = WRONG_TOKENS[case]
    scenario = alter(make_scenario(mode))
    result = run_link(*scenario.sessions(), attacker)
    assert_defeated(result, scenario, MessageType.OWNER_HELLO)
    assert_detected_by(result, detector, code)


def test_wrong_k_with_token_id_rewritten_to_match() -> None:
    """The token id is public: rewriting it gets past the VM's first check, not past the MACs."""
    scenario = dataclasses.replace(make_scenario(Mode.SHARED), vm_token=Token(TokenKind.SHARED, os.urandom(32)))
    vm_id = scenario.vm_token.token_id
    result = run_link(*scenario.sessions(),
                      on({MessageType.OWNER_HELLO: lambda f: [Deliver("vm", rewrite(f, token_id=vm_id))]}))
    assert_defeated(result, scenario, MessageType.OWNER_HELLO)
    assert_detected_by(result, "owner", AlertCode.AUTHENTICATION_FAILED)


# ---- a relaying man in the middle with its own TLS certificate


def mitm_relay(scenario: Scenario, variant: str) -> Attacker:
    """The owner's TLS ends at the attacker (it saw the attacker's certificate); the attacker
    opens its own TLS connection to the VM and relays the exchange, optionally rewriting it."""
    cast = scenario.cast
    owner_hello_body: list[bytes] = []
    rewritten_vm_hello: list[bytes] = []

    def on_owner_hello(frame: Frame) -> Action:
        owner_hello_body.append(frame.body)
        if variant == "relay":
            return forward(frame)
        return [Deliver("vm", rewrite(frame, seen_server_cert_sha256=crypto.sha256(cast.vm_cert)))]

    def on_vm_hello(frame: Frame) -> Action:
        if variant != "rewrite_binding_and_key":
            return forward(frame)
        rewritten_vm_hello.append(rewrite(frame, vm_spki=cast.attacker_vm.public.spki))
        return [Deliver("owner", rewritten_vm_hello[0])]

    def on_vm_proof(frame: Frame) -> Action:
        if variant != "rewrite_binding_and_key":
            return forward(frame)
        msg = frame.message
        assert isinstance(msg, VmProof)
        signature, _ = forged_proof("vm", cast.attacker_vm, None, owner_hello_body[0], rewritten_vm_hello[0][2:])
        return [Deliver("owner", encode_frame(VmProof(signature, msg.mac)))]

    return on({MessageType.OWNER_HELLO: on_owner_hello, MessageType.VM_HELLO: on_vm_hello,
               MessageType.VM_PROOF: on_vm_proof})


MITM_DETECTION: dict[str, dict[Mode, tuple[Side, AlertCode]]] = {
    "relay": {Mode.SHARED: ("vm", AlertCode.CHANNEL_BINDING_MISMATCH),
              Mode.NOSECRET: ("vm", AlertCode.CHANNEL_BINDING_MISMATCH)},
    "rewrite_binding": {Mode.SHARED: ("owner", AlertCode.KEY_MISMATCH),
                        Mode.NOSECRET: ("owner", AlertCode.KEY_MISMATCH)},
    "rewrite_binding_and_key": {Mode.SHARED: ("owner", AlertCode.AUTHENTICATION_FAILED),
                                Mode.NOSECRET: ("owner", AlertCode.KEY_MISMATCH)},
}


@pytest.mark.parametrize("variant", list(MITM_DETECTION))
def test_relaying_mitm_with_its_own_tls_certificate(scenario: Scenario, variant: str) -> None:
    owner = scenario.owner_session(seen_cert=scenario.cast.attacker_cert)
    result = run_link(owner, scenario.vm_session(), mitm_relay(scenario, variant))
    assert_defeated(result, scenario, MessageType.OWNER_HELLO)
    assert_detected_by(result, *MITM_DETECTION[variant][scenario.mode])


# ---- a full man in the middle running its own sessions toward both sides


@dataclass
class Mitm:
    to_owner: LinkResult  # genuine owner <-> attacker's VmExchange
    to_vm: LinkResult  # attacker's OwnerExchange <-> genuine VM


def run_full_mitm(scenario: Scenario, *, attacker_owner_token: Token, attacker_vm_token: Token | None,
                  attacker_holds: Token) -> Mitm:
    cast = scenario.cast
    owner = scenario.owner_session(seen_cert=cast.attacker_cert)
    fake_vm = VmExchange(vm_key=cast.attacker_vm, token=attacker_holds, own_cert=cast.attacker_cert)
    fake_owner = OwnerExchange(owner_key=cast.attacker_owner, owner_cert=cast.attacker_owner_cert,
                               token=attacker_owner_token, seen_server_cert=cast.vm_cert,
                               vm_token=attacker_vm_token)
    return Mitm(run_link(owner, fake_vm), run_link(fake_owner, scenario.vm_session()))


def test_leaked_k_allows_a_full_mitm_in_shared_mode() -> None:
    """Documented limit: whoever holds K can stand between owner and VM with keys of its own."""
    scenario = make_scenario(Mode.SHARED)
    k = scenario.owner_token
    cast = scenario.cast
    mitm = run_full_mitm(scenario, attacker_owner_token=k, attacker_vm_token=None, attacker_holds=k)
    assert mitm.to_owner.owner.state is State.DONE
    assert mitm.to_owner.owner.peer_key == cast.attacker_vm.public
    assert mitm.to_vm.vm.state is State.DONE
    assert mitm.to_vm.vm.peer_key == cast.attacker_owner.public
    assert mitm.to_vm.out["vm"].pinned == [(cast.attacker_owner.public, cast.attacker_owner_cert)]


def test_full_mitm_without_k_fails_in_shared_mode() -> None:
    scenario = make_scenario(Mode.SHARED)
    guess = Token(TokenKind.SHARED, os.urandom(32))
    mitm = run_full_mitm(scenario, attacker_owner_token=guess, attacker_vm_token=None, attacker_holds=guess)
    assert_detected_by(mitm.to_vm, "vm", AlertCode.WRONG_TOKEN)
    assert error_of(mitm.to_owner, "owner").code in (AlertCode.WRONG_TOKEN, AlertCode.AUTHENTICATION_FAILED)
    for link in (mitm.to_owner, mitm.to_vm):
        assert_no_pins(link)


@pytest.mark.parametrize("site_swaps", ["none", "vm_side_only", "owner_side_only"])
def test_full_mitm_fails_in_nosecret_mode_unless_the_site_swaps_both_tokens(site_swaps: str) -> None:
    """In no-secrets mode the tokens themselves pin the keys: the attacker can only win if the
    site delivers the attacker's owner token to the VM and the attacker's VM token to the owner."""
    scenario = make_scenario(Mode.NOSECRET)
    cast = scenario.cast
    attacker_owner_token = Token(TokenKind.NOSECRET, cast.attacker_owner.public.digest)
    if site_swaps in ("vm_side_only",):
        scenario = dataclasses.replace(scenario, vm_token=attacker_owner_token)
    if site_swaps in ("owner_side_only",):
        scenario = dataclasses.replace(scenario, owner_vm_token=Token(TokenKind.VM, cast.attacker_vm.public.digest))
    mitm = run_full_mitm(scenario, attacker_owner_token=attacker_owner_token,
                         attacker_vm_token=Token(TokenKind.VM, cast.vm.public.digest),
                         attacker_holds=scenario.owner_token)
    owner_link, vm_link = mitm.to_owner, mitm.to_vm
    if site_swaps != "owner_side_only":
        # The owner, holding the genuine VM token, never accepts the attacker.
        assert_detected_by(owner_link, "owner", AlertCode.KEY_MISMATCH)
        assert_no_pins(owner_link)
    if site_swaps != "vm_side_only":
        # The VM, holding the genuine owner token, never pins the attacker.
        assert_detected_by(vm_link, "vm", AlertCode.WRONG_TOKEN)
        assert_no_pins(vm_link)
        assert vm_link.vm.state is State.FAILED


def test_full_mitm_succeeds_in_nosecret_mode_when_the_site_swaps_both_tokens() -> None:
    """Documented limit: a site that substitutes both tokens is itself the man in the middle."""
    scenario = make_scenario(Mode.NOSECRET)
    cast = scenario.cast
    attacker_owner_token = Token(TokenKind.NOSECRET, cast.attacker_owner.public.digest)
    scenario = dataclasses.replace(scenario, vm_token=attacker_owner_token,
                                owner_vm_token=Token(TokenKind.VM, cast.attacker_vm.public.digest))
    mitm = run_full_mitm(scenario, attacker_owner_token=attacker_owner_token,
                         attacker_vm_token=Token(TokenKind.VM, cast.vm.public.digest),
                         attacker_holds=scenario.owner_token)
    assert mitm.to_owner.owner.state is State.DONE
    assert mitm.to_owner.owner.peer_key == cast.attacker_vm.public
    assert mitm.to_vm.vm.state is State.DONE
    assert mitm.to_vm.vm.peer_key == cast.attacker_owner.public


# ---- versions, sizes, alerts


@pytest.mark.parametrize("target", GENUINE_TYPES, ids=type_id)
@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_protocol_version(scenario: Scenario, target: MessageType, version: int) -> None:
    def bump(frame: Frame) -> Action:
        return [Deliver(frame.dst, frame.data[:2] + bytes([version]) + frame.data[3:])]

    result = run_link(*scenario.sessions(), on({target: bump}))
    assert_defeated(result, scenario, target)
    assert_detected_by(result, other(SENDER[target]), AlertCode.VERSION_UNSUPPORTED)


def oversized(frame: Frame, kind: str) -> bytes:
    if kind == "body_over_max":
        body = bytes([1, frame.type]) + bytes(MAX_BODY - 1)
        return len(body).to_bytes(2, "big") + body
    if kind == "announces_65535":
        return b"\xff\xff" + frame.body
    if kind == "empty_body":
        return b"\x00\x00"
    if kind == "one_byte_body":
        return b"\x00\x01\x01"
    assert kind == "trailing_byte"
    return (len(frame.body) + 1).to_bytes(2, "big") + frame.body + b"\x00"


@pytest.mark.parametrize("target", GENUINE_TYPES, ids=type_id)
@pytest.mark.parametrize("kind", ["body_over_max", "announces_65535", "empty_body", "one_byte_body",
                                  "trailing_byte"])
def test_oversized_or_malformed_frame(scenario: Scenario, target: MessageType, kind: str) -> None:
    result = run_link(*scenario.sessions(), on({target: lambda f: [Deliver(f.dst, oversized(f, kind))]}))
    assert_defeated(result, scenario, target)
    assert_detected_by(result, other(SENDER[target]), AlertCode.MALFORMED)


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    vm = make_scenario(Mode.SHARED).vm_session()
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data((MAX_BODY + 1).to_bytes(2, "big"))
    assert info.value.code is AlertCode.MALFORMED
    assert vm.state is State.FAILED


@pytest.mark.parametrize("target", GENUINE_TYPES[:4], ids=type_id)
def test_injected_alert(scenario: Scenario, target: MessageType) -> None:
    alert = encode_frame(Alert(int(AlertCode.INTERNAL), b"attacker"))
    result = run_link(*scenario.sessions(), on({target: lambda f: [Deliver(f.dst, alert)]}))
    assert_defeated(result, scenario, target)
    error = error_of(result, other(SENDER[target]))
    assert error.from_peer and error.code is AlertCode.INTERNAL


def test_alert_with_unknown_code_is_reported_as_internal() -> None:
    vm = make_scenario(Mode.SHARED).vm_session()
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(encode_frame(Alert(200, b"\xff\xfe not utf-8")))
    assert info.value.code is AlertCode.INTERNAL and info.value.from_peer
    assert vm.data_to_send() == b""  # an Alert is never answered with an Alert


def test_abort_tells_the_peer(scenario: Scenario) -> None:
    owner, vm = scenario.sessions()
    vm.receive_data(owner.initiate())
    owner.receive_data(vm.data_to_send())
    vm.abort(AlertCode.TOKEN_CONSUMED, "bound meanwhile")
    assert vm.state is State.FAILED
    with pytest.raises(RemoteProtocolError) as info:
        owner.receive_data(vm.data_to_send())
    assert info.value.code is AlertCode.TOKEN_CONSUMED and info.value.from_peer
    assert owner.state is State.FAILED


# ---- core weaknesses found while writing this harness


def test_error_later_in_the_same_read_keeps_the_owner_pending_pin(scenario: Scenario) -> None:
    # Regression (was a core bug): when receive_data() raises, the events of frames already handled in the same
    # call are discarded, but the bytes they produced stay in the send buffer. Here VmProof and a
    # duplicate of it arrive in one read: the owner verifies the VM and queues OwnerProof, then
    # fails on the duplicate, so VmAuthenticated (the pending pin) is lost, while OwnerProof goes
    # out ahead of the Alert once the driver flushes data_to_send() "to tell the peer why"
    # (owner/bind.py does exactly that). The VM pins the genuine owner and consumes the token;
    # the owner has no record of the VM key to recover with.
    result = run_link(*scenario.sessions(), on({MessageType.VM_PROOF: lambda f: [Deliver("owner", f.data * 2)]}))
    check_genuine(result, scenario)


def owner_cert_mutations() -> list[tuple[str, bytes]]:
    cert = CAST.owner_cert
    version_at = cert.index(bytes.fromhex("a003020102")) + 4
    oid_at = cert.index(b"\x30\x2a\x30\x05\x06\x03\x2b\x65\x70") + 6
    cases = []
    for name, pos, mask in (("x509_version", version_at, 0x01), ("spki_oid", oid_at, 0x02),
                            ("spki_oid_last", oid_at + 2, 0x01)):
        mutated = bytearray(cert)
        mutated[pos] ^= mask
        cases.append((name, bytes(mutated)))
    return cases


@pytest.mark.parametrize("owner_cert", [c for _, c in owner_cert_mutations()],
                         ids=[n for n, _ in owner_cert_mutations()])
def test_malformed_owner_certificate_is_a_remote_protocol_error(scenario: Scenario, owner_cert: bytes) -> None:
    # Regression (was a core bug): crypto.self_signed_certificate_spki() only turns the *loading* error into a
    # CryptoError; cert.public_key() raises ValueError ("Could not deserialize key data") for an
    # unknown key algorithm, and an invalid X.509 version raises cryptography's InvalidVersion
    # (not a ValueError at all). Either escapes VmExchange.receive_data() as a non-protocol
    # exception: no Alert is queued and the session is left in AWAIT_OWNER_HELLO, not FAILED.
    # One flipped bit in OwnerHello from any peer is enough.
    owner, vm = scenario.sessions()
    hello = owner.initiate()
    msg = decode_body(hello[2:])
    bad = encode_frame(dataclasses.replace(msg, owner_cert=owner_cert))
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(bad)
    assert info.value.code is AlertCode.MALFORMED
    assert vm.state is State.FAILED


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_every_bit_of_the_owner_certificate_flipped_gives_only_remote_protocol_errors() -> None:
    # Regression (was a core bug): see test_malformed_owner_certificate_is_a_remote_protocol_error.
    scenario = make_scenario(Mode.SHARED)
    hello = decode_body(scenario.owner_session().initiate()[2:])
    assert isinstance(hello, OwnerHello)
    escaped: list[tuple[int, int, str]] = []
    for pos in range(len(hello.owner_cert)):
        for bit in range(8):
            mutated = bytearray(hello.owner_cert)
            mutated[pos] ^= 1 << bit
            vm = scenario.vm_session()
            try:
                vm.receive_data(encode_frame(dataclasses.replace(hello, owner_cert=bytes(mutated))))
            except RemoteProtocolError:
                assert vm.state is State.FAILED
            except Exception as exc:  # collecting what escapes is the point
                escaped.append((pos, bit, type(exc).__name__))
    assert escaped == []


# ---- misuse of the API is a LocalProtocolError


def test_initiate_twice() -> None:
    owner = make_scenario(Mode.SHARED).owner_session()
    owner.initiate()
    with pytest.raises(LocalProtocolError):
        owner.initiate()


def test_confirm_before_owner_authenticated(scenario: Scenario) -> None:
    owner, vm = scenario.sessions()
    with pytest.raises(LocalProtocolError):
        vm.confirm()
    vm.receive_data(owner.initiate())
    assert vm.state is State.AWAIT_OWNER_PROOF
    with pytest.raises(LocalProtocolError):
        vm.confirm()


def test_confirm_twice(scenario: Scenario) -> None:
    result = genuine_run(scenario)
    with pytest.raises(LocalProtocolError):
        result.vm.confirm()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("then", [b"", b"\x00\x02\x01\x05"], ids=["close", "data"])
def test_receive_data_after_failed(scenario: Scenario, side: Side, then: bytes) -> None:
    owner, vm = scenario.sessions()
    owner.initiate()
    session = owner if side == "owner" else vm
    with pytest.raises(RemoteProtocolError):
        session.receive_data(b"\x00\x02\x09\x09")
    assert session.state is State.FAILED
    with pytest.raises(LocalProtocolError) as info:
        session.receive_data(then)
    assert not isinstance(info.value, RemoteProtocolError)
    assert info.value.code is AlertCode.INTERNAL


def test_constructors_refuse_inconsistent_arguments() -> None:
    cast = CAST
    nosecret = make_scenario(Mode.NOSECRET)
    vm_token = nosecret.owner_vm_token
    assert vm_token is not None
    with pytest.raises(LocalProtocolError):  # the VM gets its own token instead of the owner's
        VmExchange(vm_key=cast.vm, token=vm_token, own_cert=cast.vm_cert)
    with pytest.raises(LocalProtocolError):  # the TLS certificate carries another key
        VmExchange(vm_key=cast.vm, token=nosecret.owner_token, own_cert=cast.attacker_cert)
    with pytest.raises(LocalProtocolError):  # the owner is given a VM token
        OwnerExchange(owner_key=cast.owner, owner_cert=cast.owner_cert, token=vm_token,
                      seen_server_cert=cast.vm_cert)
    with pytest.raises(LocalProtocolError):  # no-secrets token of another key
        OwnerExchange(owner_key=cast.attacker_owner, owner_cert=cast.attacker_owner_cert,
                      token=nosecret.owner_token, seen_server_cert=cast.vm_cert, vm_token=vm_token)
    with pytest.raises(LocalProtocolError):  # no-secrets mode without the VM token
        OwnerExchange(owner_key=cast.owner, owner_cert=cast.owner_cert, token=nosecret.owner_token,
                      seen_server_cert=cast.vm_cert)
    with pytest.raises(LocalProtocolError):  # the owner certificate carries another key
        OwnerExchange(owner_key=cast.owner, owner_cert=cast.attacker_owner_cert,
                      token=make_scenario(Mode.SHARED).owner_token, seen_server_cert=cast.vm_cert)


def test_data_arriving_before_initiate_is_refused() -> None:
    owner = make_scenario(Mode.SHARED).owner_session()
    with pytest.raises(RemoteProtocolError) as info:
        owner.receive_data(encode_frame(VmConfirm(signature=bytes(64), mac=b"")))
    assert info.value.code is AlertCode.UNEXPECTED_MESSAGE
