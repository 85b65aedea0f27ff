"""A deterministic genuine exchange for the exchange fuzz targets.

Keys come from fixed seeds (tests/helpers/keys.py) and both sides draw their nonces from a
fixed generator here, so the genuine exchange is the same bytes on every run: a genuine
OwnerProof or VmConfirm in a seed file still verifies when the target replays it, and the
fuzzer can mutate its way from there.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

from imprint.protocol.errors import AlertCode, RemoteProtocolError
from imprint.protocol.exchange import OwnerExchange, State, VmExchange
from imprint.protocol.messages import Alert
from imprint.tokens import Mode

from tests.helpers import exchange
from tests.helpers.exchange import decoded, split_frames
from tests.helpers.keys import OWNER_KEY, VM_KEY

__all__ = ["OWNER_KEY", "VM_KEY", "decoded", "split_frames"]

MODES = (Mode.SHARED, Mode.NOSECRET)  # the selector's order: the corpus depends on it
OWNER_STATES = (State.START, State.AWAIT_VM_HELLO, State.AWAIT_VM_PROOF, State.AWAIT_VM_CONFIRM, State.DONE)
VM_STATES = (State.AWAIT_OWNER_HELLO, State.AWAIT_OWNER_PROOF, State.AWAIT_LOCAL_CONFIRM, State.DONE)


def _rng(label: str) -> Callable[[int], bytes]:
    def draw(n: int) -> bytes:
        return hashlib.sha256(b"imprint fuzz nonce\0" + label.encode()).digest()[:n]

    return draw


def owner_session(mode: Mode) -> OwnerExchange:
    return exchange.owner_session(mode, rng=_rng("owner"))


def vm_session(mode: Mode) -> VmExchange:
    return exchange.vm_session(mode, rng=_rng("vm"))


@functools.cache
def genuine(mode: Mode) -> dict[str, bytes]:
    """The genuine exchange's frames, by message name."""
    owner, vm = exchange.drivers(owner_session(mode), vm_session(mode))
    frames = {"OwnerHello": owner.opening()}
    frames["VmHello"], frames["VmProof"] = split_frames(vm.feed(frames["OwnerHello"]).to_send)
    frames["OwnerProof"] = owner.feed(frames["VmHello"] + frames["VmProof"]).to_send
    frames["VmConfirm"] = vm.feed(frames["OwnerProof"]).to_send
    owner.feed(frames["VmConfirm"])
    assert owner.session.state is State.DONE and vm.session.state is State.DONE
    return frames


_OWNER_PATH = ("VmHello", "VmProof", "VmConfirm")  # what the owner receives, in order
_VM_PATH = ("OwnerHello", "OwnerProof")


def owner_at(mode: Mode, state: State) -> OwnerExchange:
    """A fresh owner session driven by the genuine frames to ``state``, nothing left to send."""
    owner = owner_session(mode)
    if state is State.START:
        return owner
    owner.initiate()
    for name in _OWNER_PATH:
        if owner.state is state:
            break
        owner.receive_data(genuine(mode)[name])
    assert owner.state is state, (owner.state, state)
    owner.data_to_send()
    return owner


def vm_at(mode: Mode, state: State) -> VmExchange:
    """A fresh VM session driven by the genuine frames to ``state``, nothing left to send."""
    vm = vm_session(mode)
    for name in _VM_PATH:
        if vm.state is state:
            break
        vm.receive_data(genuine(mode)[name])
    if state is State.DONE:
        vm.confirm()
    assert vm.state is state, (vm.state, state)
    vm.data_to_send()
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


def parse_selector(data: bytes, states: tuple[State, ...]) -> tuple[Mode, State, int, bool, bytes]:
    """The first two bytes choose the mode, the state, the chunk size and whether the peer
    closes at the end; the rest is what the peer sends."""
    selector, size = data[0], data[1] + 1
    mode = MODES[selector & 1]
    state = states[(selector >> 1) % len(states)]
    close = bool(selector & 0x80)
    return mode, state, size, close, data[2:]


def selector_for(mode: Mode, state: State, states: tuple[State, ...], *, size: int = 256,
                 close: bool = False) -> bytes:
    """The two selector bytes for a seed (the inverse of parse_selector)."""
    return bytes([MODES.index(mode) | (states.index(state) << 1) | (0x80 if close else 0), size - 1])
