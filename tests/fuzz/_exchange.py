"""A deterministic genuine exchange for the exchange fuzz targets, in both directions.

Keys come from fixed seeds (tests/helpers/keys.py) and both sides draw their nonces from a
fixed generator here, so the genuine exchange is the same bytes on every run: a genuine
OwnerProof or VmConfirm in a seed file still verifies when the target replays it, and the
fuzzer can mutate its way from there.

A target's input starts with two selector bytes (``parse_selector``): the mode, the point
(direction, state) the session is driven to before the fuzzer's bytes arrive, the chunk size,
and whether the peer closes at the end. Dial-in the owner is the TLS client and speaks first;
dial-out (``OwnerExchange.listening``, ``VmExchange.dialling``) the VM dials the owner's
listener and opens with VmDial, and the listener answers a VmDialled with ``listener_accept``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

from imprint import crypto
from imprint.protocol.errors import AlertCode, RemoteProtocolError
from imprint.protocol.exchange import OwnerExchange, State, VmDialled, VmExchange
from imprint.protocol.messages import Alert
from imprint.tokens import Mode

from tests.helpers import exchange
from tests.helpers.exchange import decoded, split_frames
from tests.helpers.keys import NOSECRET, OWNER_KEY, VM_KEY, VM_TOKEN, K

__all__ = ["OWNER_KEY", "VM_KEY", "decoded", "split_frames"]


class Direction(Enum):
    DIAL_IN = "dial-in"  # the owner dials the VM's agent: the VM is the TLS server
    DIAL_OUT = "dial-out"  # the VM dials the owner's listener: the owner is the TLS server


class Point(NamedTuple):
    """Where a target's session is when the fuzzer's bytes arrive."""

    direction: Direction
    state: State

    @property
    def label(self) -> str:
        """How a seed's name says it: ``dial-in-await-vm-hello``."""
        return f"{self.direction.value}-{self.state.value}"


IN, OUT = Direction.DIAL_IN, Direction.DIAL_OUT

# The selector's orders: the corpus depends on them (append, never reorder). Every state each
# side can be in, in each direction, before FAILED.
MODES = (Mode.SHARED, Mode.NOSECRET)
OWNER_STATES = (
    Point(IN, State.START), Point(IN, State.AWAIT_VM_HELLO), Point(IN, State.AWAIT_VM_PROOF),
    Point(IN, State.AWAIT_VM_CONFIRM), Point(IN, State.DONE),
    Point(OUT, State.AWAIT_VM_DIAL), Point(OUT, State.AWAIT_LOCAL_ACCEPT), Point(OUT, State.AWAIT_VM_HELLO),
    Point(OUT, State.AWAIT_VM_PROOF), Point(OUT, State.AWAIT_VM_CONFIRM), Point(OUT, State.DONE),
)
VM_STATES = (
    Point(IN, State.AWAIT_OWNER_HELLO), Point(IN, State.AWAIT_OWNER_PROOF), Point(IN, State.AWAIT_LOCAL_CONFIRM),
    Point(IN, State.DONE),
    Point(OUT, State.START), Point(OUT, State.AWAIT_OWNER_HELLO), Point(OUT, State.AWAIT_OWNER_PROOF),
    Point(OUT, State.AWAIT_LOCAL_CONFIRM), Point(OUT, State.DONE),
)
_STATE_BITS = 0x3F  # bits 1..6 of the selector byte; bit 0 is the mode, bit 7 the close
assert len(OWNER_STATES) <= _STATE_BITS + 1 and len(VM_STATES) <= _STATE_BITS + 1


def _rng(label: str) -> Callable[[int], bytes]:
    def draw(n: int) -> bytes:
        return hashlib.sha256(b"imprint fuzz nonce\0" + label.encode()).digest()[:n]

    return draw


def owner_session(mode: Mode) -> OwnerExchange:
    return exchange.owner_session(mode, rng=_rng("owner"))


def vm_session(mode: Mode) -> VmExchange:
    return exchange.vm_session(mode, rng=_rng("vm"))


def owner_listening_session() -> OwnerExchange:
    return exchange.owner_listening_session(rng=_rng("owner"))


def vm_dialling_session(mode: Mode) -> VmExchange:
    return exchange.vm_dialling_session(mode, rng=_rng("vm"))


def listener_accept(owner: OwnerExchange, dial: VmDialled) -> bool:
    """What the listener (owner/serve.py) does on VmDialled, with the fixed binds of both modes
    in place of its store: accept with the fixed tokens of the bind VmDial names, as
    tests/helpers/exchange.accepting does, or ``abort(NOT_EXPECTED)`` when it names none (another
    token id, or in no-secrets mode another VM key). Returns whether it accepted. A
    LocalProtocolError out of ``accept()`` here is a crash: VmDialled named exactly these tokens."""
    if dial.mode is Mode.SHARED and crypto.digests_equal(dial.token_id, K.token_id):
        owner.accept(K)
        return True
    if (dial.mode is Mode.NOSECRET and crypto.digests_equal(dial.token_id, NOSECRET.token_id)
            and crypto.digests_equal(dial.vm_key_sha256, VM_TOKEN.payload)):
        owner.accept(NOSECRET, VM_TOKEN)
        return True
    owner.abort(AlertCode.NOT_EXPECTED, "this owner expects no VM with this token and key now")
    return False


@functools.cache
def genuine(mode: Mode, direction: Direction = IN) -> dict[str, bytes]:
    """The genuine exchange's frames, by message name (dial-out: VmDial first)."""
    frames: dict[str, bytes] = {}
    if direction is IN:
        owner, vm = exchange.drivers(owner_session(mode), vm_session(mode))
        frames["OwnerHello"] = owner.opening()
    else:
        owner, vm = exchange.dial_out_drivers(owner_listening_session(), vm_dialling_session(mode), mode)
        assert owner.opening() == b""
        frames["VmDial"] = vm.opening()
        frames["OwnerHello"] = owner.feed(frames["VmDial"]).to_send
    frames["VmHello"], frames["VmProof"] = split_frames(vm.feed(frames["OwnerHello"]).to_send)
    frames["OwnerProof"] = owner.feed(frames["VmHello"] + frames["VmProof"]).to_send
    frames["VmConfirm"] = vm.feed(frames["OwnerProof"]).to_send
    owner.feed(frames["VmConfirm"])
    assert owner.session.state is State.DONE and vm.session.state is State.DONE
    assert all(len(split_frames(frame)) == 1 for frame in frames.values())
    return frames


def _drive(session: OwnerExchange | VmExchange, state: State, steps: list[Callable[[], object]]) -> None:
    for step in steps:
        if session.state is state:
            break
        step()
    assert session.state is state, (session.state, state)
    session.data_to_send()


def owner_at(mode: Mode, point: Point) -> OwnerExchange:
    """A fresh owner session driven by the genuine frames to ``point``, nothing left to send."""
    g = genuine(mode, point.direction)
    if point.direction is IN:
        owner = owner_session(mode)
        steps: list[Callable[[], object]] = [owner.initiate]
    else:
        owner = owner_listening_session()
        steps = [functools.partial(owner.receive_data, g["VmDial"]), functools.partial(_accept_genuine, owner)]
    steps += [functools.partial(owner.receive_data, g[name]) for name in ("VmHello", "VmProof", "VmConfirm")]
    _drive(owner, point.state, steps)
    return owner


def _accept_genuine(owner: OwnerExchange) -> None:
    assert owner.dial is not None and listener_accept(owner, owner.dial), "the genuine VmDial was not accepted"


def vm_at(mode: Mode, point: Point) -> VmExchange:
    """A fresh VM session driven by the genuine frames to ``point``, nothing left to send."""
    g = genuine(mode, point.direction)
    vm = vm_session(mode) if point.direction is IN else vm_dialling_session(mode)
    steps: list[Callable[[], object]] = [] if point.direction is IN else [vm.initiate]
    steps += [functools.partial(vm.receive_data, g[name]) for name in ("OwnerHello", "OwnerProof")]
    steps.append(vm.confirm)
    _drive(vm, point.state, steps)
    return vm


def check_refusal(session: OwnerExchange | VmExchange, exc: RemoteProtocolError) -> None:
    """What a refusing side must look like: FAILED, and at most one Alert of its own to send."""
    assert session.state is State.FAILED, session.state
    out = decoded(session.data_to_send())
    if exc.from_peer or exc.code is AlertCode.CLOSED:
        assert out == [], out  # the peer said why, or is gone: nothing to add
    else:
        assert len(out) == 1 and isinstance(out[0], Alert) and out[0].code == int(exc.code), out


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Selected(NamedTuple):
    mode: Mode
    point: Point
    size: int
    close: bool
    stream: bytes


def parse_selector(data: bytes, points: tuple[Point, ...]) -> Selected:
    """The first two bytes choose the mode (bit 0 of the first), the point (bits 1..6, modulo
    the number of points), whether the peer closes at the end (bit 7) and the chunk size (the
    second byte + 1); the rest is what the peer sends."""
    selector, size = data[0], data[1] + 1
    mode = MODES[selector & 1]
    point = points[((selector >> 1) & _STATE_BITS) % len(points)]
    close = bool(selector & 0x80)
    return Selected(mode, point, size, close, data[2:])


def selector_for(mode: Mode, point: Point, points: tuple[Point, ...], *, size: int = 256,
                 close: bool = False) -> bytes:
    """The two selector bytes for a seed (the inverse of parse_selector)."""
    assert 1 <= size <= 256
    return bytes([MODES.index(mode) | (points.index(point) << 1) | (0x80 if close else 0), size - 1])
