"""imprint-agent: the guest side.

    imprint-agent run [--root DIR] [--listen HOST:PORT] [--console PATH] [--channels LIST]

Boot path order matters under slow emulation: find the token first (cheap imports only), then
load or create the key, listen, and only then import the exchange and crypto code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from imprint import lastresort
from imprint.guest import log as agent_log
from imprint.guest.distro import Distro
from imprint.guest.notify import notify_status
from imprint.guest.state import AgentState, BindRecord, StateError
from imprint.ports import AGENT_PORT
from imprint.tokens import Mode, Token

# imprint.channels (every channel module, mtools' and the ISO reader's code) is imported only
# where the agent looks at its boot channels: a bound restart never does, so it never loads them.
if TYPE_CHECKING:
    from imprint.channels import Found
    from imprint.guest.dialer import OwnerDialer
    from imprint.guest.server import AgentServer
    from imprint.owneraddr import OwnerAddress

log = agent_log.get("imprint.agent")


class AgentFailure(Exception):
    """A fatal, explained condition: the agent exits 1 with this message."""


def parse_listen(value: str) -> tuple[str, int] | None:
    if value == "none":
        return None  # no inbound port: the agent only dials its owner
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(AGENT_PORT)
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port '{port}' is not a number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range")
    return host, number


class _HelpFormatter(argparse.HelpFormatter):
    """Names the channels only when help is shown (the parser is built at every start)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text is not None and "{channels}" in text:
            from imprint.channels import channel_names

            text = text.replace("{channels}", ",".join(channel_names()))
        return text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imprint-agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="find the token, bind to the owner, serve the pinned channel",
                         formatter_class=_HelpFormatter)
    run.add_argument("--root", type=Path, default=Path("/"), help="prefix for every guest path (default /)")
    run.add_argument("--listen", type=parse_listen, default=("0.0.0.0", AGENT_PORT),
                     help=f"HOST:PORT to listen on (default 0.0.0.0:{AGENT_PORT}), or 'none' for no inbound "
                          "port (the agent then only dials the owner addresses its boot channel gave)")
    run.add_argument("--console", type=Path, help="where to print the VM token (default <root>/dev/console)")
    run.add_argument("--channels",
                     help="comma-separated channels to search (default all: {channels})")
    run.add_argument("--token-wait", type=float, default=None,
                     help="seconds to wait for a token before giving up (default: wait forever)")
    run.add_argument("--announce-interval", type=float, default=15.0,
                     help="seconds between repeats of the VM token line on the console until bound")
    run.add_argument("-v", "--verbose", action="store_true")
    return parser


def _wait_for_token(paths: Distro, only: list[str] | None, wait: float | None,
                    skip: set[str] | None = None) -> Found:
    from imprint.channels import channel_names, find_token

    pause = threading.Event()
    started = time.monotonic()
    next_report = started
    while True:
        found = find_token(paths, only, consumed=frozenset(skip or ()))
        if found is not None:
            return found
        now = time.monotonic()
        if wait is not None and now - started >= wait:
            raise AgentFailure(f"no token on any boot channel after {wait:.0f} s "
                               f"(searched: {', '.join(only or channel_names())})")
        if now >= next_report:
            searched = ", ".join(only or channel_names())
            log.info("waiting for a token on: %s", searched)
            notify_status(f"waiting for a token on: {searched}")
            next_report = now + 30.0
        pause.wait(1.0)  # channels can appear late (hot-plugged disk, metadata service coming up)


class _Announcer:
    """Writes the VM token line to the console until bound, so a late reader still sees it.

    The only writer of the announcement marker (the agent's log defangs it): the line is framed
    by newlines and written in one write(), so it starts at column 0 even after a partial line
    of another writer (a kernel message, a systemd status) and nothing else shares its line.
    A write cut short (a full serial buffer) leaves a line the extractor skips; the next repeat
    is whole.
    """

    def __init__(self, consoles: list[Path], line: str, interval: float) -> None:
        self._consoles = consoles
        self._line = line
        self._interval = interval
        self.bound = threading.Event()

    def start(self) -> None:
        """The first line is written before returning, so READY implies the token is published."""
        self._write()
        threading.Thread(target=self._repeat, daemon=True).start()

    def _repeat(self) -> None:
        while not self.bound.wait(self._interval):
            self._write()

    def _write(self) -> None:
        for console in self._consoles:
            try:
                # O_NONBLOCK: a serial port nobody drains must not stall the agent.
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY | os.O_NONBLOCK
                fd = os.open(console, flags, 0o644)
                try:
                    os.write(fd, b"\n" + self._line.encode() + b"\n")
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("cannot write the VM token to %s: %s", console, exc.strerror)


def _was_released(state: AgentState) -> bool:
    """Whether an owner released this VM (its journal says so): then a consumed token on the
    channel is the old one, and the agent waits for a new one instead of failing."""
    from imprint.guest import journal

    try:
        return any(entry.event == "released" for entry in journal.read(state.journal_file))
    except journal.JournalBroken as exc:
        raise AgentFailure(f"the VM's journal is broken, so whether it was released is unknown: {exc}") from None


def _owner_addresses(found: Found | None, record: BindRecord) -> tuple[OwnerAddress, ...]:
    """Where to dial: what the boot channel gave with the token, or, once bound, what the bind
    recorded (a bound restart reads no channel)."""
    if found is not None:
        return found.owners
    if not record.owner_addresses:
        return ()
    from imprint.owneraddr import OwnerAddressError, parse_list

    try:
        return parse_list(",".join(record.owner_addresses))
    except OwnerAddressError as exc:
        raise AgentFailure(f"the bind record's owner addresses are corrupt: {exc}") from None


def _preload(server: AgentServer) -> None:
    """After READY: import what the pinned channel needs and prepare for the bind, so the owner
    does not wait for either."""
    import imprint.crypto
    import imprint.guest.control  # noqa: F401

    server.prepare()


def run(args: argparse.Namespace) -> int:
    paths = Distro(args.root)
    state = AgentState(paths.state_dir)
    try:
        record = state.load_record()
    except StateError as exc:
        raise AgentFailure(str(exc)) from None
    only = [c.strip() for c in args.channels.split(",")] if args.channels else None
    if only:
        from imprint.channels import channel_names

        unknown = sorted(set(only) - set(channel_names()))
        if unknown:
            raise AgentFailure(f"unknown channel(s): {', '.join(unknown)}; known: {', '.join(channel_names())}")

    found: Found | None = None
    token: Token | None = None
    if record.bound:
        log.info("already bound to owner %s; not looking for a token", record.owner_fingerprint)
    else:
        from imprint.channels import ChannelBroken

        # Released by its owner: the old tokens stay on their channels until the site changes
        # them, and count as absent (the agent waits for a new one, and says so).
        released = bool(record.consumed_tokens) and _was_released(state)
        if released:
            log.info("released by its owner: waiting for a new token (the consumed ones are ignored)")
        try:
            found = _wait_for_token(paths, only, args.token_wait,
                                    skip=set(record.consumed_tokens) if released else None)
        except ChannelBroken as exc:
            raise AgentFailure(str(exc)) from None
        token = found.token
        log.info("found a %s-mode token (id %s) on %s", token.mode.value, token.token_id.hex(),
                 " and ".join(found.channels))
        if token.token_id.hex() in record.consumed_tokens:
            raise AgentFailure(f"token {token.token_id.hex()} on {found.channel} was already consumed by a bind")

    try:
        state.ensure_identity()
    except (StateError, OSError) as exc:
        raise AgentFailure(f"cannot prepare the VM key: {exc}") from None

    owners = _owner_addresses(found, record)
    listener: socket.socket | None = None
    where = "no inbound port"
    if args.listen is not None:
        host, port = args.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listener = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise AgentFailure(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        where = f"listening on {host}:{listener.getsockname()[1]}"
    elif not owners:
        raise AgentFailure("--listen none, and no owner address to dial (the boot channel gave none, "
                           "and the bind record has none): nothing could ever reach this agent")
    if owners:
        where += f", dialling the owner at {', '.join(str(a) for a in owners)}"

    announcer: _Announcer | None = None
    if found is not None and found.token.mode is Mode.NOSECRET:
        from imprint import crypto, tokens
        from imprint.channels import publish_vm_token

        try:
            vm_spki = crypto.certificate_spki(state.cert_file.read_bytes())
        except (crypto.CryptoError, OSError) as exc:
            raise AgentFailure(f"cannot load the VM certificate {state.cert_file}: {exc}") from None
        vm_token = tokens.Token(tokens.TokenKind.VM, crypto.sha256(vm_spki))
        line = tokens.vm_token_line(vm_token, answers=found.token)
        log.info("VM key %s; VM token for the owner: %s", crypto.fingerprint(vm_spki), vm_token.encode())
        try:
            written = publish_vm_token(paths, found, line)
        except (OSError, ValueError) as exc:
            raise AgentFailure(f"cannot write the VM token to a reverse channel: {exc}") from None
        if written:
            log.info("VM token written to: %s", ", ".join(written))
        consoles = [args.console or paths.console]
        consoles += [port for port in paths.serial_ports if port.exists() and port.resolve() != consoles[0].resolve()]
        announcer = _Announcer(consoles, line, args.announce_interval)

    def _on_bound() -> None:
        if announcer is not None:
            announcer.bound.set()
        if found is not None and found.token.mode is Mode.SHARED:
            from imprint.channels import consume_token

            try:
                wiped = consume_token(paths, found)
            except (OSError, ValueError) as exc:
                log.error("bound, but could not wipe K from the boot channel: %s", exc)
                return
            if wiped:
                log.info("K wiped from: %s", ", ".join(wiped))

    from imprint.guest.server import AgentServer

    try:
        server = AgentServer(state, listener, token=token, record=record, paths=paths, on_bound=_on_bound,
                             owner_addresses=[str(a) for a in owners])
    except (OSError, ValueError) as exc:
        raise AgentFailure(f"cannot load the VM key and certificate from {state.dir}: {exc}") from None

    dialler: OwnerDialer | None = None
    if owners:
        from imprint.guest.dialer import OwnerDialer

        dialler = OwnerDialer(server, owners)

    def _terminate(signum: int, frame: FrameType | None) -> None:
        server.stop()
        if dialler is not None:
            dialler.stop()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    if announcer is not None:
        announcer.start()
    phase = "bound, serving the pinned owner" if server.bound else "waiting for the owner to bind"
    # The CPU the start took (imports, token search, key): the agent's own cost at boot.
    log.info("%s (%s); start-up used %.2f s of CPU", where, phase, time.process_time())
    if not server.bound:
        # READY promises an exchange without delay: its code is loaded before, not during, the bind.
        import imprint.protocol  # noqa: F401
    notify_status(f"{where} ({phase})", ready=True)
    threading.Thread(target=_preload, args=(server,), daemon=True).start()
    if dialler is not None:
        dialler.start()
    server.serve_forever()
    log.info("stopped")
    return 0


def _say(line: str) -> None:
    log.error("%s", line)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 stopped; 1 failed (the reason is the last log line); 2 bad usage; 130
    interrupted before serving."""
    args = _build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    agent_log.configure(verbose=verbose)
    lastresort.set_debug(verbose)
    lastresort.robust_streams()
    lastresort.install_hooks(_say, hint="")
    return lastresort.run_main(lambda: _run_or_fail(args), _say, hint="(run with -v for the traceback)")


def _run_or_fail(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except AgentFailure as exc:
        log.error("%s", exc)
        notify_status(f"failed: {exc}")
        return 1
    except Exception as exc:
        notify_status(f"failed: internal error: {lastresort.describe(exc)}")
        raise  # reported by lastresort.run_main


if __name__ == "__main__":
    sys.exit(main())
