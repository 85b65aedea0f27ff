"""The one exchange driver: the I/O around a sans-IO session (exchange.py), for every caller.

The agent (guest/server.py), the owner (owner/bind.py) and the tests' in-memory links all run
a session the same way: feed it what the peer sent, hand each event to the caller's handler
(which may pin a key and call ``confirm()`` or ``abort()``), and send what the session queued,
the Alert of a refusal included. ``feed`` is that step without a socket, for a link the caller
pumps itself; ``run`` is the loop over a socket under an absolute deadline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from imprint.protocol.errors import RemoteProtocolError
from imprint.protocol.exchange import Event, OwnerExchange, State, VmExchange

Session = OwnerExchange | VmExchange
Handler = Callable[[Event], None]
READ_SIZE = 4096
_TERMINAL = (State.DONE, State.FAILED)


class Peer(Protocol):
    """What ``run`` needs of a connection: a blocking socket (ssl.SSLSocket in production)."""

    def recv(self, size: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> None: ...

    def settimeout(self, value: float | None, /) -> None: ...


@dataclass(frozen=True)
class Step:
    """What one ``feed`` did: the events (each already handled), the bytes to send, and the
    refusal, if the peer's bytes were refused (then ``to_send`` is at most this side's Alert)."""

    events: list[Event]
    to_send: bytes
    error: RemoteProtocolError | None = None


def _ignore(event: Event) -> None:
    del event


class ExchangeDriver:
    def __init__(self, session: Session, handle: Handler = _ignore) -> None:
        self.session = session
        self._handle = handle

    @property
    def finished(self) -> bool:
        return self.session.state in _TERMINAL

    def opening(self) -> bytes:
        """What to send before reading anything: the side that speaks first (the owner dial-in,
        the VM dial-out) sends its first message; the other nothing. Raises RemoteProtocolError
        when the VM refuses the listener's certificate before sending anything."""
        if self.session.state is State.START:
            return self.session.initiate()
        return b""

    def feed(self, data: bytes) -> Step:
        """Feed the peer's bytes (``b""``: it closed). A handler's own exception propagates:
        it is this side's failure, not the peer's."""
        try:
            events = self.session.receive_data(data)
        except RemoteProtocolError as exc:
            return Step([], self.session.data_to_send(), exc)
        for event in events:
            self._handle(event)
        return Step(events, self.session.data_to_send())

    def run(self, peer: Peer, deadline: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Run the exchange over ``peer`` until it is DONE, or FAILED by the handler's ``abort()``.

        Raises RemoteProtocolError once its Alert is sent, TimeoutError when ``deadline`` (on
        ``clock``) passes, OSError (ssl.SSLError included) when the connection fails. A failed
        send is not raised while the exchange goes on: the next read says what the link has
        become, and reads the peer's Alert if it sent one before it closed."""
        self._send(peer, self.opening())  # a refusal here is raised: nothing was sent
        while not self.finished:
            remaining = deadline - clock()
            if remaining <= 0:
                raise TimeoutError
            peer.settimeout(remaining)
            step = self.feed(peer.recv(READ_SIZE))
            if step.error is not None:
                with contextlib.suppress(OSError):
                    peer.sendall(step.to_send)  # tell the peer why
                raise step.error
            self._send(peer, step.to_send)

    def _send(self, peer: Peer, data: bytes) -> None:
        if not data:
            return
        if self.session.state is State.DONE:
            peer.sendall(data)  # the last flight (VmConfirm): no later read would report its loss
            return
        with contextlib.suppress(OSError):
            peer.sendall(data)
