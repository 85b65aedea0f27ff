"""Bind latency on loopback against a bare mutual TLS 1.3 handshake plus one request.

    .venv/bin/python benchmarks/bench_bind.py [--iterations 20] [--warmup 2] [--profile] [--tmpdir DIR]

Both sides are measured in this process, so interpreter start-up is excluded:

bind      imprint.owner.bind.bind(home, store, vm, address, vm_token) against a real, freshly
          started `imprint-agent` (one per iteration: tokens are single-use). It covers the TCP
          connect and server-authenticated TLS 1.3 handshake, the key exchange (two round trips),
          the owner's pending pin in SQLite, one GET /v1/status on the same connection (now the
          control channel, docs/protocol.md 4.4), and the confirmation with its audit record in
          one transaction. Agent start-up and token issue are outside the timed region.
baseline  a fresh SSLContext (imprint.tls.owner_pinned_context: TLS 1.3 only, Ed25519 certificates,
          CERT_REQUIRED against one pinned certificate), a fresh requests.Session with a pinned
          adapter like imprint.owner.client's, one TCP connect + mutual TLS 1.3 handshake + one GET
          of a small JSON body from a server subprocess using imprint.tls.agent_pinned_context and
          http.server, like the agent's control channel. The server stays up between iterations.

Iterations interleave baseline, shared bind and no-secrets bind. The bind is split into the
exchange (connect, TLS, exchange, pending pin), the status call on the bind's connection and
the rest (owner key load, SQLite reads and writes, audit) by timing wrappers around
imprint.owner.bind._exchange (which makes the status call) and the ask_on it calls.

Goal (issue): median bind <= 2x median baseline, in both modes. The goal is judged against the
baseline as the issue measured it (requests over a pinned adapter); a third row times the same
request through imprint's own client (owner/client.py: ssl and sockets, no requests), which is
leaner, and the ratio against it is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import _harness as h
import imprint.owner.bind as bind_module
import requests
from imprint import crypto, tls
from imprint.owner.client import PinnedClient
from imprint.owner.home import OwnerHome
from imprint.owner.store import Store
from requests.adapters import HTTPAdapter

RATIO_GOAL = 2.0
MODES = ("shared", "nosecret")
PHASES = ("exchange", "status", "other")


# ---- baseline: a bare mutual-TLS HTTP server in its own process ------------------------------


class _BaselineHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # About the size of the agent's /v1/status answer.
    body = json.dumps({"state": "bound", "mode": "shared", "agent_version": "0.1.0", "uptime_seconds": 1.0,
                       "vm_fingerprint": "SHA256:" + "A" * 43, "owner_fingerprint": "SHA256:" + "B" * 43,
                       "bound_at": 1.0}, sort_keys=True).encode()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_baseline(directory: Path, nodelay: bool) -> int:
    """The baseline server: agent-like accept loop, a thread per connection, mutual TLS 1.3.

    With ``nodelay`` accepted sockets get TCP_NODELAY, as any tuned HTTP server does: then the
    response's two writes (headers, body) and TLS 1.3's session tickets cannot meet the client's
    delayed ACK (Nagle), a 40 ms stall on Linux loopback that has nothing to do with TLS.
    """
    from imprint.guest.notify import notify

    context = tls.agent_pinned_context(str(directory / "server.crt"), str(directory / "server.key"),
                                       tls.PinnedCert.from_pem((directory / "client.crt").read_text()))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(ssl.SSLError, OSError), \
                context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as sock:
            sock.settimeout(10.0)
            sock.do_handshake()
            _BaselineHandler(sock, ("127.0.0.1", 0), None)  # type: ignore[arg-type]

    notify(f"READY=1\nSTATUS=listening on 127.0.0.1:{listener.getsockname()[1]}")
    while True:
        conn, _ = listener.accept()
        if nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class PinnedAdapter(HTTPAdapter):
    """The baseline's transport, as imprint's pinned client was until it dropped requests: the
    context's one trust anchor is the pin, no hostname check, urllib3 compares the certificate's
    fingerprint."""

    def __init__(self, context: ssl.SSLContext, pin: tls.PinnedCert) -> None:
        self._context = context
        self._fingerprint = pin.der_sha256
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(ssl_context=self._context, assert_hostname=False, assert_fingerprint=self._fingerprint)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[no-untyped-call]


class Baseline:
    def __init__(self, home: OwnerHome, work: Path, logs: Path, *, nodelay: bool, stdlib: bool = False) -> None:
        directory = work / f"baseline-{'nodelay' if nodelay else 'nagle'}{'-stdlib' if stdlib else ''}"
        self.stdlib = stdlib
        directory.mkdir()
        key = crypto.PrivateKey.generate()
        (directory / "server.key").write_bytes(key.to_pem())
        self.server_pem = key.self_signed_certificate("baseline-server").decode()
        (directory / "server.crt").write_text(self.server_pem)
        shutil.copy(home.cert_file, directory / "client.crt")
        self.server_pin = tls.PinnedCert.from_pem(self.server_pem)
        self.pin_file = directory / "pin.crt"
        self.pin_file.write_text(self.server_pem)
        self.home = home
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(directory)]
        if nodelay:
            cmd.append("--nodelay")
        self.proc, _, message = h.start_notifying(cmd, logs / f"{directory.name}.log", dict(os.environ),
                                                   h.READY_TIMEOUT)
        self.url = f"https://{message.rsplit('listening on ', 1)[1].strip()}/v1/status"

    def request(self) -> dict[str, Any]:
        """The timed unit: fresh context, fresh session, connect, mutual TLS 1.3, one GET."""
        if self.stdlib:  # imprint's own pinned client: ssl and sockets, no requests
            address = self.url.split("/")[2]
            return PinnedClient(self.home, "baseline", self.server_pin, address).get("/v1/status")
        context = tls.owner_pinned_context(str(self.home.cert_file), str(self.home.key_file), self.server_pin)
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.pin_file)
        session.mount("https://", PinnedAdapter(context, self.server_pin))
        try:
            response = session.get(self.url, timeout=10)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data
        finally:
            session.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---- bind ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def phase_timer(phases: dict[str, float]) -> Iterator[None]:
    """Time bind's exchange and pinned status call by wrapping the module's functions."""
    originals: dict[str, Callable[..., Any]] = {}

    def wrap(attr: str, phase: str) -> None:
        original: Callable[..., Any] | None = getattr(bind_module, attr, None)
        if original is None:
            return
        originals[attr] = original

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - started

        setattr(bind_module, attr, timed)

    wrap("_exchange", "exchange")
    wrap("ask_on", "status")  # called inside _exchange, on its connection
    try:
        yield
    finally:
        for attr, original in originals.items():
            setattr(bind_module, attr, original)
        phases["exchange"] = phases.get("exchange", 0.0) - phases.get("status", 0.0)


# What a bind would cost with small changes, patched at run time (imprint's code is not changed).
# Agent side, by this launcher, flags in $IMPRINT_BENCH_WHAT_IF: "nodelay" sets TCP_NODELAY on
# accepted sockets, "no-tickets" sets num_tickets = 0 on server contexts (OP_NO_TICKET alone does
# not stop TLS 1.3 session tickets), "preload" imports the exchange and control modules before
# the agent runs (an agent could do that in a thread after READY). Owner side, in this process:
# "owner-nodelay" sets TCP_NODELAY on the exchange socket (urllib3 already does on the status one).
WHAT_IF_LAUNCHER = """
import os, runpy, socket, ssl
flags = set(os.environ.get("IMPRINT_BENCH_WHAT_IF", "").split(","))
if "nodelay" in flags:
    _accept = socket.socket.accept
    def accept(self):
        conn, addr = _accept(self)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr
    socket.socket.accept = accept
if "no-tickets" in flags:
    import imprint.tls
    _base = imprint.tls._base
    def base(purpose):
        ctx = _base(purpose)
        if purpose == ssl.PROTOCOL_TLS_SERVER:
            ctx.num_tickets = 0
        return ctx
    imprint.tls._base = base
if "preload" in flags:
    import imprint.crypto, imprint.protocol, imprint.guest.control
runpy.run_module("imprint.guest", run_name="__main__", alter_sys=True)
"""
WHAT_IFS = ("nodelay", "nodelay,owner-nodelay", "nodelay,owner-nodelay,no-tickets",
            "nodelay,owner-nodelay,no-tickets,preload")


@contextlib.contextmanager
def owner_nodelay(enabled: bool) -> Iterator[None]:
    """TCP_NODELAY on the sockets imprint.owner.bind opens with socket.create_connection."""
    if not enabled:
        yield
        return
    original = socket.create_connection

    def create_connection(*args: Any, **kwargs: Any) -> socket.socket:
        sock = original(*args, **kwargs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    socket.create_connection = create_connection
    try:
        yield
    finally:
        socket.create_connection = original


class Binder:
    def __init__(self, home: OwnerHome, store: Store, work: Path, logs: Path) -> None:
        self.home, self.store, self.work, self.logs = home, store, work, logs
        self.env = h.agent_env(bytecode_cache=work / "pycache")
        self.count = 0

    def prepare(self, mode: str, what_if: str = "", *python_flags: str) -> tuple[str, h.Agent, str | None]:
        """Untimed: a token, a fresh agent root, the agent started and READY, its VM token."""
        self.count += 1
        vm = f"{mode}-{self.count}"
        root = h.make_root(self.work, vm, h.issue_token(self.home, self.store, vm, mode))
        if what_if:
            env = dict(self.env, IMPRINT_BENCH_WHAT_IF=what_if)
            agent = h.start_agent(root, self.logs, env, python_flags=python_flags, launcher=("-c", WHAT_IF_LAUNCHER))
        else:
            agent = h.start_agent(root, self.logs, self.env, python_flags=python_flags)
        return vm, agent, agent.vm_token() if mode == "nosecret" else None

    def bind(self, mode: str, what_if: str = "", profiler: cProfile.Profile | None = None) -> dict[str, float]:
        vm, agent, vm_token = self.prepare(mode, what_if)
        phases: dict[str, float] = {}
        try:
            gc.collect()
            with phase_timer(phases), owner_nodelay("owner-nodelay" in what_if.split(",")):
                if profiler is not None:
                    profiler.enable()
                started = time.perf_counter()
                result = bind_module.bind(self.home, self.store, vm, agent.address, vm_token)
                total = time.perf_counter() - started
                if profiler is not None:
                    profiler.disable()
        finally:
            agent.kill()
        assert result.status.get("state") == "bound", result.status
        phases["total"] = total
        phases["other"] = total - phases.get("exchange", 0.0) - phases.get("status", 0.0)
        return phases

    def agent_imports_during_bind(self, mode: str) -> dict[str, float]:
        """Imports the agent logs after its "listening on" line (-X importtime, ms): imprint.protocol
        just before READY, the rest in its preparation thread after READY, none left for the bind."""
        vm, agent, vm_token = self.prepare(mode, "", "-X", "importtime")
        try:
            bind_module.bind(self.home, self.store, vm, agent.address, vm_token)
        finally:
            agent.kill()
        after_ready = agent.log_path.read_text().split("imprint-agent: listening on", 1)[1]
        out: dict[str, float] = {}
        for line in after_ready.splitlines():
            if line.startswith("import time:") and "cumulative" not in line:
                _, cumulative, name = line[len("import time:"):].split("|")
                if not name.startswith("  "):
                    out[name.strip()] = round(int(cumulative) / 1000, 1)
        return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def rounded(stats: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1000, 2) if k != "n" else int(v) for k, v in stats.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20, help="measured iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured iterations first (default 2)")
    parser.add_argument("--what-if", action="store_true",
                        help="also bind with run-time patches: TCP_NODELAY (agent, owner), no TLS 1.3 session "
                             "tickets, exchange and control modules preloaded in the agent")
    parser.add_argument("--profile", action="store_true", help="also cProfile one bind per mode (owner side)")
    parser.add_argument("--tmpdir", type=Path, help="where agent roots and the owner home go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--serve-baseline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--nodelay", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline, args.nodelay)

    info = h.machine()  # before the run: the load average is other work's, not ours
    base = Path(tempfile.mkdtemp(prefix="imprint-bench-bind-", dir=args.tmpdir))
    logs = base / "logs"
    logs.mkdir()
    baselines: dict[str, Baseline] = {}
    try:
        home = OwnerHome(base / "owner")
        home.init()
        store = home.store()
        baselines["baseline"] = Baseline(home, base, logs, nodelay=True)
        baselines["baseline-nagle"] = Baseline(home, base, logs, nodelay=False)
        baselines["baseline-stdlib"] = Baseline(home, base, logs, nodelay=True, stdlib=True)
        binder = Binder(home, store, base, logs)
        cases = [(mode, "") for mode in MODES]
        if args.what_if:
            cases += [(mode, what_if) for mode in MODES for what_if in WHAT_IFS]

        samples: dict[str, list[dict[str, float]]] = {}
        for i in range(args.warmup + args.iterations):
            results: dict[str, dict[str, float]] = {}
            for name, baseline in baselines.items():
                gc.collect()
                started = time.perf_counter()
                baseline.request()
                results[name] = {"total": time.perf_counter() - started}
            for mode, what_if in cases:
                results[f"{mode}+{what_if}" if what_if else mode] = binder.bind(mode, what_if)
            if i >= args.warmup:
                for key, value in results.items():
                    samples.setdefault(key, []).append(value)

        base_stats = h.summary([s["total"] for s in samples["baseline"]])
        nagle_stats = h.summary([s["total"] for s in samples["baseline-nagle"]])
        stdlib_stats = h.summary([s["total"] for s in samples["baseline-stdlib"]])
        out: dict[str, Any] = {"benchmark": "bind", "iterations": args.iterations, "warmup": args.warmup,
                               "goal_ratio": RATIO_GOAL, "baseline_ms": rounded(base_stats),
                               "baseline_nagle_ms": rounded(nagle_stats),
                               "baseline_stdlib_ms": rounded(stdlib_stats), "ratio_vs_stdlib_baseline": {},
                               "bind_ms": {},
                               "ratio_of_medians": {}, "ratio_of_medians_vs_nagle_baseline": {}, "verdicts": {}}

        def row(label: str, stats: dict[str, float], goal: str = "") -> list[str]:
            return [label, str(int(stats["n"])), ms(stats["median"]), ms(stats["p90"]), ms(stats["min"]),
                    ms(stats["max"]), f"{stats['median'] / base_stats['median']:.2f}",
                    f"{stats['median'] / nagle_stats['median']:.2f}", goal]

        rows = [row("baseline: mTLS 1.3 + GET, TCP_NODELAY", base_stats),
                row("baseline: same, Nagle (http.server default)", nagle_stats),
                row("baseline: same, imprint's stdlib client", stdlib_stats)]
        what_if_rows: list[list[str]] = []
        for key in samples:
            if key.startswith("baseline"):
                continue
            mode, _, what_if = key.partition("+")
            out["bind_ms"][key] = {}
            for phase in ("total", *PHASES):
                values = [s[phase] for s in samples[key] if phase in s]
                if not values:
                    continue
                stats = h.summary(values)
                out["bind_ms"][key][phase] = rounded(stats)
                if phase != "total":
                    (what_if_rows if what_if else rows).append(row(f"  {phase}", stats))
                    continue
                ratio = stats["median"] / base_stats["median"]
                if what_if:
                    what_if_rows.append(row(f"bind {mode}, agent with {what_if}", stats))
                    out["ratio_of_medians"][key] = round(ratio, 3)
                    continue
                goal = h.verdict(ratio <= RATIO_GOAL)
                rows.append(row(f"bind {mode}", stats, goal))
                out["ratio_of_medians"][key] = round(ratio, 3)
                out["ratio_of_medians_vs_nagle_baseline"][key] = round(stats["median"] / nagle_stats["median"], 3)
                out["ratio_vs_stdlib_baseline"][key] = round(stats["median"] / stdlib_stats["median"], 3)
                out["verdicts"][f"bind {mode}: median {ms(stats['median'])} ms = {ratio:.2f}x baseline "
                                f"(goal <= {RATIO_GOAL:g}x)"] = goal

        out["machine"] = info
        print(f"machine: {info['cpus']} x {info['cpu_model']}; Python {info['python']}; {info['openssl']}; "
              f"imprint {info['imprint_commit']}; load {info['loadavg_1min']}; "
              f"owner home and agent state on {info['tmpdir_fs']}")
        headers = ["case", "n", "median", "p90", "min", "max", "x base", "x nagle", "goal"]
        print(f"\nbind vs bare mutual TLS 1.3 + one GET, in-process (ms; goal: median ratio <= {RATIO_GOAL:g})")
        h.print_table(headers, rows)
        if what_if_rows:
            print("\nwhat-if: the same binds with run-time patches (imprint's code unchanged; see WHAT_IF_LAUNCHER)")
            h.print_table(headers[:-1], [r[:-1] for r in what_if_rows])

        agent_imports = {mode: binder.agent_imports_during_bind(mode) for mode in MODES}
        out["agent_imports_during_bind_ms"] = agent_imports
        print("\nagent-side imports after it logged 'listening on' (before READY, and in its preparation "
              "thread after READY; -X importtime, one run, ms):")
        for mode, found in agent_imports.items():
            print(f"  {mode}: " + (", ".join(f"{n} {v}" for n, v in found.items()) or "none"))

        if args.profile:
            for mode in MODES:
                profiler = cProfile.Profile()
                binder.bind(mode, profiler=profiler)
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
                print(f"\ncProfile, one {mode} bind, owner side, by own time:")
                lines = text.getvalue().splitlines()
                first = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
                print("\n".join(line for line in lines[first:] if line.strip()))

        print()
        for name, result in out["verdicts"].items():
            print(f"{result}  {name}")
        for key, ratio in out["ratio_vs_stdlib_baseline"].items():
            print(f"info  bind {key}: {ratio:.2f}x the stricter baseline (imprint's stdlib client, no requests)")
        store.close()
        print(json.dumps(out, sort_keys=True))
    finally:
        for baseline in baselines.values():
            baseline.close()
        h.end_work_dir(base, keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
