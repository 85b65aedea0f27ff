"""The key exchange in memory, on the fixed identities of keys.py: sessions of either side in
either mode, and the pair run through imprint.protocol.driver (the agent's and owner's driver).

The VM's driver here pins nothing: on OwnerAuthenticated it confirms at once, as the agent does
once its pin is stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from imprint.protocol.driver import ExchangeDriver, Handler
from imprint.protocol.exchange import Event, OwnerAuthenticated, OwnerExchange, VmDialled, VmExchange
from imprint.protocol.messages import FrameBuffer, Message, decode_body
from imprint.tokens import Mode

from tests.helpers.keys import NOSECRET, OWNER_CERT, OWNER_KEY, VM_CERT, VM_KEY, VM_TOKEN, K

Random = Callable[[int], bytes]


def owner_session(mode: Mode, *, rng: Random = os.urandom) -> OwnerExchange:
    token, vm_token = (K, None) if mode is Mode.SHARED else (NOSECRET, VM_TOKEN)
    return OwnerExchange(owner_key=OWNER_KEY, owner_cert=OWNER_CERT, token=token, seen_server_cert=VM_CERT,
                         vm_token=vm_token, rng=rng)


def vm_session(mode: Mode, *, rng: Random = os.urandom) -> VmExchange:
    return VmExchange(vm_key=VM_KEY, token=K if mode is Mode.SHARED else NOSECRET, own_cert=VM_CERT, rng=rng)


OWNER_ADDRESS = "owner.example:7444"  # what the dialling VM was told on its boot channel


def owner_listening_session(*, rng: Random = os.urandom) -> OwnerExchange:
    """The owner's side of a connection the VM dialled (the owner is the TLS server)."""
    return OwnerExchange.listening(owner_key=OWNER_KEY, owner_cert=OWNER_CERT, rng=rng)


def vm_dialling_session(mode: Mode, *, server_cert: bytes = OWNER_CERT, address: str = OWNER_ADDRESS,
                        rng: Random = os.urandom) -> VmExchange:
    """The VM's side of a connection it dialled; ``server_cert`` is what the TLS handshake showed."""
    return VmExchange.dialling(vm_key=VM_KEY, token=K if mode is Mode.SHARED else NOSECRET, own_cert=VM_CERT,
                               server_cert=server_cert, owner_address=address, rng=rng)


def accepting(owner: OwnerExchange, mode: Mode, also: Handler | None = None) -> Handler:
    """The listener's handler: on VmDialled it accepts with the fixed tokens of ``mode``."""

    def handle(event: Event) -> None:
        if also is not None:
            also(event)
        if isinstance(event, VmDialled):
            owner.accept(*((K, None) if mode is Mode.SHARED else (NOSECRET, VM_TOKEN)))

    return handle


def dial_out_drivers(owner: OwnerExchange, vm: VmExchange, mode: Mode) -> tuple[ExchangeDriver, ExchangeDriver]:
    """The listener's driver (which accepts) and the dialling VM's (which confirms)."""
    return ExchangeDriver(owner, accepting(owner, mode)), ExchangeDriver(vm, confirming(vm))


def confirming(vm: VmExchange, also: Handler | None = None) -> Handler:
    """The VM's handler: ``also`` sees each event first, then OwnerAuthenticated is confirmed."""

    def handle(event: Event) -> None:
        if also is not None:
            also(event)
        if isinstance(event, OwnerAuthenticated):
            vm.confirm()

    return handle


def drivers(owner: OwnerExchange, vm: VmExchange) -> tuple[ExchangeDriver, ExchangeDriver]:
    """The owner's driver and the VM's (which confirms), as the agent and the owner run them."""
    return ExchangeDriver(owner), ExchangeDriver(vm, confirming(vm))


def split_frames(data: bytes) -> list[bytes]:
    """Whole frames (length prefix included); asserts ``data`` is exactly a sequence of them."""
    frames, pos = [], 0
    while pos < len(data):
        assert pos + 2 <= len(data), "a side sent a partial frame header"
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        assert end <= len(data), "a side sent a partial frame"
        frames.append(data[pos:end])
        pos = end
    return frames


def decoded(data: bytes) -> list[Message]:
    """The messages in ``data``, which must be whole frames."""
    buffer, out = FrameBuffer(), []
    buffer.feed(data)
    while (body := buffer.next_body()) is not None:
        out.append(decode_body(body))
    assert buffer.pending == 0
    return out
