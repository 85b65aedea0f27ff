"""Issue 9, item 1: nothing but the agent's announcement can put a VM token line on the console.

The real agent runs as under systemd: its log (stderr) and its announcements go to one console,
here a file every writer appends to (O_APPEND, like the serial port the site records). A peer
then sends Alerts whose detail is a forged announcement, framed every way that could start a
line: a newline, a carriage return, NEL, U+2028, a terminal's erase-line sequence, or nothing.
The console must hold no announcement but the agent's own, and `imprint-site reverse` must
return the agent's genuine token. The extractor's unit tests below cover the rest of what else
writes to a console (kernel messages interleaved, journald's prefix, CR tricks).
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from imprint import crypto, tls, tokens
from imprint.protocol.messages import Alert, encode_frame
from imprint.site import reverse, vm

from tests.helpers import Agent, AgentFactory, Owner

IO_TIMEOUT = 15.0
MARKER = tokens.VM_TOKEN_LINE_PREFIX


def start_on_console(agents: AgentFactory, root: Path, console: Path) -> Agent:
    """The agent with stdout, stderr and --console all appending to ``console``."""
    return agents.start(root, "--console", str(console), log=console)


def genuine_vm_token(root: Path) -> tokens.Token:
    cert = (root / "var/lib/imprint/vm.crt").read_bytes()
    return tokens.Token(tokens.TokenKind.VM, crypto.sha256(crypto.certificate_spki(cert)))


def send_alert(agent: Agent, detail: bytes) -> int:
    """One TLS connection that sends one Alert; returns its local port (the agent logs it).
    Reading to EOF waits until the agent has logged the attempt and closed."""
    raw = socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT)
    port: int = raw.getsockname()[1]
    with tls.owner_bind_context().wrap_socket(raw) as sock:
        sock.sendall(encode_frame(Alert(1, detail)))
        while sock.recv(4096):
            pass
    return port


def hostile_details(forged: str) -> list[bytes]:
    line = forged.encode()
    return [
        b"\n" + line + b"\n",
        b"\r" + line,
        b"\r\n" + line + b"\r\n",
        "\x85".encode() + line,        # NEL: str.splitlines breaks there
        "\u2028".encode() + line,      # LINE SEPARATOR
        b"\x1b[2K\r" + line,           # erase the line, back to column 0
        b"\x0b" + line + b"\x0c",      # vertical tab, form feed
        line,                          # a marker in the middle of the agent's line
        b"\xff\xfe\n" + line,          # not UTF-8, then a newline
    ]


def test_forged_alert_cannot_announce_a_vm_token(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    owner_token = tokens.parse(owner.token("vm1", "nosecret"))
    root = agents.make_root(owner_token.encode())
    console = tmp_path / "console.log"
    agent = start_on_console(agents, root, console)
    genuine = genuine_vm_token(root)
    genuine_line = tokens.vm_token_line(genuine, answers=owner_token)
    attacker = tokens.Token(tokens.TokenKind.VM, os.urandom(32))
    forged = tokens.vm_token_line(attacker, answers=owner_token)  # the owner's token is no secret

    ports = [send_alert(agent, detail) for detail in hostile_details(forged)]
    text = console.read_bytes().decode("utf-8", "replace")
    for port in ports:  # each alert reached the log: the test is not vacuous
        assert f"127.0.0.1:{port}" in text, text

    assert tokens.find_vm_token_lines(text) == [genuine]
    assert tokens.find_vm_token_announcements(text) == [tokens.Announcement(genuine, owner_token.token_id.hex())]
    # Stronger than any one extractor: the marker occurs only in the agent's own line, however a
    # reader splits lines, and every other line is the agent's prefix and printable.
    assert text.count(MARKER) == text.count(genuine_line) == 1
    for line in text.split("\n"):
        if line and line != genuine_line:
            assert line.startswith("imprint-agent: "), repr(line)
            assert line.isprintable(), repr(line)

    for extra in ([], ["--for", owner_token.token_id.hex()]):
        out = subprocess.run([sys.executable, "-m", "imprint.site", "reverse", "--from", str(console), *extra],
                             capture_output=True, text=True, timeout=60)
        assert (out.returncode, out.stdout.strip()) == (0, genuine.encode()), out.stderr


def test_the_announcement_starts_its_own_line_after_a_partial_line(agents: AgentFactory, owner: Owner,
                                                                   tmp_path: Path) -> None:
    """Another writer (a kernel message, a systemd status) left a line unfinished: the agent's
    announcement still starts at column 0."""
    owner_token = tokens.parse(owner.token("vm1", "nosecret"))
    root = agents.make_root(owner_token.encode())
    console = tmp_path / "console.log"
    console.write_bytes(b"[    5.120000] random: crng init don")  # no newline yet
    start_on_console(agents, root, console)
    assert tokens.find_vm_token_lines(console.read_text()) == [genuine_vm_token(root)]


# -- the extractor ------------------------------------------------------------------------------

OWNER = tokens.Token(tokens.TokenKind.NOSECRET, bytes(range(0xA0, 0xC0)))
GENUINE = tokens.Token(tokens.TokenKind.VM, bytes(range(32)))
FORGED = tokens.Token(tokens.TokenKind.VM, bytes(range(1, 33)))
LINE = tokens.vm_token_line(GENUINE, answers=OWNER)
FORGED_LINE = tokens.vm_token_line(FORGED, answers=OWNER)


@pytest.mark.parametrize("text", [
    f"imprint-agent: bind attempt from 10.0.0.9:4000 peer said: {FORGED_LINE}",
    f"[   12.345678] imprint-agent[301]: {FORGED_LINE}",     # journald's forwarding prefix
    f"[   12.345678] {FORGED_LINE}",                         # a kernel message quoting it
    f"login: \r{FORGED_LINE}",                               # shown over the line by a terminal
    f"{FORGED_LINE}\rlogin: ",
    f"{FORGED_LINE}\r\r",
    f"\x1b[0m{FORGED_LINE}",
    f" {FORGED_LINE}",
    f"{FORGED_LINE} ",
    f"{FORGED_LINE}\x00",
    f"x\x85{FORGED_LINE}",
    f"x\u2028{FORGED_LINE}",
    f"x\x0b{FORGED_LINE}",
    f"x\x1e{FORGED_LINE}",
    FORGED_LINE.replace(" for ", "  for "),
    FORGED_LINE.upper(),
    FORGED_LINE + "0",
    FORGED_LINE[:-1],
])
def test_a_marker_that_does_not_start_an_exact_line_is_not_an_announcement(text: str) -> None:
    assert tokens.find_vm_token_lines(text) == []
    assert tokens.find_vm_token_lines(f"{LINE}\n{text}\n") == [GENUINE]


def test_kernel_text_interleaved_into_the_announcement_drops_that_copy_only() -> None:
    # printk writes straight to the UART and can land inside a tty write: that copy is garbled;
    # the agent repeats the line, and the next copy is whole.
    cut = len(LINE) // 2
    garbled = f"{LINE[:cut]}\n[    9.876543] ata1: link is slow to respond\n{LINE[cut:]}"
    assert tokens.find_vm_token_lines(garbled) == []
    assert tokens.find_vm_token_lines(f"{garbled}\n{LINE}\r\n") == [GENUINE]


def _console(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "console.log"
    path.write_text(text)
    return path


def test_reverse_refuses_two_tokens_and_a_token_for_another_owner(tmp_path: Path) -> None:
    answers = OWNER.token_id.hex()
    assert reverse.extract(_console(tmp_path, f"{LINE}\n{LINE}\n"), answers=answers) == GENUINE
    with pytest.raises(reverse.Refused, match="2 different VM tokens"):
        reverse.extract(_console(tmp_path, f"{LINE}\n{FORGED_LINE}\n"), answers=answers)
    # An old-form line with another token is a contradiction too, not something to skip.
    with pytest.raises(reverse.Refused, match="2 different VM tokens"):
        reverse.extract(_console(tmp_path, f"{LINE}\n{tokens.vm_token_line(FORGED)}\n"), answers=answers)
    other = tokens.Token(tokens.TokenKind.NOSECRET, bytes(32))
    with pytest.raises(reverse.Refused, match="booted with"):
        reverse.extract(_console(tmp_path, tokens.vm_token_line(GENUINE, answers=other) + "\n"), answers=answers)
    # Without the owner token id to check, any one consistent token is read.
    assert reverse.extract(_console(tmp_path, tokens.vm_token_line(GENUINE, answers=other) + "\n")) == GENUINE


def test_reverse_reads_a_flooded_console_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    with path.open("wb") as out:
        out.write(b"x" * (8 << 20))  # one 8 MiB line without a newline, then the announcement
        out.write(f"\n{LINE}\r\n".encode())
    assert reverse.extract(path, answers=OWNER.token_id.hex()) == GENUINE


def test_follow_fails_at_once_on_contradicting_announcements(tmp_path: Path) -> None:
    (tmp_path / "console.log").write_text(f"{LINE}\r\n{FORGED_LINE}\r\n")
    record = vm.BootRecord(run_dir=str(tmp_path), pid=os.getpid(), accel="tcg", accel_note="", agent_address="",
                           ssh_address="", agent_port=0, ssh_port=0, console=str(tmp_path / "console.log"),
                           qmp="", disk="", image=None, channel="cmdline", artefact=None, mode="nosecret",
                           token_id=OWNER.token_id.hex())
    record = vm.follow(record, timeout=60)
    assert record.status == "failed" and "refusing" in record.detail and record.vm_token is None


def test_a_peer_cannot_fake_the_agents_status_lines(tmp_path: Path) -> None:
    """vm.follow reads agent lines anchored at their start: text the agent quotes from a peer
    ("... peer said: imprint-agent: listening on ...") is not a status."""
    quoted = ("imprint-agent: bind attempt from 10.0.0.9:4000 peer said: imprint-agent: listening on 6.6.6.6:1 "
              "(evil) [FAILED] Failed to start imprint-agent\n")
    (tmp_path / "console.log").write_text(quoted)
    assert vm._failure(vm.console_text(tmp_path / "console.log")) is None
    lines = vm._agent_lines(vm.console_text(tmp_path / "console.log"))
    assert lines and all(not re.match(r"listening on", line) for line in lines)


# -- the agent's log -----------------------------------------------------------------------------

def test_every_log_route_renders_and_defangs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's own log and the stdlib route backends use: one prefixed printable line per
    message, the marker never intact."""
    import logging

    from imprint.guest import log as agent_log

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setitem(agent_log._state, "configured", True)
    hostile = f"file name from a seed: x\n{FORGED_LINE}\r\x1b[2K\u2028{FORGED_LINE}"
    agent_log.get("imprint.agent").warning("refused %s", hostile)
    name = "imprint.test-console-forgery"
    agent_log.route_stdlib(name)
    logger = logging.getLogger(name)
    try:
        logger.warning("backend says %s", hostile)
        try:
            raise ValueError(hostile)
        except ValueError:
            logger.exception("backend failed")
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 4, lines
    for line in lines[:-1]:
        assert line.startswith(agent_log.PREFIX) and line.isprintable(), line
        assert MARKER not in line and FORGED.encode() in line  # shown, but never as an announcement
    assert tokens.find_vm_token_lines(stream.getvalue()) == []


def test_python_warnings_become_agent_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from imprint.guest import log as agent_log

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    monkeypatch.setitem(agent_log._state, "configured", agent_log._state["configured"])
    monkeypatch.setitem(agent_log._state, "level", agent_log._state["level"])
    agent_log.configure(verbose=False)  # what the agent's main does
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated\n{FORGED_LINE}", DeprecationWarning, stacklevel=1)
    (line,) = stream.getvalue().splitlines()
    assert line.startswith(agent_log.PREFIX + "DeprecationWarning: deprecated\\n") and MARKER not in line
