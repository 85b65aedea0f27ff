"""The agent's listener: the key exchange before binding, the pinned control channel after.

One port serves both. Until bound, TLS authenticates only the VM and each connection runs the
exchange; the first owner to complete it is pinned, the token is consumed, and from then on the
listener requires a client certificate (CERT_REQUIRED) that is exactly the pinned owner's.

Each connection has its own thread. Its deadlines are absolute and enforced by a reaper from
outside that thread, unauthenticated connections live in a bounded pool where a newcomer evicts
the oldest, and the pinned owner's connections have a pool of their own
(imprint.guest.connections says why): a flood of slow or hostile clients delays the owner by
one handshake, not by the length of the flood.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from imprint import timeouts, tls
from imprint.guest import log as agent_log
from imprint.guest.connections import Connection, ConnectionTable
from imprint.guest.distro import Distro
from imprint.guest.state import AgentState, BindRecord
from imprint.tokens import Token

if TYPE_CHECKING:
    from imprint import crypto
    from imprint.protocol import VmExchange

log = agent_log.get("imprint.agent")

# All counted from the accept: a trickling peer cannot extend them.
HANDSHAKE_DEADLINE = timeouts.seconds("IMPRINT_AGENT_HANDSHAKE_SECONDS", 10.0)
EXCHANGE_DEADLINE = 20.0  # the whole bind connection, handshake included
LINGER = 2.0  # after a refused handshake, for the peer to read our alert (within the deadline)
MAX_PREAUTH = 64  # connections that have not proved the pinned owner key (all of them before binding)
MAX_OWNER = 8  # connections of the pinned owner; unauthenticated ones never count here
# Socket timeouts a little past the deadlines: the reaper enforces those; these only bound a
# blocked call should the reaper ever fall behind.
_BACKSTOP = 1.0
# accept() errors that concern one connection or a passing shortage, not the listener.
_ACCEPT_RETRY = {errno.ECONNABORTED, errno.EPROTO, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                 errno.EPERM}


class AgentServer:
    def __init__(
        self,
        state: AgentState,
        listener: socket.socket | None,
        *,
        token: Token | None,
        record: BindRecord,
        paths: Distro,
        on_bound: Callable[[], None] = lambda: None,
        owner_addresses: Sequence[str] = (),
    ) -> None:
        self._state = state
        self._paths = paths
        self._apply_lock = threading.Lock()
        self._listener = listener
        self._token = token
        self._record = record
        self._on_bound = on_bound
        self._owner_addresses = list(owner_addresses)  # recorded with the pin: where to dial after a restart
        self._bind_lock = threading.Lock()
        self._session_lock = threading.Lock()
        self._restart_due = False
        self._table = ConnectionTable(preauth_max=MAX_PREAUTH, owner_max=MAX_OWNER)
        self._vm_key: crypto.PrivateKey | None = None
        self._vm_cert_der: bytes | None = None
        self._identity_lock = threading.Lock()
        # The pinned context, built ahead by prepare() without its pin (tls.agent_unpinned_context).
        self._unpinned: ssl.SSLContext | None = None
        self._started = time.monotonic()
        self._stopping = threading.Event()
        self._owner_pin: tls.PinnedCert | None = None
        self._delegates: dict[str, tuple[str, str]] = {}  # SHA-256 of a delegate's DER -> (fingerprint, role)
        self._context = self._make_context()

    # -- contexts
    def _make_context(self) -> ssl.SSLContext:
        cert, key = str(self._state.cert_file), str(self._state.key_file)
        if self._record.bound:
            pin = self._owner_pin = tls.PinnedCert.from_pem(self._state.owner_cert_file.read_text())
            unpinned, self._unpinned = self._unpinned, None
            ctx = tls.agent_pinned_context(cert, key, pin) if unpinned is None else unpinned
            if unpinned is not None:
                pin.trust(ctx)
            # The owner's delegates are trust anchors too; each is told apart by its exact
            # certificate after the handshake, and held to its role (guest/control.py).
            self._delegates = {}
            if self._state.delegates_file.exists():
                for fingerprint, delegate in self._state.load_delegates().items():
                    delegate_pin = tls.PinnedCert.from_pem(delegate["cert"])
                    delegate_pin.trust(ctx)
                    self._delegates[delegate_pin.der_sha256] = (fingerprint, delegate["role"])
            return ctx
        return tls.agent_bind_context(cert, key)

    def prepare(self) -> None:
        """After READY, in a thread of its own: what the first connection would otherwise do on
        the owner's clock (the exchange's code, the VM key, the pinned context but for its pin;
        about 5 ms of a 10 ms bind). Nothing here is needed: a failure is logged, and the bind
        does the same work itself, and reports what fails then."""
        try:
            import imprint.protocol.driver  # noqa: F401

            self.identity()
            if not self._record.bound:
                self._unpinned = tls.agent_unpinned_context(str(self._state.cert_file), str(self._state.key_file))
        except Exception as exc:  # the bind will meet it again and say so
            log.info("preparing for the bind ahead of time failed (%s); the bind will do it", exc)

    @property
    def bound(self) -> bool:
        return self._record.bound

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def token(self) -> Token | None:
        """The owner's token until the bind consumed it."""
        return self._token

    @property
    def owner_pin(self) -> tls.PinnedCert | None:
        """The pinned owner certificate, once bound."""
        return self._owner_pin

    @property
    def stopping(self) -> threading.Event:
        return self._stopping

    # -- accept loop
    def serve_forever(self) -> None:
        if self._listener is None:  # dial-out only: the dialler's thread does the work
            self._stopping.wait()
            return
        threading.Thread(target=self._table.reap_forever, daemon=True, name="imprint-reaper").start()
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno not in _ACCEPT_RETRY:
                    raise
                log.warning("accept failed: %s; continuing", exc.strerror or exc)
                self._stopping.wait(0.1)  # out of descriptors or memory: let connections end first
                continue
            self._start(conn, addr)

    def stop(self) -> None:
        self._stopping.set()
        self._table.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()

    def _start(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        context = self._context
        try:
            # Small request/response messages: without NODELAY, Nagle and delayed ACKs add 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # No I/O yet (the handshake runs in the connection's thread); wrapping first gives the
            # reaper the one socket object the thread will use.
            tls_sock = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:  # the peer is gone already
            log.info("connection from %s:%d dropped before its handshake: %s", addr[0], addr[1], exc)
            conn.close()
            return
        entry = self._table.admit(tls_sock, addr, HANDSHAKE_DEADLINE, f"the TLS handshake ({HANDSHAKE_DEADLINE:.0f} s)")
        try:
            threading.Thread(target=self._serve_connection, args=(entry, context), daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: this connection goes, the listener stays
            log.error("connection from %s dropped: %s", entry.peer, exc)
            self._table.leave(entry)
            tls_sock.close()

    def _serve_connection(self, entry: Connection, context: ssl.SSLContext) -> None:
        peer, sock = entry.peer, entry.sock
        pinned = context.verify_mode == ssl.CERT_REQUIRED
        try:
            sock.settimeout(HANDSHAKE_DEADLINE + _BACKSTOP)
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                if entry.cut is not None:
                    return  # the table logged why it cut the connection
                if pinned:
                    log.info("TLS from %s refused (bound; only the pinned owner may connect): %s", peer, exc)
                else:
                    log.info("TLS handshake with %s failed: %s", peer, exc)
                if isinstance(exc, ssl.SSLError) and not isinstance(exc, _PEER_GONE):
                    # We refused the peer and sent an alert: give it a moment to read it, inside
                    # the connection's own deadline.
                    entry.limit_at(min(entry.deadline, time.monotonic() + LINGER), "the lingering close",
                                   routine=True)
                    _lingering_close(sock)
                return
            if pinned:
                self._serve_control(sock, entry)
            else:
                entry.limit_at(entry.accepted + EXCHANGE_DEADLINE, f"the bind exchange ({EXCHANGE_DEADLINE:.0f} s)")
                self._serve_exchange(sock, entry)
        except Exception:
            log.exception("connection from %s ended by an internal error", peer)
        finally:
            self._table.leave(entry)
            with contextlib.suppress(OSError):
                sock.close()

    # -- before binding: the exchange
    def identity(self) -> tuple[crypto.PrivateKey, bytes]:
        with self._identity_lock:
            if self._vm_key is None or self._vm_cert_der is None:
                from imprint import crypto

                self._vm_key = crypto.PrivateKey.from_pem(self._state.key_file.read_bytes())
                self._vm_cert_der = crypto.certificate_der(self._state.cert_file.read_bytes())
            return self._vm_key, self._vm_cert_der

    def _serve_exchange(self, sock: ssl.SSLSocket, entry: Connection) -> None:
        from imprint.protocol import AlertCode, Event, OwnerAuthenticated, RemoteProtocolError, VmExchange
        from imprint.protocol.driver import ExchangeDriver

        peer = entry.peer
        token = self._token
        if token is None:
            # Accepted before another connection bound; the token is consumed since.
            from imprint.protocol.messages import Alert, encode_frame

            with contextlib.suppress(OSError):
                sock.sendall(encode_frame(Alert(int(AlertCode.TOKEN_CONSUMED), b"this VM was bound meanwhile")))
            return
        vm_key, vm_cert = self.identity()
        session = VmExchange(vm_key=vm_key, token=token, own_cert=vm_cert)
        bound_here = False

        def handle(event: Event) -> None:
            nonlocal bound_here
            if not isinstance(event, OwnerAuthenticated):
                return
            # The peer proved the token: it is the owner now, and a flood must not evict it
            # between the pin and the VmConfirm that tells it so.
            self._table.promote(entry)
            bound_here = self.settle_bind(session, token, event.owner_key, peer)

        try:
            ExchangeDriver(session, handle).run(sock, entry.deadline)
        except RemoteProtocolError as exc:
            who = "peer said" if exc.from_peer else "refused"
            log.warning("bind attempt from %s %s: %s (%s)", peer, who, exc.detail, exc.code.name)
            return
        except TimeoutError:
            log.info("bind attempt from %s timed out after %.0f s", peer, EXCHANGE_DEADLINE)
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("bind attempt from %s: connection error: %s", peer, exc)
            return
        if bound_here:
            # The peer of this TLS session sent OwnerProof: a signature by the key just pinned
            # over a transcript with this VM's fresh nonce and the certificate this session
            # showed, which the owner signs only inside a session that ends at this VM's key.
            # So the session is the pinned owner's as surely as a new mutual-TLS handshake
            # would make it (docs/protocol.md §4.4), and goes on as its control channel: the
            # owner checks the bind with a status request here, without a second handshake.
            self._serve_control_on(sock, entry)

    def settle_bind(self, session: VmExchange, token: Token, owner_key: crypto.PublicKey, peer: str) -> bool:
        """The owner proved the token (OwnerAuthenticated), in either direction: pin it and
        confirm, or abort saying why. True when this bind pinned the owner."""
        from imprint.protocol import AlertCode

        try:
            pinned = self.pin_owner(session, token, owner_key, peer)
        except OSError as exc:
            log.error("bind with %s: the owner key could not be stored: %s", peer, exc)
            session.abort(AlertCode.INTERNAL, "the VM could not store the pin; retry")
            return False
        if not pinned:
            session.abort(AlertCode.TOKEN_CONSUMED, "this VM was bound meanwhile")
            return False
        session.confirm()
        return True

    def pin_owner(self, session: VmExchange, token: Token, owner_key: crypto.PublicKey, peer: str) -> bool:
        from imprint import crypto

        assert session.peer_cert is not None
        with self._bind_lock:
            if self._record.bound:
                return False
            self._record = self._state.record_bind(
                owner_cert_pem=tls.PinnedCert(session.peer_cert).pem.encode(),
                mode=token.mode,
                owner_fingerprint=owner_key.fingerprint,
                owner_spki_sha256=crypto.sha256(owner_key.spki).hex(),
                token_id=token.token_id.hex(),
                owner_addresses=self._owner_addresses,
                reached="dial-out" if session.tls_role.value == "client" else "dial-in",
            )
            self._context = self._make_context()
            self._token = None  # K is consumed: forget it
        log.info("bound to owner %s (from %s, %s mode); the token is consumed",
                 owner_key.fingerprint, peer, self._record.mode)
        self._on_bound()
        return True

    # -- after binding: the pinned control channel
    def _serve_control(self, sock: ssl.SSLSocket, entry: Connection) -> None:
        pinned = self._owner_pin
        assert pinned is not None  # set with the pinned context this connection was accepted under
        role = "owner"
        try:
            pinned.verify(sock)
        except tls.PinMismatch as exc:
            import hashlib

            delegate = self._delegates.get(hashlib.sha256(tls.peer_certificate(sock)).hexdigest())
            if delegate is None:
                log.warning("control connection from %s refused: %s", entry.peer, exc)
                return
            role = delegate[1]
            log.info("control connection from %s: delegate %s (%s)", entry.peer, delegate[0], role)
        if not self._table.promote(entry):
            if entry.cut is None:
                log.warning("control connection from %s refused: %d owner connections are busy", entry.peer, MAX_OWNER)
            return
        self._serve_control_on(sock, entry, role)

    def _serve_control_on(self, sock: ssl.SSLSocket, entry: Connection, role: str = "owner") -> None:
        """The control channel on a connection of the pinned owner or a delegate (already in
        the owner pool), each request held to ``role``."""
        from imprint.guest.control import REQUEST_DEADLINE, serve_control

        sock.settimeout(REQUEST_DEADLINE + _BACKSTOP)
        serve_control(sock, entry.peer, self, entry, role=role)

    def status(self) -> dict[str, object]:
        from imprint import __version__

        vm_key, _ = self.identity()  # loaded once (prepare() loads it after READY)
        return {
            "state": "bound" if self._record.bound else "waiting",
            "mode": self._record.mode,
            "vm_fingerprint": vm_key.public.fingerprint,
            "owner_fingerprint": self._record.owner_fingerprint,
            "bound_at": self._record.bound_at,
            "session_counter": self._record.session_counter,
            "agent_version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
        }

    def session_counter(self) -> int:
        with self._session_lock:
            return self._record.session_counter

    def advance_session(self, proposed: int) -> tuple[int, int]:
        with self._session_lock:
            before, after = self._state.advance_session(proposed)
            self._record.session_counter = after
            return before, after

    # -- the owner changes (issue 13): the reply goes out, then the agent starts again
    def release(self, wipe: bool) -> dict[str, Any]:
        with self._bind_lock:
            owner = self._record.owner_fingerprint
            self._state.release(wipe=wipe)
            self._restart_due = True
        log.info("released by owner %s%s; starting again unbound", owner, " (VM key wiped)" if wipe else "")
        return {"released": True, "wiped": wipe}

    def transfer(self, owner_cert_pem: str, owner_addresses: list[str] | None) -> dict[str, Any]:
        from imprint import crypto
        from imprint.guest.control import BadRequest

        try:
            der = crypto.certificate_der(owner_cert_pem.encode())
            spki = crypto.self_signed_certificate_spki(der)
        except crypto.CryptoError as exc:
            raise BadRequest(400, f"owner_cert: {exc}") from None
        if owner_addresses:
            from imprint.owneraddr import OwnerAddressError, parse_list

            try:
                owner_addresses = [str(a) for a in parse_list(",".join(owner_addresses))]
            except OwnerAddressError as exc:
                raise BadRequest(400, f"owner_addresses: {exc}") from None
        fingerprint = crypto.fingerprint(spki)
        with self._bind_lock:
            self._state.transfer(owner_cert_pem=tls.PinnedCert(der).pem.encode(), owner_fingerprint=fingerprint,
                                 owner_spki_sha256=crypto.sha256(spki).hex(), owner_addresses=owner_addresses)
            self._restart_due = True
        log.info("transferred to owner %s; starting again to trust it alone", fingerprint)
        return {"transferred": True, "owner_fingerprint": fingerprint}

    def grant(self, cert_pem: str, role: str) -> dict[str, Any]:
        from imprint import crypto
        from imprint.guest.control import BadRequest

        try:
            der = crypto.certificate_der(cert_pem.encode())
            spki = crypto.self_signed_certificate_spki(der)
        except crypto.CryptoError as exc:
            raise BadRequest(400, f"cert: {exc}") from None
        fingerprint = crypto.fingerprint(spki)
        if fingerprint == self._record.owner_fingerprint:
            raise BadRequest(400, "the owner is not its own delegate")
        pin = tls.PinnedCert(der)
        with self._bind_lock:
            delegates = self._state.load_delegates()
            delegates[fingerprint] = {"cert": pin.pem, "role": role}
            self._state.save_delegates(delegates, "granted", delegate=fingerprint, role=role)
            self._context = self._make_context()  # new connections trust the delegate
        log.info("granted %s to delegate %s", role, fingerprint)
        return {"granted": True, "fingerprint": fingerprint, "role": role}

    def revoke(self, fingerprint: str) -> dict[str, Any]:
        from imprint.guest.control import BadRequest

        with self._bind_lock:
            delegates = self._state.load_delegates()
            if delegates.pop(fingerprint, None) is None:
                raise BadRequest(404, f"no delegate {fingerprint[:80]}")
            self._state.save_delegates(delegates, "revoked", delegate=fingerprint)
            # Its open connections end with this process; the next trusts it no more.
            self._restart_due = True
        log.info("revoked delegate %s; starting again", fingerprint)
        return {"revoked": True, "fingerprint": fingerprint}

    def restart_if_due(self) -> None:
        """Every connection of the old owner ends with this process: a new one, with the new
        record, trusts only what it says (re-executed with the same arguments; under systemd
        the same unit keeps running)."""
        if not self._restart_due:
            return
        import os
        import sys

        log.info("restarting")
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 (this program, its own argv)

    def apply(self, backends: dict[str, Any]) -> dict[str, Any]:
        """Run the owner's backends ({name: config}); one apply at a time."""
        from imprint.backends import apply_document

        with self._apply_lock:
            return apply_document(self._paths, backends)


# The peer closed or was cut off: nobody is left to read an alert.
_PEER_GONE = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _lingering_close(sock: ssl.SSLSocket) -> None:
    """Close without a TCP reset, so the peer reads our TLS alert (in TLS 1.3 a refused client
    certificate is reported after the client already sent data; closing with that data unread
    would reset the connection and lose the alert). Bounded by the connection's deadline, which
    the reaper enforces however slowly the peer sends."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER + _BACKSTOP)
        drained = 0
        while drained < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            drained += len(chunk)
