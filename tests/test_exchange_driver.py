"""The one exchange driver (imprint.protocol.driver) over real sockets, without TLS: a whole
exchange, a refusal that reaches the peer as an Alert, a handler's abort, the deadline (on an
injected clock: nothing is waited out), and a handler's own failure, which is not the peer's."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from imprint.protocol.driver import ExchangeDriver
from imprint.protocol.errors import AlertCode, RemoteProtocolError
from imprint.protocol.exchange import Event, ExchangeComplete, OwnerAuthenticated, State, VmAuthenticated
from imprint.protocol.messages import Alert
from imprint.tokens import Mode

from tests.helpers.exchange import confirming, decoded, owner_session, vm_session

IO_TIMEOUT = 20.0


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(IO_TIMEOUT)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize("mode", list(Mode))
def test_both_sides_run_the_whole_exchange_over_a_socket(mode: Mode) -> None:
    owner, vm = owner_session(mode), vm_session(mode)
    owner_events: list[Event] = []
    vm_events: list[Event] = []
    errors: list[BaseException] = []
    a, b = socket.socketpair()

    def serve() -> None:
        try:
            ExchangeDriver(vm, confirming(vm, vm_events.append)).run(b, time.monotonic() + IO_TIMEOUT)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with a, b:
        ExchangeDriver(owner, owner_events.append).run(a, time.monotonic() + IO_TIMEOUT)
        thread.join(IO_TIMEOUT)
    assert not errors and not thread.is_alive()
    assert owner.state is State.DONE and vm.state is State.DONE
    assert [type(e) for e in owner_events] == [VmAuthenticated, ExchangeComplete]
    assert [type(e) for e in vm_events] == [OwnerAuthenticated]


def test_a_refusal_is_raised_after_its_alert_is_sent() -> None:
    vm = vm_session(Mode.SHARED)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\x00\x02\x07\x01")  # a two-byte body of protocol version 7
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(RemoteProtocolError) as info:
            ExchangeDriver(vm).run(b, time.monotonic() + IO_TIMEOUT)
        b.shutdown(socket.SHUT_WR)
        sent = decoded(read_all(a))
    assert info.value.code is AlertCode.VERSION_UNSUPPORTED and not info.value.from_peer
    assert sent == [Alert(int(AlertCode.VERSION_UNSUPPORTED), b"the protocol version is not supported")]
    assert vm.state is State.FAILED


def test_a_handlers_abort_ends_the_run_with_its_alert() -> None:
    owner, vm = owner_session(Mode.SHARED), vm_session(Mode.SHARED)

    def refuse(event: Event) -> None:
        if isinstance(event, OwnerAuthenticated):
            vm.abort(AlertCode.TOKEN_CONSUMED, "bound meanwhile")

    owner_driver = ExchangeDriver(owner)
    a, b = socket.socketpair()
    with a, b:
        thread = threading.Thread(target=ExchangeDriver(vm, refuse).run, args=(b, time.monotonic() + IO_TIMEOUT))
        thread.start()
        a.settimeout(IO_TIMEOUT)
        a.sendall(owner_driver.opening())
        while owner.state is not State.AWAIT_VM_CONFIRM:
            step = owner_driver.feed(a.recv(4096))
        a.sendall(step.to_send)  # the OwnerProof
        thread.join(IO_TIMEOUT)
        b.shutdown(socket.SHUT_WR)
        assert decoded(read_all(a)) == [Alert(int(AlertCode.TOKEN_CONSUMED), b"bound meanwhile")]
    assert not thread.is_alive() and vm.state is State.FAILED


def test_the_deadline_is_checked_before_each_read() -> None:
    vm = vm_session(Mode.SHARED)
    a, b = socket.socketpair()
    with a, b, pytest.raises(TimeoutError):
        ExchangeDriver(vm).run(b, 100.0, clock=lambda: 100.0)  # the peer never sent: no read is made
    assert vm.state is State.AWAIT_OWNER_HELLO


class HandlerFailed(Exception):
    pass


def test_a_handlers_own_exception_is_not_turned_into_the_peers_fault() -> None:
    owner, vm = owner_session(Mode.SHARED), vm_session(Mode.SHARED)

    def fail(event: Event) -> None:
        raise HandlerFailed

    owner_driver, vm_driver = ExchangeDriver(owner), ExchangeDriver(vm, fail)
    vm_flight = vm_driver.feed(owner_driver.opening()).to_send  # no event yet
    owner_proof = owner_driver.feed(vm_flight).to_send
    with pytest.raises(HandlerFailed):
        vm_driver.feed(owner_proof)  # OwnerAuthenticated reaches the handler
