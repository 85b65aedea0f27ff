"""Packer: the template validates with Debian 12's packer 1.6.6 (always), and a real `packer build`
bakes imprint into the bare image, which then boots and binds (marked slow and vm; CI runs it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.owner import Owner
from tests.helpers.vm import REPO, Site, console_tail, ensure_image, qemu_problem

TEMPLATE = REPO / "packer" / "imprint.pkr.hcl"


def _packer() -> str:
    path = shutil.which("packer")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "packer"],
                       capture_output=True, timeout=600)
        path = shutil.which("packer")
    if path is None:
        pytest.skip("packer is not installed and could not be installed (Debian: apt-get install packer)")
    return path


def test_packer_validate(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("base.qcow2", "vmlinuz", "initrd.img", "seed.iso", "id", "x.whl")}
    for path in files.values():
        path.write_bytes(b"")
    files["id"].unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(files["id"])], check=True, timeout=60)
    result = subprocess.run(
        [_packer(), "validate",
         "-var", f"base_image={files['base.qcow2']}", "-var", f"kernel={files['vmlinuz']}",
         "-var", f"initrd={files['initrd.img']}", "-var", f"seed_iso={files['seed.iso']}",
         "-var", f"ssh_private_key_file={files['id']}", "-var", f"wheel={files['x.whl']}", str(TEMPLATE)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    version = subprocess.run([_packer(), "version"], capture_output=True, text=True, timeout=60).stdout
    print(version.strip())


def test_packer_rejects_a_broken_template(tmp_path: Path) -> None:
    """validate is not a no-op: a missing required variable fails."""
    result = subprocess.run([_packer(), "validate", str(TEMPLATE)], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode != 0


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.timeout(1800)
def test_packer_build_bakes_an_image_that_binds(tmp_path: Path) -> None:
    problem = qemu_problem()
    if problem:
        pytest.skip(problem)
    _packer()
    image = ensure_image()
    out = tmp_path / "packer-out"
    started = time.monotonic()
    # Its own session: on a timeout or an interrupt the whole group (packer and its QEMU) is killed.
    proc = subprocess.Popen(["bash", str(REPO / "packer/build.sh"), "--image-dir", str(image.dir), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - started
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    assert "imprint baked in" in stdout
    print(f"packer build: {took:.0f} s")
    # generalized: the build's SSH key, host keys, machine-id and any imprint state are gone
    raw = tmp_path / "imprint.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out / "imprint.qcow2"), str(raw)], check=True, timeout=300)

    def debugfs(request: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True, timeout=120)

    assert "ssh_host_" not in debugfs("ls /etc/ssh").stdout
    assert "File not found" in debugfs("stat /root/.ssh/authorized_keys").stderr
    assert "File not found" in debugfs("stat /var/lib/imprint").stderr
    assert debugfs("cat /etc/machine-id").stdout == ""
    assert "imprint-agent.service" in debugfs("ls /etc/systemd/system/multi-user.target.wants").stdout
    raw.unlink()

    site = Site(tmp_path / "runs")
    owner = Owner.create(tmp_path / "owner")
    token = owner.token("vm", "nosecret")
    try:
        run_dir = site.new_run_dir("packer")
        result = subprocess.run([sys.executable, "-m", "imprint.site", "boot", "--image", str(out / "imprint.qcow2"),
                                 "--run-dir", str(run_dir), "--channel", "cmdline", "--token", token,
                                 "--timeout", "400"], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr + console_tail(run_dir)
        boot = json.loads(result.stdout)
        owner.run("bind", "vm", "--address", boot["agent_address"], "--vm-token", boot["vm_token"])
        assert owner.json("status", "vm")["state"] == "bound"
    finally:
        site.stop_all()
