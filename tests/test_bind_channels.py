"""The full agent + owner bind once per boot channel, both modes; the reverse token is taken from
the console file or the metadata disk's reply area by `imprint-site reverse`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from imprint.channels import fwcfg
from imprint.site import seeds

from tests.helpers import AgentFactory, Owner

# channel -> how a test root exposes the artefact `imprint-site seed` built
Attach = Callable[[Path, Path], None]


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _attach_cmdline(root: Path, artefact: Path) -> None:
    (root / "proc/cmdline").write_text(f"console=ttyS0 ro {artefact.read_text().strip()}\n")


def _attach_fw_cfg(root: Path, artefact: Path) -> None:
    raw = root / "sys/firmware/qemu_fw_cfg/by_name" / fwcfg.ENTRY / "raw"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(artefact.read_bytes())


def _attach_credentials(root: Path, artefact: Path) -> None:
    directory = root / "run/credentials/@system"
    directory.mkdir(parents=True)
    (directory / "imprint.token").write_bytes(artefact.read_bytes())


def _attach_metadisk(root: Path, artefact: Path) -> None:
    _symlink(root / "dev/disk/by-id/virtio-imprint", artefact)


def _attach_label(label: str) -> Attach:
    def attach(root: Path, artefact: Path) -> None:
        _symlink(root / "dev/disk/by-label" / label, artefact)
    return attach


# seed artefact name (imprint-site seed --channel) -> how the test root exposes it
CHANNELS: dict[str, Attach] = {
    "cmdline": _attach_cmdline,
    "credentials": _attach_credentials,
    "fw_cfg": _attach_fw_cfg,
    "metadata-disk": _attach_metadisk,
    "imprint-seed-iso": _attach_label("IMPRINT"),
    "imprint-seed-vfat": _attach_label("IMPRINT"),
    "nocloud-iso": _attach_label("cidata"),
    "nocloud-vfat": _attach_label("CIDATA"),
    "config-2-iso": _attach_label("config-2"),
    "config-2-vfat": _attach_label("CONFIG-2"),
}
# the channel name the agent reports for each artefact
CHANNEL_OF = {name: name.removesuffix("-iso").removesuffix("-vfat") for name in CHANNELS}


def test_every_artefact_the_site_builds_is_bound_here() -> None:
    # The artefacts come from the channel registry; a new one gets a bind test by being listed
    # above. credentials-smbios cannot be attached to a test root (systemd reads it from the DMI
    # tables); test_channels_local checks what it writes and that QEMU loads it.
    assert set(seeds.ARTEFACTS) == {*CHANNELS, "credentials-smbios"}


def _reverse(source: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "imprint.site", "reverse", "--from", str(source)],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
@pytest.mark.parametrize("channel", list(CHANNELS))
def test_bind_over_channel(agents: AgentFactory, owner: Owner, tmp_path: Path, channel: str, mode: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    token = owner.token("web1", mode)
    artefact = tmp_path / f"artefact-{channel}"
    subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", channel, "--token", token,
                    "--out", str(artefact)], check=True, capture_output=True)
    root = agents.make_root(None)
    CHANNELS[channel](root, artefact)
    agent = agents.start(root)
    assert f"on {CHANNEL_OF[channel]}" in agent.log()

    args = ["bind", "web1", "--address", agent.address]
    if mode == "nosecret":
        source = artefact if channel == "metadata-disk" else agent.console
        vm_token = _reverse(source)
        assert vm_token == agent.vm_token()
        args += ["--vm-token", vm_token]
    owner.run(*args)
    assert agent.state()["bound"] is True

    secret = token.split("-", 1)[1].encode()
    if channel in ("metadata-disk", "imprint-seed-vfat") and mode == "shared":
        # K is wiped from the channels the agent can write.
        assert secret not in artefact.read_bytes()
        assert f"K wiped from: {CHANNEL_OF[channel]}" in agent.log()
    assert os.path.exists(root / "var/lib/imprint/owner.crt")


def test_token_arriving_late_is_waited_for(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    """No token at boot: the agent says what it waits for, then binds once the site hot-plugs
    the metadata disk."""
    token = owner.token("web1", "shared")
    root = agents.make_root(None)
    agent = agents.start(root, expect_ready=False)
    assert "STATUS=waiting for a token on: cmdline" in agent.notify.recv(4096).decode()
    image = tmp_path / "meta.img"
    subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", "metadata-disk", "--token", token,
                    "--out", str(image)], check=True, capture_output=True)
    _attach_metadisk(root, image)
    agent.port = agents.await_ready(agent)
    assert "waiting for a token on: cmdline" in agent.log()
    owner.run("bind", "web1", "--address", agent.address)


def test_channels_option_narrows_the_search(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    token = owner.token("web1", "shared")
    root = agents.make_root(None)
    (root / "proc/cmdline").write_text("imprint.token=imprint1s-corrupt\n")
    _attach_fw_cfg(root, _seeded("fw_cfg", token, tmp_path))
    # Without --channels the corrupt cmdline token fails closed ...
    broken = agents.start(root, expect_ready=False)
    assert broken.proc.wait(timeout=30) == 1
    assert "boot channel cmdline is broken" in broken.log()
    # ... a site that knows its channel narrows the search.
    agent = agents.start(root, "--channels", "fw_cfg")
    owner.run("bind", "web1", "--address", agent.address)


def test_unknown_channel_name_is_refused(agents: AgentFactory) -> None:
    agent = agents.start(agents.make_root(None), "--channels", "cmdline,carrier-pigeon", expect_ready=False)
    assert agent.proc.wait(timeout=30) == 1
    assert "unknown channel(s): carrier-pigeon" in agent.log()


def _seeded(channel: str, token: str, tmp_path: Path) -> Path:
    out = tmp_path / f"seed-{channel}"
    subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", channel, "--token", token,
                    "--out", str(out)], check=True, capture_output=True)
    return out
