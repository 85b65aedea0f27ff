"""The agent's systemd unit: `systemd-analyze verify` clean, hardening exposure bounded, and the
orderings and settings the boot path relies on."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "imprint-agent.service"
SSH_KEYS_UNIT = REPO / "image-build" / "files" / "ssh-hostkeys.service"
SYSTEM_UNITS = Path("/lib/systemd/system")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _root_with(tmp_path: Path, *units: Path) -> Path:
    """A root with the distribution's units, the agent's executable and our units, so verify
    resolves every dependency and checks ExecStart= (nothing runs)."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for binary in ("usr/local/bin/imprint-agent", "usr/local/bin/imprint", "usr/bin/ssh-keygen"):
        path = root / binary
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    return root


def _directives(unit: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
            continue
        key, _, value = line.partition("=")
        sections[current].setdefault(key, []).append(value)
    return sections


@pytest.mark.parametrize("unit", [UNIT, SSH_KEYS_UNIT], ids=lambda p: p.name)
def test_verify_is_clean(tmp_path: Path, unit: Path) -> None:
    root = _root_with(tmp_path, UNIT, SSH_KEYS_UNIT)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", unit.name],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_verify_would_catch_a_bad_directive(tmp_path: Path) -> None:
    """The clean verdict above means something: a typo is reported on stderr."""
    broken = tmp_path / "imprint-agent.service"
    broken.write_text(UNIT.read_text().replace("UMask=0077", "UMask=0077\nProtectSystm=strict"))
    root = _root_with(tmp_path, broken)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", broken.name],
                            capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ProtectSystm'" in result.stderr


def test_security_exposure_is_bounded(tmp_path: Path) -> None:
    root = _root_with(tmp_path, UNIT)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root}",
                             "--no-pager", UNIT.name], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for imprint-agent.service: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= 4.0  # README reports the figure; 10 is an unconfined root service


def test_unit_settings_the_boot_path_relies_on() -> None:
    unit = _directives(UNIT)
    service, head = unit["Service"], unit["Unit"]
    assert service["Type"] == ["notify"]
    assert service["Restart"] == ["on-failure"]
    assert service["TimeoutStartSec"] == ["infinity"]  # an unbound VM may wait for its token
    assert service["StandardOutput"] == ["journal+console"]
    assert service["LoadCredential"] == ["imprint.token", "imprint.owner"]  # the owner addresses (issue 12)
    assert service["StateDirectory"] == ["imprint"]
    # Started with the network, not after DHCP (the agent polls late channels); stopped before it.
    after = head["After"][0].split()
    assert "network.target" in after and "network-online.target" not in after and "Wants" not in head
    # No ordering cycle with cloud-init or sshd: the unit orders itself before nothing.
    assert "Before" not in head
    for value in head.get("After", []) + head.get("Requires", []):
        assert "ssh" not in value and "cloud-" not in value
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # The backends need these: no closed device list, modules loadable, /etc/ssh and /home writable.
    assert "DeviceAllow" not in service and "PrivateDevices" not in service
    assert "ProtectKernelModules" not in service and "CAP_SYS_MODULE" in service["CapabilityBoundingSet"][0]
    # The backends write /etc (useradd, sudoers.d, ssh, krb5.keytab, certificates): only /usr and
    # /boot are read-only, and no ReadWritePaths list has to track every backend.
    assert service["ProtectSystem"] == ["yes"] and "ReadWritePaths" not in service


def test_unit_parses_as_ini() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert parser.get("Service", "ExecStart") == "/usr/local/bin/imprint-agent run"


SERVE_UNIT = UNIT.parent / "imprint-serve.service"


def test_serve_unit_verifies_clean_and_is_confined(tmp_path: Path) -> None:
    """The owner's listener (issue 12): Type=notify (it sends READY=1 once listening), and far
    more confined than the agent, which must write much of /etc."""
    root = _root_with(tmp_path, SERVE_UNIT)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", SERVE_UNIT.name],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    assert _directives(SERVE_UNIT)["Service"]["Type"] == ["notify"]
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root}",
                             "--no-pager", SERVE_UNIT.name], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for imprint-serve.service: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    print(f"imprint-serve.service exposure: {match.group(1)}")
    assert float(match.group(1)) <= 2.5
