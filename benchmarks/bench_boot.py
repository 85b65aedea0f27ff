"""Boot benchmark in real QEMU VMs (the image of image-build/build.sh, started by `imprint-site boot`).

Three variants of the same image, booted one at a time (so the figures do not disturb each other),
each --runs times:

  imprint     base.qcow2, a no-secrets token on the kernel command line: boot-to-ready (the agent
              listens and has published its VM token), boot-to-bound (the owner's `imprint bind`
              returned after relaying the VM token from the console), boot-to-sshd (SSH banner).
  no-imprint  the same image with the agent unit masked (systemd.mask=imprint-agent.service) and no
              token: boot-to-sshd. The baseline.
  cloud-init  the agent masked, and a NoCloud seed whose user-data installs an SSH authorized key
              (cloud-init's equivalent key job): boot-to-sshd (sshd is ordered after cloud-init's
              init stage, which writes the key and the host key).

Times are wall-clock from QEMU's start. "Added" is a variant's boot-to-X minus the baseline's
boot-to-sshd. Goal (issue 5): what the agent adds <= 1/5 of what cloud-init adds.

    .venv/bin/python benchmarks/bench_boot.py [--runs 3] [--accel auto|tcg|kvm]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
USER = "bench"
sys.path.insert(0, str(REPO))

from imprint.backends.ssh.owner import known_hosts_file  # noqa: E402
from imprint.channels._images import iso_image  # noqa: E402
from imprint.owner.home import OwnerHome  # noqa: E402
from imprint.site import vm  # noqa: E402

from tests.helpers.owner import Owner  # noqa: E402
from tests.helpers.vm import Image, ensure_image  # noqa: E402


def ssh_banner_time(port: int, started: float, stop: threading.Event, out: dict[str, float]) -> None:
    """Polls the forwarded SSH port until sshd sends its banner (user networking accepts the TCP
    connection at once and resets it while nothing listens in the guest)."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(2)
                if sock.recv(16).startswith(b"SSH-"):
                    out["sshd"] = time.time() - started
                    return
        except OSError:
            pass
        stop.wait(0.2)


def ssh_login(port: int, identity: Path, known_hosts: Path | None, deadline: float) -> None:
    """Log in as USER and run `true`: with the attested known_hosts and StrictHostKeyChecking=yes
    (imprint), or trusting the first key shown (cloud-init, which attests nothing). Retried until
    the user exists and sshd accepts (bounded)."""
    trust = (["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"] if known_hosts
             else ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", *trust, "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-i", str(identity), "-o", "ConnectTimeout=10", "-p", str(port),
            "-l", USER, "127.0.0.1", "true"]
    while True:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode == 0:
            return
        if "Host key verification failed" in result.stderr:
            raise RuntimeError(f"ssh refused the VM's host key: {result.stderr.strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SSH login before the deadline: {result.stderr.strip()}")
        time.sleep(0.5)


def boot_once(image: Image, variant: str, run_dir: Path, accel: str, cpus: int, tmp: Path) -> dict[str, Any]:
    owner: Owner | None = None
    channel = token = None
    append = ""
    extra: list[str] = []
    identity = tmp / f"key-{run_dir.name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(identity)], check=True)
    public = identity.with_suffix(".pub").read_text().strip()
    if variant == "imprint":
        owner = Owner.create(tmp / f"owner-{run_dir.name}")
        token = owner.token("vm", "nosecret")
        channel = "cmdline"
        profile = tmp / f"profile-{run_dir.name}.toml"
        profile.write_text(f'[ssh]\nusers = [{{name = "{USER}", authorized_keys = ["{public}"]}}]\n')
    else:
        append = "systemd.mask=imprint-agent.service"
    if variant == "cloud-init":
        user_data = f"#cloud-config\nusers:\n  - name: {USER}\n    ssh_authorized_keys:\n      - {public}\n"
        seed = tmp / f"seed-{run_dir.name}.iso"
        seed.write_bytes(iso_image("cidata", {
            "/meta-data": f"instance-id: bench-{run_dir.name}\nlocal-hostname: bench\n".encode(),
            "/user-data": user_data.encode()}))
        extra = ["-drive", f"file={seed},if=virtio,format=raw,readonly=on"]
    record = vm.boot(image=image.base, kernel=image.dir / "vmlinuz", initrd=image.dir / "initrd.img",
                     run_dir=run_dir, channel=channel, token=token, accel=accel, cpus=cpus, append=append,
                     extra_qemu=extra)
    stop = threading.Event()
    times: dict[str, float] = {}
    poller = threading.Thread(target=ssh_banner_time, args=(record.ssh_port, record.started_at, stop, times))
    poller.start()
    deadline = time.monotonic() + 600
    try:
        if owner is not None:
            record = vm.follow(record, timeout=600, until=("ready", "failed"))
            if record.status != "ready":
                raise RuntimeError(f"{variant}: {record.status}: {record.detail}")
            times["ready"] = record.seconds_to_status or 0.0
            owner.run("bind", "vm", "--address", record.agent_address, "--vm-token", record.vm_token or "")
            times["bound"] = time.time() - record.started_at
            used = re.search(r"start-up used ([0-9.]+) s of CPU", vm.console_text(Path(record.console)))
            if used:
                times["agent_cpu"] = float(used.group(1))
            owner.run("apply", "vm", "--profile", str(profile), "--ssh-port", str(record.ssh_port))
            times["attested"] = time.time() - record.started_at
        poller.join(timeout=600)
        if "sshd" not in times:
            raise RuntimeError(f"{variant}: no SSH banner within 600 s")
        if variant != "no-imprint":
            known_hosts = known_hosts_file(OwnerHome(owner.home), "vm") if owner is not None else None
            ssh_login(record.ssh_port, identity, known_hosts, deadline)
            times["ssh_login"] = time.time() - record.started_at
        if variant == "cloud-init":
            text = vm.console_text(Path(record.console))
            times["cloud_init_ran"] = float("Cloud-init v." in text or "cloud-init" in text)
    finally:
        stop.set()
        poller.join(timeout=10)
        vm.stop(run_dir)
    return {"variant": variant, "accel": record.accel, **times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--cpus", type=int, default=1, help="vCPUs of every VM (default 1)")
    parser.add_argument("--variants", default="no-imprint,imprint,cloud-init",
                        help="comma-separated subset (the ratio needs all three)")
    args = parser.parse_args()
    image = ensure_image()
    manifest = image.manifest()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="imprint-bench-boot-") as tmpdir:
        tmp = Path(tmpdir)
        for run in range(args.runs):
            for variant in args.variants.split(","):
                result = boot_once(image, variant, tmp / f"{variant}-{run}", args.accel, args.cpus, tmp)
                print(json.dumps(result), flush=True)
                results.append(result)

    def median(variant: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results if r["variant"] == variant))

    if {"no-imprint", "imprint", "cloud-init"} - set(args.variants.split(",")):
        for variant in args.variants.split(","):
            keys = sorted({k for r in results if r["variant"] == variant for k in r if isinstance(r[k], float)})
            print(variant, {k: round(median(variant, k), 2) for k in keys})
        return 0

    base = median("no-imprint", "sshd")
    rows = [
        ("no-imprint: boot to sshd (baseline)", base, 0.0),
        ("imprint: boot to sshd", median("imprint", "sshd"), median("imprint", "sshd") - base),
        ("imprint: boot to agent ready (VM token on the console)", median("imprint", "ready"),
         median("imprint", "ready") - base),
        ("imprint: boot to bound (owner's bind returned)", median("imprint", "bound"),
         median("imprint", "bound") - base),
        ("imprint: boot to verified SSH login (attested host key, StrictHostKeyChecking=yes)",
         median("imprint", "ssh_login"), median("imprint", "ssh_login") - base),
        ("cloud-init SSH-key job: boot to sshd", median("cloud-init", "sshd"), median("cloud-init", "sshd") - base),
        ("cloud-init SSH-key job: boot to SSH login (host key trusted on first use)",
         median("cloud-init", "ssh_login"), median("cloud-init", "ssh_login") - base),
    ]
    accel = results[0]["accel"]
    print(f"\nmedians of {args.runs} boots each, accelerator {accel}, wall clock from QEMU start")
    for label, value, added in rows:
        print(f"  {label:<84} {value:6.1f} s   added {added:+5.1f} s")
    agent_added = median("imprint", "bound") - base
    cloud_added = median("cloud-init", "sshd") - base
    ratio = agent_added / cloud_added if cloud_added > 0 else float("inf")
    verdict = "PASS" if ratio <= 0.2 else "MISS"
    print(f"  agent adds {agent_added:.1f} s to reach bound; cloud-init adds {cloud_added:.1f} s: "
          f"ratio {ratio:.2f} (goal <= 0.20): {verdict}")
    login_ratio = (median("imprint", "ssh_login") - base) / (median("cloud-init", "ssh_login") - base)
    print(f"  to an SSH login: imprint adds {median('imprint', 'ssh_login') - base:.1f} s (verified host key), "
          f"cloud-init {median('cloud-init', 'ssh_login') - base:.1f} s (TOFU): ratio {login_ratio:.2f}")
    sizes = {"base_qcow2": manifest["files"]["base.qcow2"]["bytes"],
             "bare_qcow2": manifest["files"]["bare.qcow2"]["bytes"],
             "rootfs_bytes": manifest["rootfs_bytes"]}
    print(f"  image size: with imprint {sizes['base_qcow2'] / 2**20:.1f} MiB qcow2, without "
          f"{sizes['bare_qcow2'] / 2**20:.1f} MiB; imprint's files {sizes['rootfs_bytes']['imprint'] / 2**10:.0f} KiB")
    print(json.dumps({"accel": accel, "runs": args.runs, "results": results, "sizes": sizes, "ratio": ratio,
                      "login_ratio": login_ratio, "cpus": args.cpus}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
