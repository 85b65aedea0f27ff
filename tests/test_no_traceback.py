"""No imprint process ends in a traceback (issue 9, "the sans-IO rule, whole").

Each console script (`imprint`, `imprint-agent`, `imprint-site`) is driven with inputs that
ended in a traceback before: a home that is a file, a database that is not one, a corrupt
certificate, a key that is a directory, a token file that is missing or binary, a run directory
with a garbage record, a VM certificate that is garbage, Ctrl-C half-way, a reader of stdout
that went away. Each must end in one clear line and the documented exit code.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from imprint import lastresort, tokens
from imprint.guest import log as agent_log

from tests.helpers import AgentFactory, Owner

TIMEOUT = 60


def run(module: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload, no-any-return]


def assert_clean(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    """Exit ``code``, no traceback, and the last line of stderr names the problem."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert result.returncode == code, output
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert says in last, output


# -- imprint (the owner) ---------------------------------------------------------------------------

def test_owner_home_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("not a directory\n")
    for args in (["init"], ["list"], ["audit"]):
        assert_clean(run("imprint.owner", "--home", str(tmp_path / "home"), *args), 1, "as the owner home")


def test_owner_database_that_is_not_one(owner: Owner) -> None:
    (owner.home / "imprint.db").write_bytes(b"garbage, not SQLite\n" * 100)
    for args in (["list"], ["token", "new", "vm1", "--mode", "shared"], ["audit"]):
        assert_clean(owner.run(*args, check=None), 1, "owner database")
    result = owner.run("list", "--json", check=None)
    assert_clean(result, 1, "owner database")
    assert '"exit_code": 1' in result.stdout  # --json callers get the error as JSON too


def test_owner_certificate_that_is_garbage(owner: Owner) -> None:
    (owner.home / "owner.crt").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert_clean(owner.run("token", "new", "vm1", "--mode", "nosecret", check=None), 2, "is not a certificate")


def test_owner_key_that_is_a_directory(owner: Owner) -> None:
    (owner.home / "owner.key").unlink()
    (owner.home / "owner.key").mkdir()
    assert_clean(owner.run("token", "new", "vm1", "--mode", "nosecret", check=None), 1, "owner.key")


def test_owner_usage_errors_stay_exit_2(tmp_path: Path) -> None:
    for args in ([], ["bind"], ["token", "new", "vm1", "--mode", "nonsense"], ["--nonsense"]):
        result = run("imprint.owner", "--home", str(tmp_path / "h"), *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "usage:" in result.stderr


def test_owner_interrupted_mid_bind(owner: Owner) -> None:
    """Ctrl-C while the owner waits for an agent that never answers: 130, one line."""
    token = owner.token("vm1", "shared")
    assert token
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "imprint.owner", "--home", str(owner.home), "bind", "vm1",
                                 "--address", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        silent.settimeout(TIMEOUT)
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(1)  # its TLS ClientHello: the owner is running and waiting for us
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=TIMEOUT)
    assert_clean(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130, "interrupted")


def test_owner_output_to_a_reader_that_went_away(owner: Owner) -> None:
    for n in range(3):
        owner.token(f"vm{n}", "shared")
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "imprint.owner", "--home", str(owner.home), "list"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode == lastresort.BROKEN_PIPE


# -- imprint-agent ---------------------------------------------------------------------------------

def _nosecret_root(agents: AgentFactory, owner: Owner) -> Path:
    return agents.make_root(owner.token("vm1", "nosecret"))


def test_agent_with_a_garbage_vm_certificate(agents: AgentFactory, owner: Owner) -> None:
    root = _nosecret_root(agents, owner)
    state = root / "var/lib/imprint"
    first = agents.start(root)  # creates the VM key and certificate
    first.kill()
    (state / "vm.crt").write_text("garbage\n")
    result = run("imprint.guest", "run", "--root", str(root), "--listen", "127.0.0.1:0", "--token-wait", "0")
    assert_clean(result, 1, "cannot load the VM certificate")


@pytest.mark.parametrize("garbage", [b"[1, 2", b"5", b'{"bound": true}', b'{"consumed_tokens": 5}',
                                     b'{"surprise": 1}', b"\xff\xfe\x00"])
def test_agent_with_a_garbage_state_file(tmp_path: Path, garbage: bytes) -> None:
    state = tmp_path / "root/var/lib/imprint"
    state.mkdir(parents=True)
    (state / "state.json").write_bytes(garbage)
    result = run("imprint.guest", "run", "--root", str(tmp_path / "root"), "--listen", "127.0.0.1:0",
                 "--token-wait", "0")
    assert_clean(result, 1, "imprint-agent: ")


def test_agent_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "root").write_text("a file\n")
    result = run("imprint.guest", "run", "--root", str(tmp_path / "root"), "--token-wait", "0")
    assert_clean(result, 1, "imprint-agent: ")


def test_agent_interrupted_while_waiting_for_a_token(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cmdline").write_text("console=ttyS0\n")
    sock_path = tmp_path / "n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(sock_path))
        notify.settimeout(TIMEOUT)
        proc = subprocess.Popen([sys.executable, "-m", "imprint.guest", "run", "--root", str(root), "--listen",
                                 "127.0.0.1:0", "--channels", "cmdline"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, NOTIFY_SOCKET=str(sock_path), PYTHONUNBUFFERED="1"))
        try:
            # The agent's own report that it waits (sd_notify STATUS=), not a clock.
            assert "waiting for a token" in notify.recv(4096).decode()
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in out and proc.returncode == 130, out
    assert out.strip().splitlines()[-1] == "imprint-agent: interrupted"


# -- imprint-site ----------------------------------------------------------------------------------

NOSECRET = tokens.Token(tokens.TokenKind.NOSECRET, bytes(range(32))).encode()


def test_site_token_file_missing_or_binary(tmp_path: Path) -> None:
    out = str(tmp_path / "artefact")
    assert_clean(run("imprint.site", "seed", "--channel", "cmdline", "--token-file", str(tmp_path / "none"),
                     "--out", out), 2, "No such file")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00\x01")
    assert_clean(run("imprint.site", "seed", "--channel", "cmdline", "--token-file", str(tmp_path / "binary"),
                     "--out", out), 2, "not a token")
    assert_clean(run("imprint.site", "boot", "--image", out, "--channel", "cmdline", "--token-file",
                     str(tmp_path / "binary")), 2, "not a token")


@pytest.mark.parametrize("record", [b'{"x": 1}', b"[]", b"null", b"\xff", b'{"run_dir": 5}'])
def test_site_run_directory_with_a_garbage_record(tmp_path: Path, record: bytes) -> None:
    (tmp_path / "boot.json").write_bytes(record)
    result = run("imprint.site", "attach", str(tmp_path), "--channel", "metadata-disk", "--token", NOSECRET,
                 "--no-wait")
    assert_clean(result, 2, "not an imprint-site run directory")
    assert_clean(run("imprint.site", "wait-ssh", str(tmp_path), "--timeout", "1"), 1,
                 "not an imprint-site run directory")


def test_site_reverse_from_what_is_not_a_console_log(tmp_path: Path) -> None:
    assert_clean(run("imprint.site", "reverse", "--from", str(tmp_path)), 1, "cannot read")
    assert_clean(run("imprint.site", "reverse", "--from", str(tmp_path / "none")), 1, "cannot read")
    result = run("imprint.site", "reverse", "--from", str(tmp_path), "--for", "XYZ")
    assert_clean(result, 2, "16 lowercase hex digits")


def test_site_interrupted_while_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "console.log"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "imprint.site", "reverse", "--from", str(fifo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while True:  # ENXIO until the site has the FIFO open for reading: then it is running
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                os.sched_yield()
        os.write(writer, b"[    1.0] booting\n")  # the site now waits in read() for more
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        os.close(writer)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_clean(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130, "interrupted")


def test_site_usage_errors_stay_exit_2() -> None:
    for args in ([], ["seed"], ["reverse"], ["boot", "--cpus", "0"]):
        result = run("imprint.site", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "usage:" in result.stderr


# -- the mechanism -----------------------------------------------------------------------------------

def _boom() -> int:
    raise RuntimeError("boom\nsecond line")


def test_run_main_ends_an_unexpected_exception_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setitem(lastresort._debug, "on", False)
    assert lastresort.run_main(_boom, said.append, hint="(hint)") == lastresort.INTERNAL_ERROR
    assert said == ["internal error: RuntimeError: boom\nsecond line (hint)"]  # the writer renders it
    said.clear()
    monkeypatch.setitem(lastresort._debug, "on", True)
    assert lastresort.run_main(_boom, said.append) == lastresort.INTERNAL_ERROR
    assert said[0] == "internal error: RuntimeError: boom\nsecond line"
    assert said[1] == "Traceback (most recent call last):" and any("_boom" in line for line in said)
    assert all("\n" not in line for line in said[1:])  # one call per traceback line


def test_agent_log_exception_is_one_line_and_the_traceback_only_at_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    log = agent_log.get("test")
    for verbose in (False, True):
        agent_log.configure(verbose=verbose)
        try:
            _boom()
        except RuntimeError:
            log.exception("connection from %s ended by an internal error", "10.0.0.1:1")
    agent_log.configure(verbose=False)
    lines = stream.getvalue().split("\n")[:-1]
    assert lines[0] == ("imprint-agent: connection from 10.0.0.1:1 ended by an internal error: "
                        "RuntimeError: boom\\nsecond line")
    assert lines[1] == lines[0] and lines[2] == "imprint-agent: Traceback (most recent call last):"
    assert len(lines) > 3 and all(line.startswith(agent_log.PREFIX) for line in lines)



def test_owner_pin_that_is_not_a_certificate(owner: Owner) -> None:
    """A damaged record (or one another program wrote): one line naming the database and the pin."""
    owner.token("vm1", "shared")
    db = sqlite3.connect(owner.home / "imprint.db")
    db.execute("INSERT INTO pins (vm, vm_cert_pem, vm_fingerprint, state, mode, address, pinned_at) "
               "VALUES ('vm1', 'PEM', 'SHA256:x', 'bound', 'shared', '127.0.0.1:1', 1.0)")
    db.commit()
    db.close()
    assert_clean(owner.run("status", "vm1", check=None), 1, "the pin of vm1 is not a PEM certificate")
