"""End to end in real QEMU VMs: one image, unchanged, booted by `imprint-site boot` on eight boot
channels in both modes; SSH logins trusting only the host key the agent attested; a reboot; a
corrupt token; no token, then a hot-plugged metadata disk.

Boots are slow under TCG (20-60 s), so every scenario runs whole (boot, bind, status, checks,
stop) in a pool of two workers, started when the first test asks for its result; tests then
assert on what their scenario recorded. No QEMU outlives the module: the fixture's teardown
stops every run directory by its pid file, also when a test failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from imprint.site.vm import ANSI_RE

from tests.helpers.owner import Owner
from tests.helpers.vm import Image, Site, console_tail, ensure_image, qemu_problem, sha256_file
from tests.sshkit import keygen, ssh

# The module's image build (cold: package downloads) and the boots exceed pytest.ini's 300 s.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

Result = dict[str, Any]

# scenario name -> (imprint-site seed channel, mode): 8 channel artefacts, 4 per mode
BIND_SCENARIOS: dict[str, tuple[str, str]] = {
    "nocloud-iso-shared": ("nocloud-iso", "shared"),          # cloud-init runs too: slowest first
    "config-2-iso-nosecret": ("config-2-iso", "nosecret"),
    "cmdline-nosecret": ("cmdline", "nosecret"),
    "fw_cfg-shared": ("fw_cfg", "shared"),
    "metadata-disk-nosecret": ("metadata-disk", "nosecret"),
    "imprint-seed-vfat-shared": ("imprint-seed-vfat", "shared"),
    "credentials-nosecret": ("credentials", "nosecret"),
    "imprint-seed-iso-shared": ("imprint-seed-iso", "shared"),
}
REBOOTED = "cmdline-nosecret"  # this scenario also reboots its VM
# These scenarios apply an SSH profile (one in each mode, one with `bind --profile`) and log in
# with the attested host key. The second also tries the first VM's attested host key against its
# own sshd: the first publishes its known_hosts before it stops (or None when it failed), and is
# submitted earlier, so the wait cannot deadlock the two-worker pool.
SSH_PUBLISHER, SSH_CHECKER = "config-2-iso-nosecret", "fw_cfg-shared"
SSH_USER = "owner"
ALONE_SCENARIO = "imprint-seed-iso-shared"  # test_zz_image_unchanged's own boot when it runs alone


class KnownHostsBoard:
    """The attested known_hosts lines one scenario hands to another."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lines: list[str] | None = None

    def publish(self, lines: list[str] | None) -> None:
        if not self._event.is_set():
            self._lines = lines
            self._event.set()

    def wait(self, timeout: float) -> list[str] | None:
        if not self._event.wait(timeout):
            raise AssertionError(f"{SSH_PUBLISHER} published no known_hosts within {timeout:.0f} s")
        return self._lines


def _token_file(tmp: Path, token: str) -> Path:
    path = tmp / "token.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return path


def _ssh_profile(tmp: Path) -> tuple[Path, Path]:
    identity = tmp / "id_owner"
    profile = tmp / "profile.toml"
    profile.write_text(f'[ssh]\nusers = [{{name = "{SSH_USER}", authorized_keys = ["{keygen(identity)}"]}}]\n')
    return identity, profile


def _ssh_checks(site: Site, owner: Owner, boot: Result, identity: Path, board: KnownHostsBoard,
                name: str) -> Result:
    """Log in with OpenSSH trusting only the attested key (by `imprint ssh` and by plain ssh), and,
    for the checker, try another VM's attested key for this address."""
    run_dir, port = Path(boot["run_dir"]), int(boot["ssh_port"])
    out: Result = {"sshd": site.wait_ssh(run_dir)}
    known_hosts = owner.home / "known_hosts" / "vm"
    out["known_hosts"] = known_hosts.read_text()
    login = ["-i", str(identity), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-F", "/dev/null"]
    out["imprint_ssh"] = owner.run("ssh", "vm", "-l", SSH_USER, "--", *login,
                                   "id -un; cat /etc/ssh/ssh_host_ed25519_key.pub", check=None)
    out["plain_ssh"] = ssh(port, known_hosts, identity, SSH_USER, "true")
    if name == SSH_PUBLISHER:
        board.publish([line for line in out["known_hosts"].splitlines() if line and not line.startswith("#")])
    else:
        other = board.wait(timeout=1200)
        assert other, f"{SSH_PUBLISHER} failed before it attested a host key"
        # The other VM's attested keys, claimed for this VM's address: a host that is not this VM.
        swapped = run_dir / "other_vm_known_hosts"
        swapped.write_text("".join(f"[127.0.0.1]:{port} {line.split(' ', 1)[1]}\n" for line in other))
        out["other_known_hosts"] = swapped.read_text()
        out["other_ssh"] = ssh(port, swapped, identity, SSH_USER, "true")
    return out


def _bind_scenario(site: Site, image: Image, tmp: Path, name: str, channel: str, mode: str,
                   board: KnownHostsBoard) -> Result:
    tmp.mkdir(parents=True)
    try:
        return _bind_scenario_body(site, image, tmp, name, channel, mode, board)
    finally:
        if name == SSH_PUBLISHER:
            board.publish(None)  # a no-op after a real publish; unblocks the checker on failure


def _bind_scenario_body(site: Site, image: Image, tmp: Path, name: str, channel: str, mode: str,
                        board: KnownHostsBoard) -> Result:
    owner = Owner.create(tmp / "owner")
    token = owner.token("vm", mode)
    boot = site.boot(image, name, "--channel", channel, "--token-file", str(_token_file(tmp, token)),
                     "--mode", mode)
    result: Result = {"boot": boot, "token": token}
    assert boot["status"] == "ready", f"{boot['status']}: {boot['detail']}\n{console_tail(Path(boot['run_dir']))}"
    args = ["bind", "vm", "--address", boot["agent_address"]]
    if mode == "nosecret":
        args += ["--vm-token", boot["vm_token"]]
    with_ssh = name in (SSH_PUBLISHER, SSH_CHECKER)
    if with_ssh:
        identity, profile = _ssh_profile(tmp)
        ssh_target = ["--ssh-port", str(boot["ssh_port"])]
        if name == SSH_CHECKER:  # the profile in the bind itself
            args += ["--profile", str(profile), *ssh_target]
    started = time.monotonic()
    result["bind"] = owner.json(*args)
    result["bind_seconds"] = time.monotonic() - started
    result["status"] = owner.json("status", "vm")
    if with_ssh:
        if name == SSH_PUBLISHER:  # a separate apply after the bind
            result["apply"] = owner.json("apply", "vm", "--profile", str(profile), *ssh_target)
        result["ssh"] = _ssh_checks(site, owner, boot, identity, board, name)
    result["console"] = (Path(boot["run_dir"]) / "console.log").read_text(errors="replace")
    if name == REBOOTED:
        again = site.reboot(boot, f"{name}-reboot")
        result["reboot"] = again
        result["reboot_status"] = owner.json("status", "vm", "--address", again["agent_address"])
        result["reboot_console"] = (Path(again["run_dir"]) / "console.log").read_text(errors="replace")
        site.stop(Path(again["run_dir"]))
    else:
        site.stop(Path(boot["run_dir"]))
    if boot.get("artefact"):
        result["artefact_after"] = Path(boot["artefact"]).read_bytes()
    return result


def _corrupt_scenario(site: Site, image: Image, tmp: Path) -> Result:
    tmp.mkdir(parents=True)
    owner = Owner.create(tmp / "owner")
    token = owner.token("vm", "shared")
    kind, body = token.split("-", 1)
    corrupt = f"{kind}-{'b' if body[5] != 'b' else 'c'}{body[:5]}{body[6:]}"  # one substituted character
    boot = site.boot(image, "corrupt", "--append", f"imprint.token={corrupt}", check=False)
    site.stop(Path(boot["run_dir"]))
    return {"boot": boot, "console": (Path(boot["run_dir"]) / "console.log").read_text(errors="replace")}


def _late_scenario(site: Site, image: Image, tmp: Path) -> Result:
    """No token at boot: the agent waits and says so; the site hot-plugs the metadata disk."""
    tmp.mkdir(parents=True)
    owner = Owner.create(tmp / "owner")
    token = owner.token("vm", "shared")
    boot = site.boot(image, "late")
    run_dir = Path(boot["run_dir"])
    waiting_console = (run_dir / "console.log").read_text(errors="replace")
    attached = site.attach(run_dir, "--channel", "metadata-disk", "--token-file", str(_token_file(tmp, token)))
    bind = owner.json("bind", "vm", "--address", boot["agent_address"])
    status = owner.json("status", "vm")
    site.stop(run_dir)
    return {"boot": boot, "waiting_console": waiting_console, "attached": attached, "bind": bind,
            "status": status, "console": (run_dir / "console.log").read_text(errors="replace")}


def console_text_of(raw: str) -> str:
    return ANSI_RE.sub("", raw).replace("\r", "")


class Farm:
    def __init__(self, site: Site, image: Image, base: Path) -> None:
        self.site, self.image, self.base = site, image, base
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vm")
        self.futures: dict[str, Future[Result]] = {}
        self.board = KnownHostsBoard()
        self.started = time.monotonic()

    def jobs(self) -> dict[str, Callable[[], Result]]:
        jobs: dict[str, Callable[[], Result]] = {}
        for name, (channel, mode) in BIND_SCENARIOS.items():
            jobs[name] = (lambda n=name, c=channel, m=mode:
                          _bind_scenario(self.site, self.image, self.base / n, n, c, m, self.board))
            if name == "fw_cfg-shared":  # interleave the special scenarios with the bind ones
                jobs["late"] = lambda: _late_scenario(self.site, self.image, self.base / "late")
                jobs["corrupt"] = lambda: _corrupt_scenario(self.site, self.image, self.base / "corrupt")
        return jobs

    def start_all(self) -> None:
        for name, job in self.jobs().items():
            self.futures[name] = self.pool.submit(job)

    def start_one(self, name: str) -> None:
        self.futures[name] = self.pool.submit(self.jobs()[name])

    def result(self, name: str) -> Result:
        if not self.futures:
            self.start_all()
        return self.futures[name].result(timeout=1500)

    def close(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.site.stop_all()


@pytest.fixture(scope="module")
def vm_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Image, str]]:
    problem = qemu_problem()
    if problem:
        print(f"VM tests skipped: {problem}")
        pytest.skip(problem)
    log = tmp_path_factory.mktemp("image") / "build.log"
    image = ensure_image(log)
    yield image, sha256_file(image.base)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # pytest then runs the teardown that stops the VMs


@pytest.fixture(scope="module")
def farm(vm_image: tuple[Image, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    base = Path(os.environ.get("IMPRINT_VM_RUNS") or tmp_path_factory.mktemp("vms"))
    farm = Farm(Site(base / "runs"), vm_image[0], base / "scenarios")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield farm
    finally:
        signal.signal(signal.SIGTERM, previous)
        farm.close()
        print(f"\nVM scenarios took {time.monotonic() - farm.started:.0f} s")


def test_image_has_nothing_site_specific(vm_image: tuple[Image, str], tmp_path: Path) -> None:
    """No token, key, address or host key in the image; the unit enabled; the agent installed."""
    image, _ = vm_image
    raw = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image.base), str(raw)], check=True, timeout=300)

    def debugfs(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True,
                              timeout=120).stdout

    ssh = debugfs("ls /etc/ssh")
    assert "sshd_config" in ssh and "ssh_host_" not in ssh
    assert debugfs("cat /etc/machine-id") == ""
    assert "nameserver" not in debugfs("cat /etc/resolv.conf")
    assert "File not found" in subprocess.run(["debugfs", "-R", "stat /var/lib/imprint", str(raw)],
                                              capture_output=True, text=True, timeout=60).stderr
    assert "imprint-agent.service" in debugfs("ls /etc/systemd/system/multi-user.target.wants")
    assert "imprint-agent.service" in debugfs("ls /usr/local/lib/systemd/system")
    assert "imprint" in debugfs("ls /usr/local/lib/python3.11/dist-packages")
    assert "imprint-agent" in debugfs("ls /usr/local/bin")
    assert "imprint" not in debugfs("ls /etc/systemd/system/multi-user.target.wants").replace(
        "imprint-agent.service", "")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image.bare), str(raw)], check=True, timeout=300)
    assert "imprint" not in debugfs("ls /usr/local/bin")
    manifest = image.manifest()
    print(f"image sizes: {manifest['rootfs_bytes']}, qcow2 base {manifest['files']['base.qcow2']['bytes']} bytes")


@pytest.mark.parametrize("name", list(BIND_SCENARIOS))
def test_binds_on_channel(farm: Farm, name: str) -> None:
    channel, mode = BIND_SCENARIOS[name]
    result = farm.result(name)
    boot, bind, status = result["boot"], result["bind"], result["status"]
    agent_channel = channel.removesuffix("-iso").removesuffix("-vfat")
    assert f"token (id {boot['token_id']}) on {agent_channel}" in result["console"]
    assert bind["mode"] == mode
    assert status["state"] == "bound"
    assert status["vm_fingerprint"] == bind["vm_fingerprint"]
    if mode == "nosecret":
        assert boot["vm_token"] and boot["vm_token"] in result["console"]
        expected = "metadata disk reply area" if channel == "metadata-disk" else "serial console"
        assert boot["vm_token_source"] == expected
    else:
        assert boot["vm_token"] is None
    if channel == "imprint-seed-vfat":  # the agent wiped K from the writable seed after the bind
        secret = result["token"].split("-", 1)[1].encode()
        assert secret not in result["artefact_after"]
        assert "K wiped from: imprint-seed" in result["console"]
    print(f"{name}: {boot['accel']} boot to ready {boot['seconds_to_status']} s, bind {result['bind_seconds']:.2f} s")


def test_each_mode_three_times_on_six_channel_types() -> None:
    modes = [mode for _, mode in BIND_SCENARIOS.values()]
    kinds = {channel.removesuffix("-iso").removesuffix("-vfat") for channel, _ in BIND_SCENARIOS.values()}
    assert modes.count("shared") >= 3 and modes.count("nosecret") >= 3
    assert {"cmdline", "nocloud", "config-2", "imprint-seed", "metadata-disk"} <= kinds
    assert kinds & {"fw_cfg", "credentials"} and len(kinds) >= 6


@pytest.mark.parametrize("name", [SSH_PUBLISHER, SSH_CHECKER])
def test_ssh_login_with_attested_host_key(farm: Farm, name: str) -> None:
    """`imprint ssh` and plain OpenSSH with StrictHostKeyChecking=yes and only the owner's
    known_hosts log in; the key they trusted is the VM's own host key."""
    result = farm.result(name)
    checks = result["ssh"]
    applied = result["bind"]["apply"] if name == SSH_CHECKER else result["apply"]
    assert applied["ok"] and applied["results"]["ssh"]["ok"], applied
    port = result["boot"]["ssh_port"]
    attested = [line for line in checks["known_hosts"].splitlines() if line and not line.startswith("#")]
    assert attested and all(line.startswith(f"[127.0.0.1]:{port} ssh-") for line in attested)
    login = checks["imprint_ssh"]
    assert login.returncode == 0, login.stderr
    user, host_key = login.stdout.strip().splitlines()
    assert user == SSH_USER
    # What sshd in the VM holds is exactly what the agent attested over the pinned channel.
    assert host_key.split()[:2] in [line.split()[1:3] for line in attested]
    assert checks["plain_ssh"].returncode == 0, checks["plain_ssh"].stderr


def test_ssh_refuses_another_vms_host_key(farm: Farm) -> None:
    """Another VM's attested key, claimed for this VM's address, is refused by OpenSSH."""
    checks = farm.result(SSH_CHECKER)["ssh"]
    publisher = farm.result(SSH_PUBLISHER)["ssh"]
    published = {tuple(line.split()[1:3]) for line in publisher["known_hosts"].splitlines()
                 if line and not line.startswith("#")}
    tried = {tuple(line.split()[1:3]) for line in checks["other_known_hosts"].splitlines()}
    assert tried and tried == published
    own = {tuple(line.split()[1:3]) for line in checks["known_hosts"].splitlines() if line and not line.startswith("#")}
    assert not tried & own  # two VMs, two different host keys
    refused = checks["other_ssh"]
    assert refused.returncode == 255
    assert "Host key verification failed" in refused.stderr
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr


def test_reboot_keeps_key_and_does_not_wait(farm: Farm) -> None:
    result = farm.result(REBOOTED)
    again = result["reboot"]
    assert result["reboot"]["previous_stop"] == "powered down"  # a clean guest shutdown
    assert again["status"] == "ready", again["detail"]
    assert again["channel"] is None  # rebooted with no token on any channel
    console = result["reboot_console"]
    assert "already bound to owner" in console and "not looking for a token" in console
    assert "waiting for a token" not in console
    assert "bound, serving the pinned owner" in again["detail"]
    assert result["reboot_status"]["vm_fingerprint"] == result["bind"]["vm_fingerprint"]
    print(f"reboot to ready: {again['seconds_to_status']} s")


def test_corrupt_token_fails_clearly(farm: Farm) -> None:
    result = farm.result("corrupt")
    boot = result["boot"]
    assert boot["status"] == "failed", boot
    assert "boot channel cmdline is broken" in boot["detail"] and "corrupt" in boot["detail"]
    assert "boot channel cmdline is broken" in result["console"]
    assert "Failed to start imprint-agent.service - imprint agent" in console_text_of(result["console"])


def test_no_token_waits_then_binds_after_hotplug(farm: Farm) -> None:
    result = farm.result("late")
    assert result["boot"]["status"] == "waiting"
    assert "imprint-agent: waiting for a token on: cmdline" in result["waiting_console"]
    assert result["attached"]["status"] == "ready"
    assert "on metadata-disk" in result["console"]
    assert result["bind"]["mode"] == "shared"
    assert result["status"]["vm_fingerprint"] == result["bind"]["vm_fingerprint"]


def test_zz_image_unchanged(farm: Farm, vm_image: tuple[Image, str]) -> None:
    """After every boot above, the base image is byte for byte what image-build/build.sh wrote
    (its manifest's digest) and what it was when this run began. Run alone, the test boots and
    binds one VM itself first: without a boot there is nothing that could have changed it."""
    alone = not farm.futures
    if alone:
        farm.start_one(ALONE_SCENARIO)
    for future in list(farm.futures.values()):
        future.exception(timeout=1500)
    if alone:
        assert farm.result(ALONE_SCENARIO)["status"]["state"] == "bound"
    image, before = vm_image
    after = sha256_file(image.base)
    assert after == before, "a boot changed the base image"
    assert after == image.manifest()["files"]["base.qcow2"]["sha256"], "the base image is not what build.sh wrote"
