"""The agent's listener: the key exchange before binding, the pinned control channel after.

One port serves both. Until bound, TLS authenticates only the VM and each connection runs the
exchange; the first owner to complete it is pinned, the token is consumed, and from then on the
listener requires a client certificate (CERT_REQUIRED) that is exactly the pinned owner's.
Each connection has its own thread and deadline, and their number is capped, so garbage or
slow clients cannot keep a genuine owner out for longer than a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imprint import tls
from imprint.guest import log as agent_log
from imprint.guest.paths import GuestPaths
from imprint.guest.state import AgentState, BindRecord
from imprint.tokens import Token

if TYPE_CHECKING:
    from imprint import crypto
    from imprint.protocol import VmExchange

log = agent_log.get("imprint.agent")

HANDSHAKE_TIMEOUT = 10.0
EXCHANGE_DEADLINE = 20.0
CONTROL_IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 64


class AgentServer:
    def __init__(
        self,
        state: AgentState,
        listener: socket.socket,
        *,
        token: Token | None,
        record: BindRecord,
        paths: GuestPaths,
        on_bound: Callable[[], None] = lambda: None,
    ) -> None:
        self._state = state
        self._paths = paths
        self._apply_lock = threading.Lock()
        self._listener = listener
        self._token = token
        self._record = record
        self._on_bound = on_bound
        self._bind_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._vm_key: crypto.PrivateKey | None = None
        self._vm_cert_der: bytes | None = None
        self._started = time.monotonic()
        self._stopping = threading.Event()
        self._context = self._make_context()

    # -- contexts
    def _make_context(self) -> ssl.SSLContext:
        cert, key = str(self._state.cert_file), str(self._state.key_file)
        if self._record.bound:
            owner_pem = self._state.owner_cert_file.read_text()
            return tls.agent_pinned_context(cert, key, owner_pem)
        return tls.agent_bind_context(cert, key)

    @property
    def bound(self) -> bool:
        return self._record.bound

    # -- accept loop
    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            # Small request/response messages: without NODELAY, Nagle and delayed ACKs add 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._slots.acquire(blocking=False):
                log.warning("connection from %s refused: %d connections already open", addr[0], MAX_CONNECTIONS)
                conn.close()
                continue
            threading.Thread(target=self._serve_connection, args=(conn, addr), daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _serve_connection(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        tls_sock: ssl.SSLSocket | None = None
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            context = self._context
            tls_sock = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                tls_sock.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                if context.verify_mode == ssl.CERT_REQUIRED:
                    log.info("TLS from %s refused (bound; only the pinned owner may connect): %s", peer, exc)
                else:
                    log.info("TLS handshake with %s failed: %s", peer, exc)
                _lingering_close(tls_sock)
                return
            with tls_sock:
                if context.verify_mode == ssl.CERT_REQUIRED:
                    self._serve_control(tls_sock, peer)
                else:
                    self._serve_exchange(tls_sock, peer)
        except Exception:
            log.exception("connection from %s ended by an internal error", peer)
        finally:
            for sock in (tls_sock, conn):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
            self._slots.release()

    # -- before binding: the exchange
    def _identity(self) -> tuple[crypto.PrivateKey, bytes]:
        if self._vm_key is None or self._vm_cert_der is None:
            from imprint import crypto

            self._vm_key = crypto.PrivateKey.from_pem(self._state.key_file.read_bytes())
            self._vm_cert_der = crypto.certificate_der(self._state.cert_file.read_bytes())
        return self._vm_key, self._vm_cert_der

    def _serve_exchange(self, sock: ssl.SSLSocket, peer: str) -> None:
        from imprint.protocol import AlertCode, OwnerAuthenticated, RemoteProtocolError, State, VmExchange

        token = self._token
        if token is None:
            # Accepted before another connection bound; the token is consumed since.
            from imprint.protocol.messages import Alert, encode_frame

            with contextlib.suppress(OSError):
                sock.sendall(encode_frame(Alert(int(AlertCode.TOKEN_CONSUMED), b"this VM was bound meanwhile")))
            return
        vm_key, vm_cert = self._identity()
        session = VmExchange(vm_key=vm_key, token=token, own_cert=vm_cert)
        deadline = time.monotonic() + EXCHANGE_DEADLINE
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("bind attempt from %s timed out after %.0f s", peer, EXCHANGE_DEADLINE)
                    return
                sock.settimeout(remaining)
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    log.info("bind attempt from %s timed out after %.0f s", peer, EXCHANGE_DEADLINE)
                    return
                for event in session.receive_data(data):
                    if isinstance(event, OwnerAuthenticated):
                        try:
                            pinned = self._pin_owner(session, token, event.owner_key, peer)
                        except OSError as exc:
                            log.error("bind from %s: the owner key could not be stored: %s", peer, exc)
                            session.abort(AlertCode.INTERNAL, "the VM could not store the pin; retry")
                        else:
                            if pinned:
                                session.confirm()
                            else:
                                session.abort(AlertCode.TOKEN_CONSUMED, "this VM was bound meanwhile")
                sock.sendall(session.data_to_send())
                if session.state in (State.DONE, State.FAILED):
                    return
        except RemoteProtocolError as exc:
            with contextlib.suppress(OSError):
                sock.sendall(session.data_to_send())
            who = "peer said" if exc.from_peer else "refused"
            log.warning("bind attempt from %s %s: %s (%s)", peer, who, exc.detail, exc.code.name)
        except (ssl.SSLError, OSError) as exc:
            log.info("bind attempt from %s: connection error: %s", peer, exc)

    def _pin_owner(self, session: VmExchange, token: Token, owner_key: crypto.PublicKey, peer: str) -> bool:
        from imprint import crypto

        assert session.peer_cert is not None
        with self._bind_lock:
            if self._record.bound:
                return False
            owner_pem = _der_to_pem(session.peer_cert)
            self._record = self._state.record_bind(
                owner_cert_pem=owner_pem.encode(),
                mode=token.mode.value,
                owner_fingerprint=owner_key.fingerprint,
                owner_spki_sha256=crypto.sha256(owner_key.spki).hex(),
                token_id=token.token_id.hex(),
            )
            self._context = self._make_context()
            self._token = None  # K is consumed: forget it
        log.info("bound to owner %s (from %s, %s mode); the token is consumed",
                 owner_key.fingerprint, peer, self._record.mode)
        self._on_bound()
        return True

    # -- after binding: the pinned control channel
    def _serve_control(self, sock: ssl.SSLSocket, peer: str) -> None:
        from imprint.guest.control import serve_control

        pinned = self._record.owner_spki_sha256
        assert pinned is not None
        try:
            tls.require_peer_key(sock, bytes.fromhex(pinned))
        except tls.PinMismatch as exc:
            log.warning("control connection from %s refused: %s", peer, exc)
            return
        sock.settimeout(CONTROL_IDLE_TIMEOUT)
        serve_control(sock, peer, self)

    def status(self) -> dict[str, object]:
        from imprint import __version__, crypto

        vm_spki = crypto.certificate_spki(self._state.cert_file.read_bytes())
        return {
            "state": "bound" if self._record.bound else "waiting",
            "mode": self._record.mode,
            "vm_fingerprint": crypto.fingerprint(vm_spki),
            "owner_fingerprint": self._record.owner_fingerprint,
            "bound_at": self._record.bound_at,
            "agent_version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
        }

    def apply(self, backends: dict[str, Any]) -> dict[str, Any]:
        """Run the owner's backends ({name: config}); one apply at a time."""
        from imprint.backends import apply_document

        with self._apply_lock:
            return apply_document(self._paths, backends)


def _lingering_close(conn: socket.socket | ssl.SSLSocket) -> None:
    """Close without a TCP reset, so the peer reads our TLS alert (in TLS 1.3 a refused client
    certificate is reported after the client already sent data; closing with that data unread
    would reset the connection and lose the alert)."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        drained = 0
        while drained < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            drained += len(chunk)


def _der_to_pem(der: bytes) -> str:
    return ssl.DER_cert_to_PEM_cert(der)
