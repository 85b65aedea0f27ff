"""Bad input to the real programs: tokens that are wrong in every way, peers that are not agents,
boot channels that are corrupt, and a flood of garbage and slow connections at a waiting agent.

Every test runs the real `imprint` CLI and real `imprint-agent` processes. Waiting is on process
exit, pipes and socket reads; timeouts are upper bounds only.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imprint import crypto, tls, tokens
from imprint.owner import bind as owner_bind
from imprint.protocol import AlertCode, OwnerExchange
from imprint.protocol.messages import (
    MAX_BODY,
    Alert,
    FrameBuffer,
    OwnerHello,
    OwnerProof,
    WireMode,
    decode_body,
    encode_body,
    encode_frame,
)

from tests.helpers import Agent, AgentFactory, Owner
from tests.helpers.servers import LoopbackServer
from tests.helpers.tlsbytes import client_hello

IO_TIMEOUT = 15.0
B32 = "abcdefghijklmnopqrstuvwxyz234567"


# ---- helpers -----------------------------------------------------------------------------------


def new_token(kind: tokens.TokenKind) -> str:
    return tokens.Token(kind, os.urandom(tokens.PAYLOAD_BYTES)).encode()


def flip(text: str, index: int) -> str:
    """``text`` with one base32 character replaced by another base32 character."""
    old = text[index]
    new = B32[(B32.index(old) + 1) % len(B32)]
    index %= len(text)
    return text[:index] + new + text[index + 1 :]


def secret_part(token: str) -> str:
    return token.split("-", 1)[1]


def the_vm(owner: Owner) -> dict[str, Any]:
    """The single VM row of `imprint list --json`."""
    rows: list[dict[str, Any]] = owner.json("list")["vms"]  # type: ignore[assignment]
    assert len(rows) == 1, rows
    return rows[0]


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting gets an immediate refusal, and nobody else can
    take the port while the test uses it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def one_shot_server(serve: Callable[[socket.socket], None]) -> LoopbackServer:
    """A loopback TCP server that hands its first connection to ``serve`` (the garbage servers:
    any error of theirs, a hang-up included, fails the test)."""
    return LoopbackServer(serve, connections=1, io_timeout=IO_TIMEOUT, accept_timeout=IO_TIMEOUT,
                          hangup_is_error=True, name="garbage-server")


def drain(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closing)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def half_close(sock: socket.socket) -> None:
    """FIN toward the peer, keeping the TLS object (SSLSocket.shutdown would drop it)."""
    socket.socket.shutdown(sock, socket.SHUT_WR)


def tls_connect(agent: Agent) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT)
    return tls.owner_bind_context().wrap_socket(raw)


def alert_after(agent: Agent, payload: bytes) -> Alert | None:
    """Send ``payload`` inside a genuine TLS 1.3 connection; the agent's Alert, or None if it
    closed without one."""
    with tls_connect(agent) as sock:
        sock.sendall(payload)
        reply = drain(sock)
    if not reply:
        return None
    frames = FrameBuffer()
    frames.feed(reply)
    body = frames.next_body()
    assert body is not None, reply
    message = decode_body(body)
    assert isinstance(message, Alert), message
    return message


def owner_hello(token_id: bytes, seen_cert_sha256: bytes, mode: int = WireMode.SHARED) -> OwnerHello:
    key = crypto.PrivateKey.generate()
    return OwnerHello(mode=mode, token_id=token_id, owner_nonce=os.urandom(32),
                      owner_cert=crypto.certificate_der(key.self_signed_certificate("x")),
                      seen_server_cert_sha256=seen_cert_sha256)


# ---- (a) the CLI -------------------------------------------------------------------------------


VM_TOKEN_FAULTS: list[tuple[str, Callable[[str], str], str]] = [
    ("corrupt", lambda t: flip(t, -7), "check digits do not match"),
    ("truncated", lambda t: t[:-5], "base32 characters where 58 are expected"),
    ("oversized", lambda t: t + "a" * 100, "token is too long"),
    ("shared-token", lambda t: new_token(tokens.TokenKind.SHARED), "expected a vm token, got a shared token"),
    ("owner-token", lambda t: new_token(tokens.TokenKind.NOSECRET), "expected a vm token, got a nosecret token"),
    ("unknown-version", lambda t: t.replace("imprint1v-", "imprint2v-"), "token version 2 is not supported"),
    ("unknown-kind", lambda t: t.replace("imprint1v-", "imprint1x-"), "token kind 'x' is unknown"),
    ("not-base32", lambda t: t[:-3] + "189", "token is malformed"),
]


@pytest.mark.parametrize(("fault", "mutate", "message"), VM_TOKEN_FAULTS, ids=[f[0] for f in VM_TOKEN_FAULTS])
def test_bad_vm_token_is_usage_error_naming_the_fault_without_echo(
    owner: Owner, fault: str, mutate: Callable[[str], str], message: str
) -> None:
    owner.token("web1", "nosecret")
    bad = mutate(new_token(tokens.TokenKind.VM))
    with closed_port() as port:  # were the token accepted, the CLI would report exit 4, not 2
        result = owner.run("bind", "web1", "--address", f"127.0.0.1:{port}", "--vm-token", bad, "--json",
                           check=2)
    assert "--vm-token" in result.stderr and message in result.stderr, result.stderr
    assert '"kind": "UsageError"' in result.stdout
    output = result.stdout + result.stderr
    assert bad not in output
    assert secret_part(bad)[:20] not in output  # not even a recognisable piece of it
    assert the_vm(owner)["state"] == "unbound"


def test_vm_token_for_a_shared_mode_vm_is_usage_error(owner: Owner) -> None:
    owner.token("web1", "shared")
    vm_token = new_token(tokens.TokenKind.VM)
    result = owner.run("bind", "web1", "--address", "127.0.0.1:1", "--vm-token", vm_token, check=2)
    assert "shared-secret mode: --vm-token does not apply" in result.stderr
    assert secret_part(vm_token) not in result.stderr


def test_unknown_vm_is_usage_error(owner: Owner) -> None:
    result = owner.run("bind", "nosuch", "--address", "127.0.0.1:1", check=2)
    assert "unknown VM 'nosuch'" in result.stderr


def test_closed_port_is_unreachable(owner: Owner) -> None:
    owner.token("web1", "shared")
    with closed_port() as port:
        result = owner.run("bind", "web1", "--address", f"127.0.0.1:{port}", check=4)
    assert "cannot reach the agent" in result.stderr and "refused" in result.stderr, result.stderr


def test_silent_listener_times_out_within_the_owner_deadline(owner: Owner) -> None:
    """The kernel completes the TCP handshake for a listening socket; nobody ever answers the
    ClientHello. The CLI must give up at its TLS handshake timeout with exit 4. The timeout is
    the production one's variable (IMPRINT_OWNER_CONNECT_SECONDS, 10 s by default) set short,
    so the test proves the deadline is kept without waiting the production 10 s out."""
    owner.token("web1", "shared")
    connect_seconds = 2.0
    env = {**os.environ, "IMPRINT_OWNER_CONNECT_SECONDS": str(connect_seconds)}
    silent = socket.create_server(("127.0.0.1", 0))  # listens; never accepts, never answers
    try:
        started = time.monotonic()
        result = owner.run("bind", "web1", "--address", f"127.0.0.1:{silent.getsockname()[1]}", check=4, env=env)
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert "TLS 1.3 handshake" in result.stderr and "timed out" in result.stderr, result.stderr
    # At least the deadline (it is not cut short), and well under the production one, which
    # a CLI that ignored the variable would wait out.
    assert connect_seconds - 0.5 <= elapsed < owner_bind.CONNECT_TIMEOUT, elapsed
    assert the_vm(owner)["state"] == "unbound"


GARBAGE_SERVERS: list[tuple[str, bytes]] = [
    ("http", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    ("ssh", b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"),
    ("random", random.Random(7).randbytes(2048)),
    ("tls-shaped", b"\x16\x03\x03\x00\x40" + random.Random(8).randbytes(64)),
]


@pytest.mark.parametrize(("kind", "garbage"), GARBAGE_SERVERS, ids=[g[0] for g in GARBAGE_SERVERS])
def test_plain_tcp_server_sending_garbage_fails_clearly(owner: Owner, kind: str, garbage: bytes) -> None:
    def serve(conn: socket.socket) -> None:
        assert conn.recv(4096)[:1] == b"\x16"  # the CLI's ClientHello arrived
        # The CLI may refuse on the first bytes and close before the rest is sent: then this
        # side's send or shutdown fails (EPIPE, ENOTCONN), which is the CLI being quick, not wrong.
        with contextlib.suppress(OSError):
            conn.sendall(garbage)
            conn.shutdown(socket.SHUT_WR)
            drain(conn)  # close only after the client did: no reset, the CLI reads all the garbage

    owner.token("web1", "shared")
    with one_shot_server(serve) as server:
        result = owner.run("bind", "web1", "--address", server.address, check=None)
    assert server.connections == 1  # the CLI did reach the garbage server
    assert result.returncode in (3, 4), result
    assert "TLS 1.3 handshake" in result.stderr and "is an imprint agent listening?" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert the_vm(owner)["state"] == "unbound"


# ---- (b) the agent's boot channel ------------------------------------------------------------


CMDLINE_FAULTS: list[tuple[str, Callable[[str], str], str]] = [
    ("flipped-char", lambda k: "imprint.token=" + flip(k, -9), "check digits do not match"),
    ("truncated", lambda k: "imprint.token=" + k[:-6], "base32 characters where 58 are expected"),
    ("oversized", lambda k: "imprint.token=" + k + "q" * 80, "token is too long"),
    ("unknown-version", lambda k: "imprint.token=" + k.replace("imprint1s-", "imprint9s-"),
     "token version 9 is not supported"),
    ("vm-token", lambda k: "imprint.token=" + new_token(tokens.TokenKind.VM),
     "carries a VM token where the owner's token belongs"),
    ("two-values", lambda k: f"imprint.token={k} quiet imprint.token={new_token(tokens.TokenKind.SHARED)}",
     "imprint.token is given 2 times with different values"),
]


@pytest.mark.parametrize(("fault", "parameter", "message"), CMDLINE_FAULTS, ids=[f[0] for f in CMDLINE_FAULTS])
def test_corrupt_cmdline_token_stops_the_agent_naming_channel_and_fault(
    agents: AgentFactory, fault: str, parameter: Callable[[str], str], message: str
) -> None:
    k = new_token(tokens.TokenKind.SHARED)
    root = agents.make_root(None)
    (root / "proc" / "cmdline").write_text(f"console=ttyS0 root=LABEL=root ro {parameter(k)}\n")
    agent = agents.start(root, expect_ready=False)
    assert agent.proc.wait(timeout=30) == 1, agent.log()
    log = agent.log()
    assert "boot channel cmdline is broken" in log and message in log, log
    assert "listening on" not in log
    assert secret_part(k)[:20] not in log  # K, even corrupted, is never logged
    assert not (root / "var/lib/imprint/vm.key").exists()  # failed before making any identity


def test_no_token_with_token_wait_gives_up_saying_it_waited(agents: AgentFactory) -> None:
    agent = agents.start(agents.make_root(None), "--token-wait", "1", expect_ready=False)
    assert agent.proc.wait(timeout=30) == 1, agent.log()
    log = agent.log()
    assert "waiting for a token on: cmdline" in log, log
    assert "no token on any boot channel after 1 s" in log, log
    assert "listening on" not in log


def _agent_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "imprint.guest", "run", "--root", str(root), "--listen", "127.0.0.1:0",
            "--announce-interval", "3600"]


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name, value in changes.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env


def test_agent_failure_without_notify_socket_is_explained_without_traceback(agents: AgentFactory) -> None:
    root = agents.make_root("imprint1s-tooshort")
    result = subprocess.run(_agent_cmd(root), env=_env(NOTIFY_SOCKET=None), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "boot channel cmdline is broken" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_agent_failure_with_stale_notify_socket_is_explained_without_traceback(
    agents: AgentFactory, tmp_path: Path
) -> None:
    root = agents.make_root("imprint1s-tooshort")
    stale = str(tmp_path / "gone.sock")
    result = subprocess.run(_agent_cmd(root), env=_env(NOTIFY_SOCKET=stale), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "boot channel cmdline is broken" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_agent_with_stale_notify_socket_still_serves(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    """sd_notify is best effort (libsystemd's returns an error, never aborts): an agent whose
    NOTIFY_SOCKET is gone (socket removed, namespace without it) must still serve its owner."""
    root = agents.make_root(owner.token("web1", "shared"))
    proc = subprocess.Popen(_agent_cmd(root), env=_env(NOTIFY_SOCKET=str(tmp_path / "gone.sock")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        port = 0
        while not port:
            line = lines.get(timeout=30)
            assert line is not None, "the agent exited before listening"
            if "listening on 127.0.0.1:" in line:
                port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
        owner.run("bind", "web1", "--address", f"127.0.0.1:{port}")
    finally:
        proc.kill()
        proc.wait(timeout=20)
        reader.join(20)
        assert proc.stderr is not None
        proc.stderr.close()


# ---- (c) garbage, slowloris, and a wrong token at a waiting agent ----------------------------------


def test_garbage_and_slowloris_do_not_keep_the_owner_out(agents: AgentFactory, owner: Owner) -> None:
    token_id = tokens.parse(token_text := owner.token("web1", "shared")).token_id
    agent = agents.start(agents.make_root(token_text))
    with tls_connect(agent) as probe:
        agent_cert_sha = crypto.sha256(tls.peer_certificate(probe))
        half_close(probe)
        drain(probe)
    rng = random.Random(2024)

    # -- not TLS at all: each is sent, then the write side is closed; the agent must refuse and close.
    not_tls = [rng.randbytes(n) for n in (16, 512, 4096, 20000)]
    not_tls += [b"GET / HTTP/1.1\r\nHost: vm\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00" * 64,
                b"\x16\x03\x01\xff\xff" + rng.randbytes(100), b""]
    for payload in not_tls:
        with socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT) as sock:
            if payload:
                sock.sendall(payload)
            half_close(sock)
            drain(sock)  # the agent closes after logging the refusal

    # -- a TLS 1.2-only client: refused by the TLS 1.3-only agent.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw)

    # -- genuine TLS 1.3, then protocol garbage: each gets an Alert naming the fault.
    hello = encode_body(owner_hello(token_id, agent_cert_sha))
    framed: list[tuple[bytes, AlertCode]] = [
        (b"\xff\xff" + rng.randbytes(200), AlertCode.MALFORMED),  # frame announces 65535 bytes
        (b"\xff\xff", AlertCode.MALFORMED),
        ((MAX_BODY + 1).to_bytes(2, "big"), AlertCode.MALFORMED),
        (_frame(bytes([2, 1]) + hello[2:]), AlertCode.VERSION_UNSUPPORTED),  # protocol version 2
        (_frame(bytes([0xFF, 1]) + hello[2:]), AlertCode.VERSION_UNSUPPORTED),
        (_frame(hello[:60]), AlertCode.MALFORMED),  # OwnerHello truncated inside its frame
        (_frame(hello + b"\x00"), AlertCode.MALFORMED),  # trailing byte
        (_frame(bytes([1, 9])), AlertCode.MALFORMED),  # unknown message type
        (_frame(b"\x01"), AlertCode.MALFORMED),  # shorter than the header
        (encode_frame(OwnerProof(signature=bytes(64), mac=bytes(32))), AlertCode.UNEXPECTED_MESSAGE),
        (encode_frame(owner_hello(token_id, agent_cert_sha, mode=WireMode.NOSECRET)), AlertCode.MODE_MISMATCH),
    ]
    for payload, code in framed:
        alert = alert_after(agent, payload)
        assert alert is not None and alert.code == code, (payload[:8], alert)
    # A frame cut short by the end of the stream: nothing to answer, the agent just refuses.
    with tls_connect(agent) as sock:
        sock.sendall(b"\x00\x50" + hello[:10])
        half_close(sock)
        assert drain(sock) == b""

    # -- slowloris: half a ClientHello each, then held open.
    partial = client_hello()[:40]
    slow: list[socket.socket] = []
    try:
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT)
            slow.append(sock)
            sock.sendall(partial)

        bound = owner.json("bind", "web1", "--address", agent.address)  # while they are held
        assert isinstance(bound["status"], dict) and bound["status"]["state"] == "bound"

        readable, _, _ = select.select(slow, [], [], 0)
        assert not readable, "the agent gave up on the slow connections already: they were not held during the bind"
    finally:
        for sock in slow:
            sock.close()

    assert agent.proc.poll() is None, agent.log()
    assert owner.json("status", "web1")["state"] == "bound"
    log = agent.log()
    assert log.count("TLS handshake with 127.0.0.1:") >= len(not_tls) + 1, log
    for fragment in ("frame announces 65535 bytes", "peer speaks protocol version 2",
                     "peer speaks protocol version 255", "OwnerHello truncated", "trailing bytes",
                     "unknown message type 9", "shorter than its header", "UNEXPECTED_MESSAGE",
                     "MODE_MISMATCH", "closed the connection mid-exchange"):
        assert fragment in log, fragment
    assert "internal error" not in log and "Traceback" not in log, log


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


def test_wrong_token_id_gets_wrong_token_alert_and_agent_keeps_listening(
    agents: AgentFactory, owner: Owner
) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    other_k = tokens.parse(new_token(tokens.TokenKind.SHARED))
    key = crypto.PrivateKey.generate()
    with tls_connect(agent) as sock:
        session = OwnerExchange(owner_key=key, owner_cert=crypto.certificate_der(key.self_signed_certificate("o")),
                                token=other_k, seen_server_cert=tls.peer_certificate(sock))
        sock.sendall(session.initiate())
        reply = drain(sock)
    frames = FrameBuffer()
    frames.feed(reply)
    body = frames.next_body()
    assert body is not None
    alert = decode_body(body)
    assert isinstance(alert, Alert) and alert.code == AlertCode.WRONG_TOKEN, alert
    assert frames.next_body() is None  # nothing after the alert
    assert "WRONG_TOKEN" in agent.log()
    assert agent.proc.poll() is None
    assert agent.state().get("bound") is not True

    owner.run("bind", "web1", "--address", agent.address)  # the agent still listens for its owner
