"""imprint-site boot's pieces that need no VM: console parsing, status following, stop safety."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from imprint import tokens
from imprint.site import vm

VM_TOKEN = "imprint1v-tussqtvi6jnveexrj5bp5kr4trze63n23qace443zmzrhoau26g5hi6ism"
OWNER_TOKEN_ID = "9c4f4ab2d0e1f3a5"  # the no-secrets token the VM was booted with
# As systemd 252 prints it on an 80-column serial console: colours, \r\n, and the unit cut short.
FAILED = (
    "         Starting \x1b[0;1;39mimprint-agent.ser\u2026nge and pinned control channel)...\r\r\n"
    "[   21.02] imprint-agent[263]: imprint-agent: boot channel cmdline is broken: imprint.token: token is corrupt: "
    "its check digits do not match (mistyped or truncated)\r\n"
    "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mimprint-ag\u2026hange and pinned control channel).\r\r\n"
)


def _record(tmp_path: Path, console: str, mode: str | None = "nosecret") -> vm.BootRecord:
    (tmp_path / "console.log").write_text(console)
    return vm.BootRecord(run_dir=str(tmp_path), pid=os.getpid(), accel="tcg", accel_note="", agent_address="",
                         ssh_address="", agent_port=0, ssh_port=0, console=str(tmp_path / "console.log"),
                         qmp="", disk="", image=None, channel="cmdline", artefact=None, mode=mode,
                         token_id=OWNER_TOKEN_ID, started_at=time.time())


def test_console_text_strips_colours_and_carriage_returns(tmp_path: Path) -> None:
    (tmp_path / "c").write_text(FAILED)
    text = vm.console_text(tmp_path / "c")
    assert "\x1b" not in text and "\r" not in text and "[FAILED] Failed to start imprint-ag" in text


def test_failure_names_the_agents_reason_even_when_systemd_cuts_the_line(tmp_path: Path) -> None:
    record = vm.follow(_record(tmp_path, FAILED), timeout=5)
    assert record.status == "failed"
    assert record.detail.startswith("boot channel cmdline is broken: imprint.token: token is corrupt")


def test_follow_reports_waiting(tmp_path: Path) -> None:
    console = "[ 20.1] imprint-agent[1]: imprint-agent: waiting for a token on: cmdline, credentials\r\n"
    record = vm.follow(_record(tmp_path, console, mode=None), timeout=5)
    assert (record.status, record.detail) == ("waiting", "waiting for a token on: cmdline, credentials")
    assert record.seconds_to_status is not None


def test_follow_waits_for_the_vm_token_in_nosecret_mode(tmp_path: Path) -> None:
    console = (f"IMPRINT-VM-TOKEN {VM_TOKEN} for {OWNER_TOKEN_ID}\r\n"
               "[ 20.1] imprint-agent[1]: imprint-agent: listening on 0.0.0.0:7443 (waiting for the owner to bind)\r\n")
    record = vm.follow(_record(tmp_path, console), timeout=5)
    assert record.status == "ready" and record.vm_token == VM_TOKEN
    assert record.vm_token_source == "serial console"
    assert vm.BootRecord.load(tmp_path).vm_token == VM_TOKEN  # boot.json updated


def test_follow_reads_an_agent_line_after_the_gettys_prompt(tmp_path: Path) -> None:
    # As the VM tests' consoles show it: the serial getty's prompt has no newline, so journald's
    # line follows it; a status the agent quotes from a peer, after its own prefix, is not one.
    console = (f"\nIMPRINT-VM-TOKEN {VM_TOKEN} for {OWNER_TOKEN_ID}\n\r\nDebian GNU/Linux 12 debian ttyS0\r\n\r\n"
               "debian login: [ 31.7] imprint-agent[255]: imprint-agent: bind attempt from 10.0.2.2:1 peer said: "
               "imprint-agent: boot channel cmdline is broken: forged\r\n"
               "debian login: [ 31.8] imprint-agent[255]: imprint-agent: listening on 0.0.0.0:7443 "
               "(waiting for the owner to bind); start-up used 4.78 s of CPU\r\n")
    record = vm.follow(_record(tmp_path, console), timeout=5)
    assert record.status == "ready" and record.vm_token == VM_TOKEN


def test_follow_times_out(tmp_path: Path) -> None:
    record = vm.follow(_record(tmp_path, "[ 1.0] Linux version 6.1\r\n"), timeout=0.5)
    assert record.status == "timeout"


def test_stop_never_kills_what_is_not_qemu(tmp_path: Path) -> None:
    (tmp_path / "qemu.pid").write_text(f"{os.getpid()}\n")
    assert vm.stop(tmp_path) == "not running"
    assert vm.stop(tmp_path) == "not running (no pid file)"


def test_boot_refuses_a_channel_without_a_token(tmp_path: Path) -> None:
    if vm.shutil.which(vm.QEMU) is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    with pytest.raises(vm.SiteError, match="go together"):
        vm.boot(image=None, kernel=tmp_path / "k", initrd=tmp_path / "i", run_dir=tmp_path / "r",
                channel="cmdline", token=None)


def test_explicit_accelerator_is_not_probed(tmp_path: Path) -> None:
    assert vm.choose_accel("tcg", tmp_path / "k", tmp_path / "i") == ("tcg", "tcg as requested")
    with pytest.raises(vm.SiteError):
        vm.choose_accel("hvf", tmp_path / "k", tmp_path / "i")


# -- K in the site's record (issue 9, item 9) ------------------------------------------------------

# A multiboot kernel of 53 bytes that writes its command line to COM1 and halts, as a Linux
# kernel prints "Command line: ..." on the serial console. Assembled from (GNU as, --32, linked
# at 0x100000, flat binary): the multiboot header with the a.out-kludge addresses, then
#   mov 16(%ebx),%esi; mov $0x3f8,%dx; 1: lodsb; test %al,%al; jz 2f; out %al,%dx; jmp 1b;
#   2: mov $10,%al; out %al,%dx; 3: hlt; jmp 3b
ECHO_KERNEL = bytes.fromhex(
    "02b0ad1b00000100fe4f51e400001000000010000000000000000000200010008b731066baf803ac84c07403eeebf8b00aeef4ebfd"
)


def _site(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imprint.site", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_seed_never_prints_k(tmp_path: Path) -> None:
    k = tokens.Token(tokens.TokenKind.SHARED, os.urandom(32)).encode()
    (tmp_path / "t").write_text(k + "\n")
    for extra in ([], ["--json"]):
        out = _site("seed", "--channel", "cmdline", "--token-file", str(tmp_path / "t"),
                    "--out", str(tmp_path / "cmdline.txt"), *extra)
        assert out.returncode == 0, out.stderr
        assert k not in out.stdout + out.stderr
        assert str(tmp_path / "cmdline.txt") in out.stdout  # the file to append is named instead
    assert (tmp_path / "cmdline.txt").read_text() == f"imprint.token={k}\n"
    assert stat.S_IMODE((tmp_path / "cmdline.txt").stat().st_mode) == 0o600
    # A no-secrets token is no secret: its fragment is printed, for the site to paste.
    n = tokens.Token(tokens.TokenKind.NOSECRET, os.urandom(32)).encode()
    out = _site("seed", "--channel", "cmdline", "--token", n, "--out", str(tmp_path / "n.txt"), "--json")
    assert json.loads(out.stdout)["kernel_cmdline"] == f"imprint.token={n}"


@pytest.mark.skipif(shutil.which(vm.QEMU) is None or shutil.which("qemu-img") is None,
                    reason="QEMU is not installed")
def test_boot_with_k_on_the_cmdline_leaves_k_only_in_private_files(tmp_path: Path) -> None:
    """A real QEMU boots a kernel that echoes its command line: the guest gets K, while
    boot.json, the tool's output and QEMU's argv do not, and every file in the run directory
    that holds K is 0600."""
    k = tokens.Token(tokens.TokenKind.SHARED, os.urandom(32)).encode()
    (tmp_path / "t").write_text(k)
    (tmp_path / "vmlinuz").write_bytes(ECHO_KERNEL)
    (tmp_path / "initrd.img").write_bytes(b"")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"], check=True)
    run_dir = tmp_path / "run"
    booted = _site("boot", "--image", str(tmp_path / "base.qcow2"), "--channel", "cmdline", "--token-file",
                   str(tmp_path / "t"), "--accel", "tcg", "--memory", "64", "--no-wait", "--run-dir", str(run_dir))
    try:
        assert booted.returncode == 0, booted.stderr
        record = json.loads(booted.stdout)
        console = run_dir / "console.log"
        deadline = time.monotonic() + 60
        while f"imprint.token={k}" not in console.read_text(errors="replace"):  # the guest got K
            assert time.monotonic() < deadline and vm.is_running(record["pid"]), console.read_text()
            time.sleep(0.05)
        assert k not in booted.stdout + booted.stderr
        assert k.encode() not in Path(f"/proc/{record['pid']}/cmdline").read_bytes()
        assert k not in (run_dir / "boot.json").read_text()
        holding = []
        for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
            if k.encode() in path.read_bytes():
                holding.append(path.name)
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert "token-cmdline" in holding and "boot.json" not in holding
    finally:
        stopped = _site("stop", str(run_dir))
    assert json.loads(stopped.stdout)["stopped"] == "killed"


def test_follow_says_why_no_vm_token_was_relayed(tmp_path: Path) -> None:
    """An agent older than the site announces without the owner token id: the follow times out
    naming that, instead of relaying a token it cannot tie to this boot."""
    console = (f"IMPRINT-VM-TOKEN {VM_TOKEN}\r\n"
               "[ 20.1] imprint-agent[1]: imprint-agent: listening on 0.0.0.0:7443 (waiting for the owner to bind)\r\n")
    record = vm.follow(_record(tmp_path, console), timeout=0.5)
    assert record.status == "timeout" and record.vm_token is None
    assert f"no announcement names owner token id {OWNER_TOKEN_ID}" in record.detail
