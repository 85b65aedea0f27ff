"""The agent dials its owner: the bind and the control channel with no inbound port on the VM.

The owner addresses come from the boot channel with the token (imprint.owneraddr) and are kept
in the bind record, so a bound agent dials again after a restart without any token. Each round
tries every address in order until one connects; a round that ends (nothing answered, or the
connection of a bound owner closed) waits a random time before the next: full jitter over a
window that doubles after each failed round up to a cap, starting again from the first window
once an authenticated connection was up. So an owner restart brings its VMs back spread over
the first window, not in the same second, and a long outage costs each VM one attempt per cap.
A bound agent never gives up on its owner.

Every connection is the agent's own (docs/protocol.md §4.6):
* not bound: TLS that authenticates nothing, then the exchange with the roles reversed
  (VmExchange.dialling): in no-secrets mode the listener's key must hash to the owner token
  before anything is sent; once the owner is pinned, the same connection goes on as the
  control channel, as a dial-in bind's does;
* bound: mutual TLS presenting the VM certificate and trusting only the pinned owner's, the key
  checked once more after the handshake, then the control channel for as long as the owner
  keeps it (the agent serves requests on it; the owner's listener sends them).
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from imprint import timeouts, tls
from imprint.guest import log as agent_log
from imprint.guest.notify import notify_status
from imprint.owneraddr import OwnerAddress
from imprint.tokens import Mode

if TYPE_CHECKING:
    from imprint.guest.server import AgentServer

log = agent_log.get("imprint.agent")

CONNECT_TIMEOUT = timeouts.seconds("IMPRINT_AGENT_CONNECT_SECONDS", 10.0)  # TCP connect and TLS handshake
# The first retry window, and the cap the window doubles up to.
RECONNECT_FIRST = timeouts.seconds("IMPRINT_AGENT_RECONNECT_SECONDS", 10.0)
RECONNECT_CAP = timeouts.seconds("IMPRINT_AGENT_RECONNECT_CAP_SECONDS", 300.0)
# The whole bind connection. A shared-mode listener answers at once (it has the token or it has
# not), so a listener that stalls is cut soon and the next address tried. A no-secrets VM waits
# at the listener until the owner is given its VM token: only a listener whose key hashes to
# the owner token gets that long (the VM checked before it sent anything), and it ends the wait
# first (an Alert NOT_EXPECTED), then the VM dials again.
EXCHANGE_DEADLINE = 30.0
WAIT_DEADLINE = 30 * 60.0
# A silent owner connection is probed by TCP keepalive: a dead owner host is noticed in about
# KEEPIDLE + KEEPINTVL * KEEPCNT seconds even with nothing to send.
KEEPIDLE, KEEPINTVL, KEEPCNT = 60, 10, 6


class Backoff:
    """Full jitter: the n-th wait is uniform in [0, min(cap, first * 2**(n-1))]."""

    def __init__(self, first: float, cap: float, rng: Callable[[float, float], float]) -> None:
        self._first, self._cap, self._rng = first, cap, rng
        self._round = 0

    def reset(self) -> None:
        self._round = 0

    def next(self) -> float:
        self._round += 1
        window = min(self._cap, self._first * 2 ** min(self._round - 1, 32))
        return self._rng(0.0, window)


class _PersistentDeadline:
    """The control channel's deadlines on a connection the VM dialled: a request or reply is
    bounded like on the agent's own port, but waiting for the owner's next request is not (the
    connection exists to wait; keepalive notices a dead owner)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def limit(self, seconds: float | None, why: str, *, idle: bool = False) -> None:
        del why
        self._sock.settimeout(None if idle else seconds)


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


_JITTER = random.SystemRandom().uniform  # not seeded by anything a cloned image shares


class OwnerDialer:
    def __init__(self, server: AgentServer, addresses: Sequence[OwnerAddress], *,
                 rng: Callable[[float, float], float] = _JITTER) -> None:
        if not addresses:
            raise ValueError("the dialler needs at least one owner address")
        self._server = server
        self._addresses = tuple(addresses)
        self._backoff = Backoff(RECONNECT_FIRST, RECONNECT_CAP, rng)
        self._current: socket.socket | None = None
        self._lock = threading.Lock()
        self.connected = threading.Event()  # an authenticated connection to the owner is up

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True, name="imprint-dialler")
        thread.start()
        return thread

    def stop(self) -> None:
        with self._lock:
            sock = self._current
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        stopping = self._server.stopping
        while not stopping.is_set():
            for address in self._addresses:
                if stopping.is_set():
                    return
                if self._once(address):
                    self._backoff.reset()
                    break  # it was up and ended: wait, then start the list again
            delay = self._backoff.next()
            phase = "bound" if self._server.bound else "not bound"
            notify_status(f"{phase}; no connection to the owner at {self._where()}: next attempt in {delay:.0f} s")
            log.info("dialling the owner again in %.1f s", delay)
            stopping.wait(delay)

    def _where(self) -> str:
        return ", ".join(str(a) for a in self._addresses)

    # -- one connection
    def _once(self, address: OwnerAddress) -> bool:
        """One connection to ``address``; True when it was authenticated (then it has ended)."""
        try:
            raw = socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            log.info("owner %s: cannot connect: %s", address, exc.strerror or exc)
            return False
        with self._lock:
            self._current = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(raw)
            if self._server.bound:
                return self._control(raw, address)
            return self._bind(raw, address)
        except (ssl.SSLError, OSError) as exc:
            log.info("owner %s: connection failed: %s", address, exc)
            return False
        except Exception:
            # Not the peer's bytes (the exchange raises only protocol errors for those) but this
            # side failing (its state, a bug): logged, and the next round tries again, since the
            # dialler must never stop while the agent runs.
            log.exception("owner %s: the connection ended by an internal error", address)
            return False
        finally:
            self.connected.clear()
            with self._lock:
                self._current = None
            with contextlib.suppress(OSError):
                raw.close()

    def _control(self, raw: socket.socket, address: OwnerAddress) -> bool:
        pin = self._server.owner_pin
        assert pin is not None  # bound
        state = self._server.state
        ctx = tls.agent_dial_pinned_context(str(state.cert_file), str(state.key_file), pin)
        sock = ctx.wrap_socket(raw, do_handshake_on_connect=False)
        sock.settimeout(CONNECT_TIMEOUT)
        sock.do_handshake()
        try:
            pin.verify(sock)
        except tls.PinMismatch as exc:
            log.warning("owner %s refused: %s", address, exc)
            return False
        self._serve(sock, address)
        return True

    def _bind(self, raw: socket.socket, address: OwnerAddress) -> bool:
        from imprint.protocol import AlertCode, Event, OwnerAuthenticated, RemoteProtocolError, VmExchange
        from imprint.protocol.driver import ExchangeDriver

        token = self._server.token
        if token is None:
            return False  # bound meanwhile through the agent's own port: the next round pins
        sock = tls.agent_dial_bind_context().wrap_socket(raw, do_handshake_on_connect=False)
        sock.settimeout(CONNECT_TIMEOUT)
        sock.do_handshake()
        vm_key, vm_cert = self._server.identity()
        session = VmExchange.dialling(vm_key=vm_key, token=token, own_cert=vm_cert,
                                      server_cert=tls.peer_certificate(sock), owner_address=str(address))
        peer = f"owner {address}"
        bound_here = False

        def handle(event: Event) -> None:
            nonlocal bound_here
            if isinstance(event, OwnerAuthenticated):
                bound_here = self._server.settle_bind(session, token, event.owner_key, peer)

        notify_status(f"not bound; dialled the owner at {address}, exchanging keys")
        budget = WAIT_DEADLINE if token.mode is Mode.NOSECRET else EXCHANGE_DEADLINE
        try:
            ExchangeDriver(session, handle).run(sock, time.monotonic() + budget)
        except RemoteProtocolError as exc:
            if exc.code is AlertCode.NOT_EXPECTED and exc.from_peer:
                log.info("%s does not expect this VM yet: %s", peer, exc.detail)
            else:
                who = "said" if exc.from_peer else "refused"
                log.warning("bind with %s %s: %s (%s)", peer, who, exc.detail, exc.code.name)
            return False
        except TimeoutError:
            log.info("bind with %s timed out after %.0f s", peer, budget)
            return False
        if not bound_here:
            return False
        self._serve(sock, address)  # the bind's connection goes on as the control channel
        return True

    def _serve(self, sock: ssl.SSLSocket, address: OwnerAddress) -> None:
        from imprint.guest.control import serve_control

        self.connected.set()
        log.info("connected to the owner at %s; serving the pinned channel on it", address)
        notify_status(f"bound; connected to the owner at {address}")
        serve_control(sock, f"owner {address}", self._server, _PersistentDeadline(sock))
        log.info("the connection to the owner at %s ended", address)
