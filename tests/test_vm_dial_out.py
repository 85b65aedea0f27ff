"""The VM dials its owner, in real QEMU VMs (issue 12): the image of image-build/, unchanged,
booted by `imprint-site boot` with no host port forwarded to the agent, the owner address on
the boot channel beside the token (QEMU user networking reaches the host's loopback at
10.0.2.2). The VM dials `imprint serve` on the host, binds (one channel per mode), and the owner
logs in with `imprint ssh` trusting only the host key the agent attested over that connection.
"""

from __future__ import annotations

import os
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
