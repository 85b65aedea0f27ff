"""Fixed identities and a deterministic genuine exchange for the exchange fuzz targets.

Keys come from fixed seeds and both sides draw their nonces from a fixed generator, so the
genuine exchange is the same bytes on every run: a genuine OwnerProof or VmConfirm in a seed
file still verifies when the target replays it, and the fuzzer can mutate its way from there.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ed25519
from imprint import crypto
from imprint.protocol.errors import AlertCode, RemoteProtocolError
from imprint.protocol.exchange import OwnerExchange, State, VmExchange
from imprint.protocol.messages import Alert, FrameBuffer, Message, decode_body
from imprint.tokens import Token, TokenKind

MODES = ("shared", "nosecret")
OWNER_STATES = (State.START, State.AWAIT_VM_HELLO, State.AWAIT_VM_PROOF, State.AWAIT_VM_CONFIRM, State.DONE)
VM_STATES = (State.AWAIT_OWNER_HELLO, State.AWAIT_OWNER_PROOF, State.AWAIT_LOCAL_CONFIRM, State.DONE)


def _key(label: str) -> crypto.PrivateKey:
    seed = hashlib.sha256(b"imprint fuzz\0" + label.encode()).digest()
    return crypto.PrivateKey(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def _rng(label: str) -> Callable[[int], bytes]:
    def draw(n: int) -> bytes:
        return hashlib.sha256(b"imprint fuzz nonce\0" + label.encode()).digest()[:n]

    return draw


OWNER_KEY, VM_KEY = _key("owner"), _key("vm")
OWNER_CERT = crypto.certificate_der(OWNER_KEY.self_signed_certificate("owner"))
VM_CERT = crypto.certificate_der(VM_KEY.self_signed_certificate("vm"))
K = Token(TokenKind.SHARED, hashlib.sha256(b"imprint fuzz K").digest())
NOSECRET = Token(TokenKind.NOSECRET, OWNER_KEY.public.digest)
VM_TOKEN = Token(TokenKind.VM, VM_KEY.public.digest)


def owner_session(mode: str) -> OwnerExchange:
    token, vm_token = (K, None) if mode == "shared" else (NOSECRET, VM_TOKEN)
    return OwnerExchange(owner_key=OWNER_KEY, owner_cert=OWNER_CERT, token=token, seen_server_cert=VM_CERT,
                         vm_token=vm_token, rng=_rng("owner"))


def vm_session(mode: str) -> VmExchange:
    return VmExchange(vm_key=VM_KEY, token=K if mode == "shared" else NOSECRET, own_cert=VM_CERT, rng=_rng("vm"))


def split_frames(data: bytes) -> list[bytes]:
    """Whole frames (length prefix included); asserts ``data`` is exactly a sequence of them."""
    frames, pos = [], 0
    while pos < len(data):
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        assert end <= len(data), "a side sent a partial frame"
        frames.append(data[pos:end])
        pos = end
    return frames


@functools.cache
def genuine(mode: str) -> dict[str, bytes]:
    """The genuine exchange's frames, by message name."""
    owner, vm = owner_session(mode), vm_session(mode)
    frames = {"OwnerHello": owner.initiate()}
    vm.receive_data(frames["OwnerHello"])
    frames["VmHello"], frames["VmProof"] = split_frames(vm.data_to_send())
    owner.receive_data(frames["VmHello"] + frames["VmProof"])
    frames["OwnerProof"] = owner.data_to_send()
    vm.receive_data(frames["OwnerProof"])
    vm.confirm()
    frames["VmConfirm"] = vm.data_to_send()
    owner.receive_data(frames["VmConfirm"])
    assert owner.state is State.DONE and vm.state is State.DONE
    return frames


_OWNER_PATH = ("VmHello", "VmProof", "VmConfirm")  # what the owner receives, in order
_VM_PATH = ("OwnerHello", "OwnerProof")


def owner_at(mode: str, state: State) -> OwnerExchange:
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


def vm_at(mode: str, state: State) -> VmExchange:
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


def decoded(data: bytes) -> list[Message]:
    buffer, out = FrameBuffer(), []
    buffer.feed(data)
    while (body := buffer.next_body()) is not None:
        out.append(decode_body(body))
    assert buffer.pending == 0
    return out


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


def parse_selector(data: bytes, states: tuple[State, ...]) -> tuple[str, State, int, bool, bytes]:
    """The first two bytes choose the mode, the state, the chunk size and whether the peer
    closes at the end; the rest is what the peer sends."""
    selector, size = data[0], data[1] + 1
    mode = MODES[selector & 1]
    state = states[(selector >> 1) % len(states)]
    close = bool(selector & 0x80)
    return mode, state, size, close, data[2:]


def selector_for(mode: str, state: State, states: tuple[State, ...], *, size: int = 256,
                 close: bool = False) -> bytes:
    """The two selector bytes for a seed (the inverse of parse_selector)."""
    return bytes([MODES.index(mode) | (states.index(state) << 1) | (0x80 if close else 0), size - 1])
