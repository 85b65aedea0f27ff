"""The VM dials its owner, in real QEMU VMs (issue 12): the image of image-build/, unchanged,
booted by `imprint-site boot` with no host port forwarded to the agent, the owner address on
the boot channel beside the token (QEMU user networking reaches the host's loopback at
10.0.2.2). The VM dials `imprint serve` on the host, binds (one channel per mode), and the owner
logs in with `imprint ssh` trusting only the host key the agent attested over that connection.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from imprint.owner import viaserve

from tests.helpers.owner import Owner
from tests.helpers.serve import Serve
from tests.helpers.vm import Image, Site, console_tail
from tests.sshkit import free_port, keygen
from tests.test_vm_boot import vm_image  # noqa: F401  (the module's image fixture)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

# scenario -> (imprint-site seed channel, mode): one channel per mode
DIAL_SCENARIOS = {"cmdline-shared": ("cmdline", "shared"),
                  "imprint-seed-vfat-nosecret": ("imprint-seed-vfat", "nosecret")}
BOUND_WITHIN = 600.0  # TCG: the agent dials once it is up; a bind under emulation takes seconds
HOST_FROM_GUEST = "10.0.2.2"  # QEMU user networking: the host's 127.0.0.1


def _scenario(site: Site, image: Image, tmp: Path, name: str, channel: str, mode: str) -> dict[str, Any]:
    tmp.mkdir(parents=True)
    owner = Owner.create(tmp / "owner")
    serve = Serve(owner, free_port(), tmp / "serve.log").start()
    try:
        token = owner.token("vm", mode)
        token_file = tmp / "token.txt"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        boot = site.boot(image, name, "--channel", channel, "--token-file", str(token_file), "--mode", mode,
                         "--owner", f"{HOST_FROM_GUEST}:{serve.port}", "--no-agent-port")
        out: dict[str, Any] = {"boot": boot}
        assert boot["status"] == "ready", f"{boot['status']}: {boot['detail']}\n{console_tail(Path(boot['run_dir']))}"
        if mode == "nosecret":
            out["given"] = owner.json("bind", "vm", "--vm-token", boot["vm_token"])
        # The listener wakes this wait when the VM is bound and connected: no polling.
        out["connected"] = viaserve.await_connected(owner.home, ["vm"], BOUND_WITHIN)
        (out["record"],) = owner.json("list")["vms"]
        out["serve_log"] = serve.log.read_text(errors="replace")
        if out["record"]["state"] != "bound":
            return out
        out["status"] = owner.json("status", "vm")
        identity = tmp / "id_owner"
        profile = tmp / "profile.toml"
        profile.write_text(f'[ssh]\nusers = [{{name = "owner", authorized_keys = ["{keygen(identity)}"]}}]\n')
        out["apply"] = owner.json("apply", "vm", "--profile", str(profile), "--ssh-port", str(boot["ssh_port"]))
        out["sshd"] = site.wait_ssh(Path(boot["run_dir"]))
        out["known_hosts"] = (owner.home / "known_hosts" / "vm").read_text()
        login = ["-i", str(identity), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-F", "/dev/null"]
        out["ssh"] = owner.run("ssh", "vm", "-l", "owner", "--", *login, "id -un", check=None)
        out["qemu_args"] = " ".join(boot.get("qemu_args") or [])
        return out
    finally:
        serve.kill()
        if "boot" in locals():
            site.stop(Path(boot["run_dir"]))


def _console_count(run_dir: Path, text: str) -> int:
    from imprint.site.vm import console_text

    return console_text(run_dir / "console.log").count(text)


def _release_scenario(site: Site, image: Image, tmp: Path) -> dict[str, Any]:
    """Issue 13: a VM bound to one owner is released, starts again and waits; the site
    hot-plugs a metadata disk with another owner's token, and that owner binds it."""
    tmp.mkdir(parents=True)
    first, second = Owner.create(tmp / "first"), Owner.create(tmp / "second")
    token = first.token("vm", "shared")
    token_file = tmp / "token.txt"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    boot = site.boot(image, "release", "--channel", "cmdline", "--token-file", str(token_file), "--mode", "shared")
    run_dir = Path(boot["run_dir"])
    out: dict[str, Any] = {"boot": boot}
    try:
        assert boot["status"] == "ready", f"{boot['status']}: {boot['detail']}\n{console_tail(run_dir)}"
        out["bind"] = first.json("bind", "vm", "--address", boot["agent_address"])
        out["release"] = first.json("release", "vm")
        new_token = tmp / "new-token.txt"
        new_token.write_text(second.token("vm", "shared") + "\n")
        new_token.chmod(0o600)
        ready_before = _console_count(run_dir, "(waiting for the owner to bind)")
        out["attached"] = site.attach(run_dir, "--channel", "metadata-disk", "--token-file", str(new_token),
                                      "--no-wait")
        deadline = time.monotonic() + BOUND_WITHIN  # the site's own console watch polls the same way
        while _console_count(run_dir, "(waiting for the owner to bind)") <= ready_before:
            assert time.monotonic() < deadline, console_tail(run_dir)
            threading.Event().wait(0.5)
        out["rebind"] = second.json("bind", "vm", "--address", boot["agent_address"])
        out["first_status"] = first.run("status", "vm", check=None)
        out["console"] = (run_dir / "console.log").read_text(errors="replace")
        return out
    finally:
        site.stop(run_dir)


@pytest.fixture(scope="module")
def released(vm_image: tuple[Image, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    base = tmp_path_factory.mktemp("release-vm")
    site = Site(base / "runs")
    try:
        return _release_scenario(site, vm_image[0], base / "scenario")
    finally:
        site.stop_all()


def test_a_released_vm_is_bound_by_a_new_owner_with_a_new_token(released: dict[str, Any]) -> None:
    assert released["release"]["released"] is True
    assert released["rebind"]["owner_fingerprint"] != released["bind"]["owner_fingerprint"]
    assert released["rebind"]["vm_fingerprint"] == released["bind"]["vm_fingerprint"]  # kept its key (no --wipe)
    assert released["first_status"].returncode == 2  # the first owner's pin is gone
    assert "released by its owner: waiting for a new token" in released["console"]


@pytest.fixture(scope="module")
def dialled(vm_image: tuple[Image, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    base = tmp_path_factory.mktemp("dial-vms")
    site = Site(base / "runs")
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(_scenario, site, vm_image[0], base / name, name, channel, mode)
                       for name, (channel, mode) in DIAL_SCENARIOS.items()}
            return {name: future.result(timeout=1500) for name, future in futures.items()}
    finally:
        site.stop_all()


@pytest.mark.parametrize("name", list(DIAL_SCENARIOS))
def test_vm_with_no_agent_port_dials_binds_and_ssh_trusts_the_attested_key(dialled: dict[str, Any],
                                                                            name: str) -> None:
    out = dialled[name]
    boot = out["boot"]
    assert boot["agent_address"] == "" and ":7443" not in out["qemu_args"], "a host port reached the agent"
    assert out["record"]["state"] == "bound", f"not bound by the listener:\n{out['serve_log']}"
    assert out["connected"] == ["vm"]
    assert "dialled in from" in out["serve_log"]
    status = out["status"]
    assert status["state"] == "bound" and "dialled in" in status["address"]
    assert out["apply"]["results"]["ssh"]["ok"], out["apply"]
    assert "ssh-ed25519" in out["known_hosts"]
    assert out["ssh"].returncode == 0 and out["ssh"].stdout.strip() == "owner", out["ssh"].stderr
