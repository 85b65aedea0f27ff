"""``imprint-site boot|stop|attach|wait-ssh``: a site in one command, for trying imprint and for tests.

``boot`` copies the image as a qcow2 overlay (the base image is never written), builds the token
artefact for the chosen channel with :mod:`imprint.site.seeds`, starts QEMU daemonized with user
networking (the agent port 7443 and SSH 22 forwarded to free loopback ports), direct kernel boot
and the serial console in a file, then follows the console until the agent is ready, waiting or
failed, and relays the VM token (no-secrets mode) from the console or the metadata disk's reply
area. Everything about a run lives in its run directory; ``boot.json`` there records it.

K (a shared-mode token) is in the run directory only in files mode 0600: the channel artefact,
the QEMU config file that carries the kernel command line (so K is not in QEMU's argv, which
every host user can read, nor in boot.json's record of it), and the console log (the guest
kernel prints its command line there). boot.json and stdout never carry it.

KVM: ``--accel auto`` does a bounded test boot under KVM (the kernel must print its banner within
a few seconds) and falls back to TCG, saying why. Nested KVM devices exist on which a guest hangs
right after the kernel's real-mode setup; a working /dev/kvm alone proves nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imprint import tokens
from imprint.channels import metadisk
from imprint.channels.channel import Artefact, Owners
from imprint.fsatomic import write_atomic
from imprint.ports import AGENT_PORT
from imprint.site import reverse, seeds

QEMU = "qemu-system-x86_64"
BASE_APPEND = "root=LABEL=root rw console=ttyS0"
KVM_PROBE_SECONDS = 10.0
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# An agent line as it reaches the console: written by the agent itself, or forwarded by journald
# ("[  21.02] imprint-agent[263]: imprint-agent: ..."). The status is what follows the FIRST
# "imprint-agent: " of the line, so text the agent quotes from a peer (always after its own
# prefix) cannot pose as a status of its own. Not anchored at column 0: another writer's
# unfinished line often precedes journald's (the serial getty's "debian login: " prompt has no
# newline). Status lines only steer the site's waiting; the VM token announcement, which
# decides trust, is framed and matched as a whole line (imprint.tokens).
_AGENT_LINE = re.compile(r"^[^\n]*?imprint-agent: ([^\n]*)$", re.MULTILINE)
QEMU_APPEND_LIMIT = 1023  # QEMU's config file parser reads at most this many characters of a value


class SiteError(Exception):
    """A boot, stop or attach that cannot be done; the message says why."""


@dataclass
class BootRecord:
    run_dir: str
    pid: int
    accel: str
    accel_note: str
    agent_address: str
    ssh_address: str
    agent_port: int
    ssh_port: int
    console: str
    qmp: str
    disk: str
    image: str | None
    channel: str | None
    artefact: str | None
    mode: str | None
    token_id: str | None
    qemu_args: list[str] = field(default_factory=list)
    started_at: float = 0.0
    status: str = "started"
    detail: str = ""
    vm_token: str | None = None
    vm_token_source: str | None = None
    seconds_to_status: float | None = None
    # The owner addresses written beside the token (their text form; not secret).
    owners: list[str] = field(default_factory=list)

    def save(self) -> None:
        write_atomic(Path(self.run_dir) / "boot.json", (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def load(cls, run_dir: Path) -> BootRecord:
        try:
            data: Any = json.loads((run_dir / "boot.json").read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SiteError(f"{run_dir} is not an imprint-site run directory (boot.json: {reason})") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise SiteError(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86 qemu-utils)")
    return path


def console_text(path: Path) -> str:
    """The console log without colour codes and carriage returns."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ""
    return ANSI_RE.sub("", raw.decode("utf-8", "replace")).replace("\r", "")


# -- accelerator ---------------------------------------------------------------------------------

def _probe_cache_file() -> Path:
    base = os.environ.get("IMPRINT_IMAGE_CACHE") or str(Path.home() / ".cache" / "imprint-image")
    return Path(base) / "kvm-probe.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(kernel: Path, initrd: Path, timeout: float = KVM_PROBE_SECONDS) -> tuple[bool, str]:
    """A bounded test boot under KVM: works if the kernel prints its banner within ``timeout``."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is absent or not accessible"
    with tempfile.TemporaryDirectory(prefix="imprint-kvm-probe-") as tmp:
        log = Path(tmp) / "console.log"
        cmd = [qemu_binary(), "-accel", "kvm", "-m", "256", "-smp", "1", "-display", "none", "-no-reboot",
               "-monitor", "none", "-serial", f"file:{log}", "-kernel", str(kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 panic=-1 rdinit=/imprint-kvm-probe-none"]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while time.monotonic() - started < timeout:
                if "Linux version" in console_text(log):
                    return True, f"KVM test boot printed the kernel banner in {time.monotonic() - started:.1f} s"
                if proc.poll() is not None:
                    out = (proc.stdout.read() if proc.stdout else b"").decode("utf-8", "replace").strip()
                    return False, f"QEMU under KVM exited at once: {out.splitlines()[-1] if out else proc.returncode}"
                time.sleep(0.2)
            return False, f"a KVM test boot printed nothing in {timeout:.0f} s (the guest hangs under this KVM)"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


def choose_accel(accel: str, kernel: Path, initrd: Path) -> tuple[str, str]:
    if accel in ("kvm", "tcg"):
        return accel, f"{accel} as requested"
    if accel != "auto":
        raise SiteError(f"--accel {accel}: use auto, kvm or tcg")
    key = f"{_boot_id()} {kernel.resolve()} {kernel.stat().st_size} {shutil.which(QEMU)}"
    cache = _probe_cache_file()
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            works, why = bool(cached["works"]), str(cached["why"])
            return ("kvm", f"KVM works ({why}; probed this boot)") if works else \
                ("tcg", f"KVM unusable, using TCG: {why} (probed this boot)")
    works, why = probe_kvm(kernel, initrd)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "works": works, "why": why}) + "\n")
    return ("kvm", f"KVM works ({why})") if works else ("tcg", f"KVM unusable, using TCG: {why}")


# -- QMP -----------------------------------------------------------------------------------------

class Qmp:
    """A minimal QMP client: one command per call, events skipped."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._buf = b""
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise SiteError("QEMU closed the QMP connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise SiteError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        self._sock.close()


def _qmp_path(run_dir: Path) -> Path:
    path = run_dir / "qmp.sock"
    if len(str(path)) < 100:
        return path
    # AF_UNIX paths are limited to 107 bytes: a long run directory gets a short socket directory.
    return Path(tempfile.mkdtemp(prefix="imprint-qmp-")) / "qmp.sock"


# -- boot ----------------------------------------------------------------------------------------

def _token_mode(token: str | None) -> tuple[str | None, str | None]:
    if token is None:
        return None, None
    parsed = tokens.parse(token)
    if parsed.kind is tokens.TokenKind.VM:
        raise SiteError("a VM token goes to the owner, not onto the VM's boot channel")
    return parsed.mode.value, parsed.token_id.hex()


def boot(*, image: Path | None, kernel: Path, initrd: Path, run_dir: Path, channel: str | None,
         token: str | None, accel: str = "auto", memory_mib: int = 1024, cpus: int = 1, append: str = "",
         reuse_disk: Path | None = None, extra_qemu: list[str] | None = None, owners: Owners = (),
         forward_agent: bool = True) -> BootRecord:
    """Start the VM and return its record (status "started"); :func:`follow` then watches it."""
    qemu = qemu_binary()
    mode, token_id = _token_mode(token)
    if (channel is None) != (token is None):
        raise SiteError("--channel and --token go together (or neither, for a VM with no token)")
    if owners and token is None:
        raise SiteError("--owner goes with a token (the owner addresses belong to it)")
    for path in (kernel, initrd):
        if not path.is_file():
            raise SiteError(f"{path} does not exist (build the image with image-build/build.sh)")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    if reuse_disk is not None:
        disk = reuse_disk.resolve()
    else:
        if image is None or not image.is_file():
            raise SiteError(f"--image {image}: no such image")
        disk = run_dir / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.resolve()), "-F", "qcow2",
                        str(disk)], check=True, capture_output=True, timeout=60)
    chosen, note = choose_accel(accel, kernel, initrd)

    artefact: Artefact | None = None
    cmdline = f"{BASE_APPEND} {append}".strip()
    qemu_args: list[str] = []
    if channel is not None and token is not None:
        try:
            artefact = seeds.build(channel, token, run_dir / f"token-{channel}", owners)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise SiteError(f"cannot build the {channel} artefact: {exc}") from None
        qemu_args += artefact.qemu_args
        if artefact.kernel_cmdline:
            cmdline += " " + artefact.kernel_cmdline

    agent_port, ssh_port = (free_port() if forward_agent else 0), free_port()
    console = run_dir / "console.log"
    console.unlink(missing_ok=True)
    # QEMU keeps the mode of a file that exists; the guest kernel prints its command line here.
    os.close(os.open(console, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    machine_config = _write_machine_config(run_dir, cmdline)
    qmp = _qmp_path(run_dir)
    pidfile = run_dir / "qemu.pid"
    pidfile.unlink(missing_ok=True)
    drive = str(disk).replace(",", ",,")
    cmd = [
        qemu, "-name", f"imprint-{run_dir.name}", "-accel", chosen, "-m", str(memory_mib), "-smp", str(cpus),
        "-display", "none", "-vga", "none", "-monitor", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-readconfig", str(machine_config),
        "-drive", f"file={drive},if=virtio,format=qcow2",
        "-netdev", ("user,id=n0,"
                    + (f"hostfwd=tcp:127.0.0.1:{agent_port}-:{AGENT_PORT}," if forward_agent else "")
                    + f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
        "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci",
        "-serial", f"file:{console}", "-qmp", f"unix:{qmp},server=on,wait=off",
        *qemu_args, *(extra_qemu or []),
        "-daemonize", "-pidfile", str(pidfile),
    ]
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SiteError(f"QEMU did not start: {result.stderr.strip() or result.returncode}")
    pid = int(pidfile.read_text().strip())
    record = BootRecord(
        run_dir=str(run_dir), pid=pid, accel=chosen, accel_note=note,
        agent_address=f"127.0.0.1:{agent_port}" if forward_agent else "", ssh_address=f"127.0.0.1:{ssh_port}",
        agent_port=agent_port, ssh_port=ssh_port, console=str(console), qmp=str(qmp), disk=str(disk),
        image=str(image.resolve()) if image else None, channel=channel,
        artefact=str(artefact.path) if artefact else None, mode=mode, token_id=token_id,
        qemu_args=cmd, started_at=started, owners=[str(address) for address in owners],
    )
    # K never goes into boot.json: argv (recorded there) carries file names only.
    record.save()
    return record


def _write_machine_config(run_dir: Path, cmdline: str) -> Path:
    """The kernel command line in a QEMU config file (0600) instead of argv: it may carry K."""
    if any(c in cmdline for c in '"\n\r\0') or len(cmdline) > QEMU_APPEND_LIMIT:
        raise SiteError(f"the kernel command line must be at most {QEMU_APPEND_LIMIT} characters without "
                        "double quotes or line breaks (QEMU reads it from a config file)")
    path = run_dir / "qemu-machine.cfg"
    write_atomic(path, f'[machine]\n  append = "{cmdline}"\n'.encode(), mode=0o600)
    return path


def _agent_lines(text: str) -> list[str]:
    return [m.group(1).strip() for m in _AGENT_LINE.finditer(text)]


# systemd's own status line (it may cut the line at 80 columns), at the start of a line.
_FAILED = re.compile(r"^\[[^\]\n]*FAILED[^\]\n]*\] Failed to start imprint-ag", re.MULTILINE)
# The agent's ready line: "listening on HOST:PORT[, dialling the owner at ...] (phase)", or with
# --listen none "no inbound port, dialling the owner at ... (phase)".
_READY = re.compile(r"(?:listening on \S+|no inbound port)[^(\n]* \(.*?\)")
_WAITING = re.compile(r"waiting for a token on: .*")


def _failure(text: str) -> str | None:
    match = _FAILED.search(text)
    if match is None:
        return None
    before = text[: match.start()]
    lines = _agent_lines(before) or _agent_lines(text)
    return lines[-1] if lines else "imprint-agent.service failed (no agent message on the console)"


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _vm_token(record: BootRecord) -> tuple[str, str] | str:
    """The VM token relayed from the metadata disk's reply area or the console, or why there is
    none yet. Raises :class:`reverse.Refused` when announcements contradict each other or answer
    another owner token than this VM was booted with."""
    sources = [(Path(record.console), "serial console")]
    if record.channel == metadisk.NAME and record.artefact:
        sources.insert(0, (Path(record.artefact), "metadata disk reply area"))
    why = "no source"
    for source, name in sources:
        try:
            found = reverse.extract(source, answers=record.token_id)
        except reverse.Refused:
            raise
        except reverse.ReverseError as exc:
            why = str(exc)
            continue
        return found.encode(), name
    return why


def follow(record: BootRecord, timeout: float = 600.0, until: tuple[str, ...] = ("ready", "waiting", "failed")
           ) -> BootRecord:
    """Watch the console until the agent is ready (and, in no-secrets mode, the VM token is
    relayed), waits for a token, or failed; or until ``timeout``. Updates boot.json."""
    console = Path(record.console)
    deadline = time.monotonic() + timeout
    token_pending = ""
    while True:
        text = console_text(console)
        status, detail = "booting", ""
        failure = _failure(text)
        lines = _agent_lines(text)
        if failure is not None:
            status, detail = "failed", failure
        elif (ready := next((m.group(0) for line in lines if (m := _READY.match(line))), None)):
            status, detail = "ready", ready
        elif (waiting := next((m.group(0) for line in lines if (m := _WAITING.match(line))), None)):
            status, detail = "waiting", waiting.strip()
        if record.mode == "nosecret" and record.vm_token is None:
            try:
                found = _vm_token(record)
            except reverse.Refused as exc:
                status, detail = "failed", str(exc)
                break
            if isinstance(found, tuple):
                record.vm_token, record.vm_token_source = found
            else:
                token_pending = found
        nosecret_pending = status == "ready" and record.mode == "nosecret" and record.vm_token is None
        if status in until and not nosecret_pending:
            break
        if not is_running(record.pid):
            status, detail = "failed", "QEMU exited; the console log says why"
            break
        if time.monotonic() > deadline:
            detail = (f"the agent is ready but no VM token was relayed within {timeout:.0f} s: {token_pending}"
                      if nosecret_pending else f"no agent status within {timeout:.0f} s (last: {status})")
            status = "timeout"
            break
        time.sleep(0.25)
    record.status, record.detail = status, detail
    record.seconds_to_status = round(time.time() - record.started_at, 2)
    record.save()
    return record


def wait_sshd(record: BootRecord, timeout: float = 300.0) -> float:
    """Wait until the guest's sshd sends its banner on the forwarded port; returns seconds since
    QEMU started. User networking accepts the TCP connection at once and resets it while nothing
    listens in the guest, so a connect alone proves nothing: the banner does."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", record.ssh_port), timeout=2) as sock:
                sock.settimeout(2)
                if sock.recv(8).startswith(b"SSH-"):
                    return round(time.time() - record.started_at, 2)
        if not is_running(record.pid):
            raise SiteError("QEMU exited before sshd answered; the console log says why")
        if time.monotonic() > deadline:
            raise SiteError(f"sshd did not answer on {record.ssh_address} within {timeout:.0f} s")
        time.sleep(0.25)


# -- stop and hot-plug ---------------------------------------------------------------------------

def _is_qemu(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("qemu")
    except OSError:
        return False


def stop(run_dir: Path, *, graceful: bool = False, timeout: float = 60.0) -> str:
    """Stop the VM of a run directory: ACPI power-down first when ``graceful`` (a clean guest
    shutdown, as a reboot needs), then SIGTERM, then SIGKILL. Returns what was done."""
    pidfile = run_dir / "qemu.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return "not running (no pid file)"
    if not is_running(pid) or not _is_qemu(pid):
        pidfile.unlink(missing_ok=True)
        return "not running"
    how = "killed"
    if graceful:
        with contextlib.suppress(OSError, SiteError):
            record = BootRecord.load(run_dir)
            qmp = Qmp(record.qmp, timeout=10)
            qmp.command("system_powerdown")
            qmp.close()
            deadline = time.monotonic() + timeout
            while is_running(pid) and time.monotonic() < deadline:
                time.sleep(0.25)
            if not is_running(pid):
                how = "powered down"
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if not is_running(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while is_running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if is_running(pid):
        raise SiteError(f"QEMU pid {pid} did not stop")
    pidfile.unlink(missing_ok=True)
    with contextlib.suppress(OSError, SiteError):
        qmp_path = Path(BootRecord.load(run_dir).qmp)
        qmp_path.unlink(missing_ok=True)
        if qmp_path.parent.name.startswith("imprint-qmp-"):
            qmp_path.parent.rmdir()
    return how


HOTPLUG_CHANNELS = seeds.HOTPLUG


def attach(run_dir: Path, channel: str, token: str, owners: Owners = ()) -> Artefact:
    """Hot-plug a token disk into a running VM (PCI hot-plug of a virtio-blk device)."""
    if channel not in HOTPLUG_CHANNELS:
        raise SiteError(f"only disks can be hot-plugged: {', '.join(HOTPLUG_CHANNELS)}")
    _token_mode(token)
    record = BootRecord.load(run_dir)
    if not is_running(record.pid):
        raise SiteError(f"the VM of {run_dir} is not running")
    artefact = seeds.build(channel, token, run_dir / f"hotplug-{channel}", owners)
    ident = "hp" + hashlib.sha256(str(artefact.path).encode()).hexdigest()[:8]
    readonly = "readonly=on" in " ".join(artefact.qemu_args)
    file = str(artefact.path.resolve()).replace(",", ",,")
    qmp = Qmp(record.qmp)
    try:
        qmp.command("human-monitor-command",
                    **{"command-line": f"drive_add 0 file={file},if=none,id={ident},format=raw"
                                       f"{',readonly=on' if readonly else ''}"})
        device: dict[str, Any] = {"driver": "virtio-blk-pci", "drive": ident, "id": f"dev-{ident}"}
        if artefact.serial is not None:
            device["serial"] = artefact.serial
        qmp.command("device_add", **device)
    finally:
        qmp.close()
    record.channel, record.artefact = channel, str(artefact.path)
    record.mode, record.token_id = _token_mode(token)
    record.owners = [str(address) for address in owners]
    record.save()
    return artefact
