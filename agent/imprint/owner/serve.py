"""`imprint serve`: the owner's listener, for VMs that dial their owner (docs/protocol.md §4.6).

A VM with no inbound port dials one of the owner addresses its boot channel gave. The listener
presents the owner certificate (tls.owner_listener_context) and tells the two kinds of
connection apart by the client certificate:

* none: a bind. The exchange runs with the roles reversed (OwnerExchange.listening). VmDial
  names the token: a shared-mode token the owner issued binds at once; a no-secrets VM binds
  once the owner has given the VM token the site relayed (`imprint bind NAME --vm-token T`
  without --address, before or after the VM dialled). Until then the VM waits here, nothing
  pinned, at most WAIT_SECONDS (then it is told NOT_EXPECTED and dials again later). The pin
  is pending when the VM proved its key, bound once the VM answered over the bind's own
  connection with both keys, exactly as a dial-in bind (owner/bind.py); every attempt is audited.
* a pinned VM's certificate: the handshake accepted it only because it is one of the pinned
  certificates (the context's only trust anchors), and the listener checks it is exactly a
  bound pin's bytes. The connection is then that VM's control channel, kept open: the newest
  connection of a VM replaces an older one.

`imprint status`, `imprint apply` and the owner API reach a connected VM through the listener:
they ask over a Unix socket in the owner home (serve.sock, 0600 in the 0700 home: only the
owner's user), and the listener sends the request on the VM's connection (viaserve.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imprint import crypto, timeouts, tls, tokens
from imprint.owner.api import Owner
from imprint.owner.bind import BindResult, _result, _vm_proof_text
from imprint.owner.client import Answer, BadAnswer, exchange_on
from imprint.owner.errors import OwnerError
from imprint.owner.store import ClaimHeld, PinRow, Store
from imprint.ports import AGENT_PORT
from imprint.protocol import AlertCode, Event, ExchangeComplete, OwnerExchange, RemoteProtocolError, VmAuthenticated
from imprint.protocol.driver import ExchangeDriver
from imprint.protocol.exchange import VmDialled
from imprint.safetext import printable

HANDSHAKE_SECONDS = timeouts.seconds("IMPRINT_SERVE_HANDSHAKE_SECONDS", 10.0)
# The bind connection, but for a no-secrets VM's wait for its VM token.
EXCHANGE_SECONDS = timeouts.seconds("IMPRINT_SERVE_EXCHANGE_SECONDS", 20.0)
WAIT_SECONDS = timeouts.seconds("IMPRINT_SERVE_WAIT_SECONDS", 600.0)  # a no-secrets VM waiting for its VM token
REQUEST_SECONDS = timeouts.seconds("IMPRINT_OWNER_REQUEST_SECONDS", 10.0)
MAX_WAITING = 1024  # dialled-in VMs waiting for their VM token (anyone can dial and claim to be one)
MAX_CONNECTIONS = 4096  # a thread each
MAX_LOCAL_REQUEST = 2 << 20  # a local client's request line (an apply's profile included)
# What a VM's status on its own connection can fail with (each named in the audit).
_STATUS_FAILURES = (OSError, TimeoutError, BadAnswer, ValueError, RecursionError, OwnerError)


def _peer_text(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _agent_address(addr: Any) -> str:
    """Where the bound VM's own port would be (the agent listens on 7443 unless told not to):
    the pin's address, for a dial-in request when the VM is not connected."""
    host = addr[0]
    return f"[{host}]:{AGENT_PORT}" if ":" in host else f"{host}:{AGENT_PORT}"


@dataclass
class VmConnection:
    vm: str
    sock: ssl.SSLSocket
    peer: str
    since: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def request(self, method: str, path: str, body: bytes | None, timeout: float,
                session: str | None = None) -> Answer:
        with self.lock:
            if self.closed.is_set():
                raise ConnectionError(f"the connection of {self.vm} closed")
            try:
                return exchange_on(self.sock, method, path, body, timeout=timeout, keep_alive=True, session=session)
            except BaseException:
                self.close()  # half an answer may be left on it: never reuse it
                raise


class Listener:
    def __init__(self, owner: Owner, addresses: Sequence[tuple[str, int]], *,
                 on_change: Callable[[str], None] = lambda status: None) -> None:
        self._owner = owner
        self._home = owner.home
        self._store: Store = owner._store()
        self._key = self._home.load_key()
        self._cert = self._home.cert_der()
        self._context = tls.owner_listener_context(str(self._home.cert_file), str(self._home.key_file))
        self._trusted: dict[str, str] = {}  # SHA-256 of a pin's DER -> VM name
        self._subjects: dict[bytes, str] = {}  # a trusted certificate's subject (DER) -> VM name
        self._trust_lock = threading.Lock()
        self._last_refresh = 0.0
        self._connections: dict[str, VmConnection] = {}
        self._lock = threading.Lock()
        self._given = threading.Condition(self._lock)  # a VM token was given: waiting binds look again
        self._moved = threading.Condition(self._lock)  # a VM connected or disconnected
        self._waiting = 0
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()
        self._on_change = on_change
        self.refresh_trust()
        self.descriptors = self.raise_descriptor_limit()
        self._local = self._listen_local()  # first: a second listener on this home stops here
        self._listeners = [self._listen(host, port) for host, port in addresses]

    # -- set-up
    @staticmethod
    def raise_descriptor_limit() -> int:
        """One descriptor per connected VM: the soft limit (often 1024) goes up to the hard one."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        return soft

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=1024)
        return sock

    def _listen_local(self) -> socket.socket:
        path = self._home.serve_socket
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2.0)
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # none, or what a listener killed earlier left
        except OSError as exc:
            raise OSError(f"cannot check {path} for another listener: {exc}") from None
        else:
            raise OSError(f"another `imprint serve` runs on this owner home ({path} answers): one listener per home")
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(64)
        return sock

    @property
    def addresses(self) -> list[str]:
        return [_peer_text(sock.getsockname()) for sock in self._listeners]

    def refresh_trust(self) -> None:
        """Make every bound pin a trust anchor of the listener's context (the handshake's check
        of a VM's client certificate): the ones bound here, and by binds of other processes."""
        with self._trust_lock:
            self._last_refresh = time.monotonic()
            for pin in self._store.pins():
                digest = pin.vm_cert.der_sha256
                if digest not in self._trusted:
                    self._trust(pin.vm, pin.vm_cert)

    def _trust(self, vm: str, cert: tls.PinnedCert) -> None:
        """One more trust anchor (under _trust_lock). OpenSSL finds an anchor by its subject
        name: two pinned certificates with one name (agents before per-VM names) cannot both
        verify, so the second is named in the log rather than failing without a word."""
        subject = crypto.certificate_subject(cert.der)
        other = self._subjects.get(subject)
        if other is not None and other != vm:
            _log(f"{vm}'s certificate has the same subject as {other}'s: only one of them can dial in "
                 "with it (an agent older than per-VM certificate names; it binds and is reached dial-in)")
        self._subjects.setdefault(subject, vm)
        cert.trust(self._context)
        self._trusted[cert.der_sha256] = vm

    # -- running
    def serve_forever(self) -> None:
        threads = [threading.Thread(target=self._accept_loop, args=(sock,), daemon=True) for sock in self._listeners]
        threads.append(threading.Thread(target=self._local_loop, daemon=True))
        for thread in threads:
            thread.start()
        self._changed()
        self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()
        for sock in [*self._listeners, self._local]:
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError):
            self._home.serve_socket.unlink()
        with self._lock:
            connections = list(self._connections.values())
            self._given.notify_all()
        for conn in connections:
            conn.close()

    def connected(self) -> list[str]:
        with self._lock:
            return sorted(self._live())

    def _live(self) -> set[str]:
        return {name for name, conn in self._connections.items() if not conn.closed.is_set()}

    def _changed(self) -> None:
        self._on_change(f"listening on {', '.join(self.addresses)}; {len(self.connected())} VMs connected")

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                self._stopping.wait(0.05)  # out of descriptors: let connections end first
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            try:
                threading.Thread(target=self._connection, args=(conn, addr), daemon=True).start()
            except RuntimeError:
                self._slots.release()
                conn.close()

    def _connection(self, raw: socket.socket, addr: Any) -> None:
        peer = _peer_text(addr)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            sock.settimeout(HANDSHAKE_SECONDS)
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                if isinstance(exc, ssl.SSLError) and "certificate" in str(exc).lower() \
                        and time.monotonic() - self._last_refresh > 1.0:
                    self.refresh_trust()  # a VM bound by another process: its next attempt is trusted
                _log(f"TLS with {peer} failed: {exc}")
                return
            shown = sock.getpeercert(binary_form=True)
            if shown:
                self._control(sock, peer, shown)
            else:
                self._bind(sock, addr, peer)
        except Exception as exc:  # one connection's failure, never the listener's
            _log(f"connection from {peer} ended by an internal error: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(OSError):
                raw.close()
            self._slots.release()

    # -- a bound VM's connection
    def _control(self, sock: ssl.SSLSocket, peer: str, shown: bytes) -> None:
        digest = crypto.sha256(shown).hex()
        with self._trust_lock:
            vm = self._trusted.get(digest)
        pin = self._store.pin(vm) if vm is not None else None
        if vm is None or pin is None or pin.vm_cert.der_sha256 != digest:
            _log(f"connection from {peer} refused: its certificate is not a pin's")
            return
        if pin.state == "pending" and not self._recover(sock, vm, pin, peer):
            return
        self._hold(VmConnection(vm, sock, peer, time.time()))

    def _checked_status(self, sock: ssl.SSLSocket, vm: str, address: str, mode: tokens.Mode, cert: tls.PinnedCert,
                        proved: list[str]) -> BindResult:
        """``GET /v1/status`` on a VM's connection (kept open), naming both keys the pin and this
        owner expect: what makes a pin final, after a bind or for a pending pin's VM."""
        status, body, _ = exchange_on(sock, "GET", "/v1/status", None, timeout=REQUEST_SECONDS, keep_alive=True)
        answer = json.loads(body) if status == 200 else None
        if not isinstance(answer, dict):
            raise BadAnswer(f"status {status}")
        return _result(vm, address, mode, cert, self._key, answer, proved)

    def _recover(self, sock: ssl.SSLSocket, vm: str, pin: PinRow, peer: str) -> bool:
        """A VM whose exchange this side never saw confirmed (the listener died, VmConfirm was
        lost) dials with the pending pin's certificate: it pinned this owner. Its answer over
        this mutual-TLS connection, with both keys, makes the pin final, as a dial-in bind's
        recovery does (owner/bind.py)."""
        try:
            result = self._checked_status(sock, vm, pin.address, pin.mode, pin.vm_cert, [])
        except _STATUS_FAILURES as exc:
            _log(f"{vm}: the pending pin's VM dialled in, but its status failed: {exc}")
            return False
        if not self._store.confirm_pin(vm, pin.address, cert=pin.vm_cert, audit_detail=(
                f"VM key {result.vm_fingerprint}, {pin.mode.value} mode, recovered: the pending pin's VM dialled "
                f"in from {peer} and answered over mutual TLS")):
            return False
        _log(f"{vm} bound (recovered a pending pin; dialled in from {peer})")
        return True

    def _hold(self, conn: VmConnection) -> None:
        """Keep ``conn`` as its VM's control channel until it closes."""
        with self._lock:
            old = self._connections.get(conn.vm)
            self._connections[conn.vm] = conn
            self._moved.notify_all()
        if old is not None:
            old.close()
        _log(f"{conn.vm} connected from {conn.peer}")
        self._changed()
        try:
            self._watch(conn)
        finally:
            conn.close()
            with self._lock:
                if self._connections.get(conn.vm) is conn:
                    del self._connections[conn.vm]
                self._moved.notify_all()
            _log(f"{conn.vm} disconnected")
            self._changed()

    def _watch(self, conn: VmConnection) -> None:
        """Until the VM closes: the agent sends nothing unasked, so anything readable while no
        request holds the connection is its end (or a protocol breach, which ends it too).
        poll(), not select(): a listener holds more than FD_SETSIZE (1024) descriptors."""
        poller = select.poll()
        try:
            poller.register(conn.sock, select.POLLIN)
        except (OSError, ValueError):
            return
        while not conn.closed.is_set() and not self._stopping.is_set():
            try:
                if not poller.poll(30_000):
                    continue
            except (OSError, ValueError):
                return
            with conn.lock:
                if conn.closed.is_set():
                    return
                try:
                    ready = poller.poll(0)
                except (OSError, ValueError):
                    return
                if not ready and not conn.sock.pending():
                    continue  # a request read what woke us
                try:
                    conn.sock.settimeout(1.0)
                    data = conn.sock.recv(1)
                except (ssl.SSLWantReadError, TimeoutError):
                    continue
                except OSError:
                    return
                if not data:
                    return
                _log(f"{conn.vm} sent bytes nobody asked for: closing its connection")
                return

    # -- a bind
    def _bind(self, sock: ssl.SSLSocket, addr: Any, peer: str) -> None:
        session = OwnerExchange.listening(owner_key=self._key, owner_cert=self._cert)
        bind = _DialBind(self, session, peer, _agent_address(addr))
        try:
            vm = self._exchange(sock, bind)
        finally:
            bind.release()
        if vm is not None:
            self._hold(VmConnection(vm, sock, peer, time.time()))

    def _exchange(self, sock: ssl.SSLSocket, bind: _DialBind) -> str | None:
        """The exchange, the status on the same connection and the confirmed pin (the VM's
        name), under the VM's claim; None when it did not bind (audited)."""
        peer = bind.peer
        try:
            # The wait for a VM token happens in the handler; it is not counted against the
            # exchange's own deadline (a peer that sends nothing is cut after EXCHANGE_SECONDS).
            ExchangeDriver(bind.session, bind.handle).run(
                sock, time.monotonic() + EXCHANGE_SECONDS, clock=lambda: time.monotonic() - bind.waited)
        except RemoteProtocolError as exc:
            bind.failed(f"{'the VM refused' if exc.from_peer else 'refused'} ({exc.code.name}): {exc.detail}")
            return None
        except (TimeoutError, OSError) as exc:
            bind.failed(f"the connection failed: {exc or type(exc).__name__}")
            return None
        if bind.vm is None or bind.mode is None:
            return None
        cert = tls.PinnedCert(bind.vm_cert)
        try:
            result = self._checked_status(sock, bind.vm, bind.address, bind.mode, cert, bind.proved)
        except _STATUS_FAILURES as exc:
            detail = (f"the VM confirmed the exchange, but its status on the same connection failed ({exc}); "
                      "its key is a pending pin, bound when it dials again")
            self._store.audit(bind.vm, "bind", peer, "Unreachable", detail)
            return None
        if not self._store.confirm_pin(bind.vm, bind.address, audit_detail=f"VM key {result.vm_fingerprint}, "
                                       f"{bind.mode.value} mode, dialled in from {peer} to {bind.dialled}",
                                       cert=cert):
            self._store.audit(bind.vm, "bind", peer, "AuthenticationFailed", "another pending key than this bind's")
            return None
        _log(f"{bind.vm} bound (VM key {result.vm_fingerprint}, {bind.mode.value} mode, dialled in from {peer})")
        with self._trust_lock:
            self._trust(bind.vm, cert)
        return bind.vm

    def find(self, dial: VmDialled) -> tuple[str, tokens.Token, tokens.Token | None] | None:
        """The VM, token and VM token a VmDial names, if the owner expects it now."""
        if dial.mode is tokens.Mode.SHARED:
            row = self._store.issued_token_by_id(dial.token_id.hex(), dial.mode)
            if row is None or row.token_text is None:
                return None
            return row.vm, tokens.parse(row.token_text), None
        given = self._store.dial_vm_token(dial.vm_key_sha256.hex())
        if given is None:
            return None
        vm, vm_token_text = given
        row = self._store.current_token(vm)
        if row is None or row.state != "issued" or row.mode is not tokens.Mode.NOSECRET or row.token_text is None:
            return None
        token = tokens.parse(row.token_text)
        if token.token_id != dial.token_id:
            return None
        return vm, token, tokens.parse(vm_token_text, expect=tokens.TokenKind.VM)

    def wait_for(self, dial: VmDialled) -> tuple[str, tokens.Token, tokens.Token | None] | None:
        """``find``, waiting up to WAIT_SECONDS in no-secrets mode for the owner to give the VM
        token (woken by `imprint bind` through the local socket; the store is read again every
        few seconds for a VM token given without it)."""
        found = self.find(dial)
        if found is not None or dial.mode is tokens.Mode.SHARED:
            return found
        deadline = time.monotonic() + WAIT_SECONDS
        with self._lock:
            if self._waiting >= MAX_WAITING:
                return None
            self._waiting += 1
        try:
            while found is None and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                with self._lock:
                    self._given.wait(min(remaining, 5.0))
                found = self.find(dial)
            return found
        finally:
            with self._lock:
                self._waiting -= 1

    def given(self) -> None:
        with self._lock:
            self._given.notify_all()

    # -- the local socket: requests of `imprint status/apply` and `imprint bind --vm-token`
    def _local_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._local.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                self._stopping.wait(0.05)
                continue
            threading.Thread(target=self._local_client, args=(conn,), daemon=True).start()

    def _local_client(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(REQUEST_SECONDS)
                line = conn.makefile("rb").readline(MAX_LOCAL_REQUEST + 1)
                request = json.loads(line) if len(line) <= MAX_LOCAL_REQUEST else None
                reply = self._answer(request) if isinstance(request, dict) else {"ok": False, "error": "bad-request"}
            except (OSError, ValueError, RecursionError):
                return
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "connected":
            return {"ok": True, "vms": self.connected()}
        if op == "await-connected":  # for the tools and tests that wait for VMs: no polling
            wanted, timeout = request.get("vms"), request.get("timeout")
            if not (isinstance(wanted, list) and all(isinstance(v, str) for v in wanted)
                    and isinstance(timeout, int | float) and 0 < timeout <= 3600):
                return {"ok": False, "error": "bad-request"}
            deadline = time.monotonic() + timeout
            with self._lock:
                while not set(wanted) <= self._live() and (left := deadline - time.monotonic()) > 0:
                    self._moved.wait(left)
                return {"ok": True, "vms": sorted(self._live())}
        if op == "vm-token-given":
            self.given()
            return {"ok": True}
        if op == "request":
            vm, method, path = request.get("vm"), request.get("method"), request.get("path")
            body = request.get("body")
            timeout = request.get("timeout", REQUEST_SECONDS)
            session = request.get("session")
            if not (isinstance(vm, str) and method in ("GET", "POST") and isinstance(path, str)
                    and (body is None or isinstance(body, str)) and isinstance(timeout, int | float)
                    and 0 < timeout <= 3600 and (session is None or isinstance(session, str))):
                return {"ok": False, "error": "bad-request"}
            with self._lock:
                conn = self._connections.get(vm)
            if conn is None or conn.closed.is_set():
                return {"ok": False, "error": "not-connected"}
            try:
                status, answer, answered = conn.request(method, path, body.encode() if body is not None else None,
                                                        timeout, session)
            except TimeoutError:
                return {"ok": False, "error": "timeout", "detail": f"no whole answer within {timeout:g} s"}
            except (BadAnswer, ValueError) as exc:
                return {"ok": False, "error": "bad-answer", "detail": str(exc)}
            except OSError as exc:
                return {"ok": False, "error": "connection", "detail": printable(str(exc), 200)}
            return {"ok": True, "status": status, "answer": answer.decode("utf-8", "replace"), "peer": conn.peer,
                    "session": answered}
        return {"ok": False, "error": "unknown-op"}


class _DialBind:
    """One dialled-in bind's handler and what it learnt, for the audit and the confirmation."""

    def __init__(self, listener: Listener, session: OwnerExchange, peer: str, address: str) -> None:
        self._listener = listener
        self.session = session
        self.peer = peer
        self.address = address
        self.vm: str | None = None
        self.mode: tokens.Mode | None = None
        self.vm_cert = b""
        self.proved: list[str] = []
        self.waited = 0.0  # seconds the handler waited for the owner's VM token
        self.dialled = ""  # the owner address the VM says it dialled
        self._claim: contextlib.ExitStack | None = None

    def handle(self, event: Event) -> None:
        store = self._listener._store
        if isinstance(event, VmDialled):
            began = time.monotonic()
            found = self._listener.wait_for(event)
            self.waited += time.monotonic() - began
            if found is None:
                self.session.abort(AlertCode.NOT_EXPECTED, "this owner expects no VM with this token and key now")
                return
            vm, token, vm_token = found
            claim = contextlib.ExitStack()
            try:
                claim.enter_context(store.claim(vm, wait=1.0))
            except ClaimHeld:
                self.session.abort(AlertCode.NOT_EXPECTED, "another bind of this VM is under way")
                return
            self._claim = claim
            pin = store.pin(vm)
            if pin is not None and pin.state == "bound":
                self.session.abort(AlertCode.TOKEN_CONSUMED, "this VM is bound already")
                return
            self.vm, self.mode, self.vm_cert = vm, token.mode, event.vm_cert
            self.dialled = printable(event.owner_address, 80)  # covered by the transcript
            self.session.accept(token, vm_token)
            self.proved.append(f"the VM dialled the owner's listener at {printable(event.owner_address, 80)}, "
                               "which the transcript covers")
        elif isinstance(event, VmAuthenticated):
            assert self.vm is not None and self.mode is not None
            cert = tls.PinnedCert(self.vm_cert)
            if not store.pin_pending(self.vm, cert, event.vm_key.fingerprint, self.mode, self.address):
                self.session.abort(AlertCode.TOKEN_CONSUMED, "this VM is bound already")
                return
            self.proved.append(_vm_proof_text(self.mode, event.vm_key).replace(
                "the key of the TLS certificate this connection showed", "the key of the certificate it sent"))
        elif isinstance(event, ExchangeComplete):
            self.proved.append("the VM verified this owner's key and signature, pinned it, and consumed the token")

    def failed(self, why: str) -> None:
        if self.vm is not None:
            self._listener._store.audit(self.vm, "bind", self.peer, "AuthenticationFailed", f"dialled in: {why}")
        _log(f"bind from {self.peer}: {why}")

    def release(self) -> None:
        if self._claim is not None:
            self._claim.close()
            self._claim = None


def _log(line: str) -> None:
    print(f"imprint serve: {printable(line, 600)}", flush=True)
