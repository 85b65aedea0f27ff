"""Local boot channels under a test root: cmdline, systemd credentials, fw_cfg, metadata disk.

Each channel: present with a good token, present but corrupt (the fault is named), absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from imprint import metadisk, tokens
from imprint.channels import (
    CHANNELS,
    Channel,
    ChannelBroken,
    Offer,
    channel_names,
    consume_token,
    credentials,
    find_token,
    fwcfg,
    publish_vm_token,
)
from imprint.channels import metadisk as metadisk_channel
from imprint.guest.distro import Distro

GOOD = tokens.Token(tokens.TokenKind.SHARED, bytes(range(32)))
OTHER = tokens.Token(tokens.TokenKind.SHARED, bytes(range(1, 33)))


def _corruptions(text: str) -> dict[str, tuple[str, str]]:
    """name -> (corrupt text, expected fault fragment)."""
    flipped = text[:-3] + ("a" if text[-3] != "a" else "b") + text[-2:]
    return {
        "flipped": (flipped, "check digits do not match"),
        "truncated": (text[:-5], "truncated or mistyped"),
        "version": (text.replace("imprint1", "imprint9", 1), "version 9 is not supported"),
        "garbage": ("hello world", "malformed"),
    }


@pytest.fixture
def paths(tmp_path: Path) -> Distro:
    return Distro(tmp_path)


def _site_seed(channel: str, token: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", channel,
                           "--token", token, "--out", str(out)], capture_output=True, text=True, check=True)


# -- cmdline

def _write_cmdline(paths: Distro, text: str) -> None:
    paths.cmdline.parent.mkdir(parents=True, exist_ok=True)
    paths.cmdline.write_text(text)


def test_cmdline_good_absent_and_site_fragment(paths: Distro, tmp_path: Path) -> None:
    assert find_token(paths) is None
    _write_cmdline(paths, "root=LABEL=root ro console=ttyS0\n")
    assert find_token(paths) is None
    _site_seed("cmdline", GOOD.encode(), tmp_path / "frag")
    fragment = (tmp_path / "frag").read_text().strip()
    _write_cmdline(paths, f"root=LABEL=root ro {fragment} quiet\n")
    found = find_token(paths)
    assert found is not None and found.channel == "cmdline" and found.token == GOOD


@pytest.mark.parametrize("case", list(_corruptions(GOOD.encode())))
def test_cmdline_corrupt(paths: Distro, case: str) -> None:
    text, fault = _corruptions(GOOD.encode())[case]
    _write_cmdline(paths, f"ro imprint.token={text}\n")
    with pytest.raises(ChannelBroken, match=fault) as info:
        find_token(paths)
    assert info.value.channel == "cmdline"
    assert GOOD.encode()[10:] not in str(info.value)


def test_cmdline_two_different_tokens(paths: Distro) -> None:
    _write_cmdline(paths, f"imprint.token={GOOD.encode()} imprint.token={OTHER.encode()}\n")
    with pytest.raises(ChannelBroken, match="2 times with different values"):
        find_token(paths)


def test_vm_token_on_a_boot_channel_is_refused(paths: Distro) -> None:
    vm_token = tokens.Token(tokens.TokenKind.VM, bytes(32))
    _write_cmdline(paths, f"imprint.token={vm_token.encode()}\n")
    with pytest.raises(ChannelBroken, match="VM token where the owner's token belongs"):
        find_token(paths)


# -- systemd credentials

def test_credentials_from_system_dir_and_env(paths: Distro, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert credentials.read(paths) is None
    system = paths.under("/run/credentials/@system")
    system.mkdir(parents=True)
    (system / "imprint.token").write_text(GOOD.encode())
    assert credentials.read(paths) == Offer(GOOD)
    # The unit's own credentials directory comes first.
    unit_dir = paths.under("/run/credentials/imprint-agent.service")
    unit_dir.mkdir(parents=True)
    (unit_dir / "imprint.token").write_text(GOOD.encode() + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/imprint-agent.service")
    assert credentials.read(paths) == Offer(GOOD)


@pytest.mark.parametrize("case", list(_corruptions(GOOD.encode())))
def test_credentials_corrupt(paths: Distro, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text, fault = _corruptions(GOOD.encode())[case]
    system = paths.under("/run/credentials/@system")
    system.mkdir(parents=True)
    (system / "imprint.token").write_text(text)
    with pytest.raises(ChannelBroken, match=fault) as info:
        find_token(paths)
    assert info.value.channel == "credentials"


def test_credentials_binary_or_huge_file_is_broken(paths: Distro, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    system = paths.under("/run/credentials/@system")
    system.mkdir(parents=True)
    (system / "imprint.token").write_bytes(b"\xff\xfe" * 10)
    with pytest.raises(ChannelBroken, match="not ASCII"):
        credentials.read(paths)
    (system / "imprint.token").write_bytes(b"a" * 10000)
    with pytest.raises(ChannelBroken, match="not a token file"):
        credentials.read(paths)


# -- fw_cfg

def _fw_cfg_raw(paths: Distro) -> Path:
    raw = paths.fw_cfg / "by_name" / fwcfg.ENTRY / "raw"
    raw.parent.mkdir(parents=True)
    return raw


def test_fw_cfg_good_and_absent(paths: Distro, tmp_path: Path) -> None:
    assert fwcfg.read(paths) is None
    out = tmp_path / "fwcfg-token"
    result = _site_seed("fw_cfg", GOOD.encode(), out)
    assert f"name=opt/org.imprint/token,file={out}" in result.stdout
    assert GOOD.encode() not in result.stdout  # K stays out of argv: QEMU reads the file
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    _fw_cfg_raw(paths).write_bytes(out.read_bytes())
    found = find_token(paths)
    assert found is not None and found.channel == "fw_cfg" and found.token == GOOD


def test_fw_cfg_corrupt(paths: Distro) -> None:
    _fw_cfg_raw(paths).write_text(GOOD.encode()[:-4])
    with pytest.raises(ChannelBroken, match="fw_cfg is broken: .*truncated"):
        find_token(paths)


# -- metadata disk

def _attach_disk(paths: Distro, image: Path) -> None:
    link = paths.by_id(metadisk_channel.DEVICE_ID)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(image)


def test_metadisk_good_reply_and_consume(paths: Distro, tmp_path: Path) -> None:
    assert metadisk_channel.read(paths) is None
    image = tmp_path / "meta.img"
    _site_seed("metadata-disk", GOOD.encode(), image)
    _attach_disk(paths, image)
    found = find_token(paths)
    assert found is not None and found.channel == "metadata-disk" and found.token == GOOD

    line = tokens.vm_token_line(tokens.Token(tokens.TokenKind.VM, bytes(32)))
    assert metadisk_channel.reply(paths, line)
    reversed_token = subprocess.run([sys.executable, "-m", "imprint.site", "reverse", "--from", str(image)],
                                    capture_output=True, text=True, check=True).stdout.strip()
    assert reversed_token == line.split()[-1]

    assert metadisk_channel.consume(paths)
    assert GOOD.encode().encode() not in image.read_bytes()
    with pytest.raises(ChannelBroken, match="consumed by an earlier bind"):
        find_token(paths)
    # The reply survives the wipe, so a late site still reads the VM token.
    assert metadisk.decode_reply(image.read_bytes()[metadisk.REPLY_OFFSET:]) == line + "\n"


@pytest.mark.parametrize(("damage", "fault"), [
    (lambda b: b"XXXXXXXX" + b[8:], "bad magic"),
    (lambda b: b[:9] + b"\x07" + b[10:], "version 7 is not supported"),
    (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "checksum mismatch"),
    (lambda b: b[:12] + b"\x7f\xff" + b[14:], "exceeds 256"),
    (lambda b: b[:40], "too small"),
])
def test_metadisk_corrupt(paths: Distro, tmp_path: Path, damage: object, fault: str) -> None:
    image = tmp_path / "meta.img"
    good = metadisk.build(GOOD.encode())
    assert callable(damage)
    image.write_bytes(damage(good))
    _attach_disk(paths, image)
    with pytest.raises(ChannelBroken, match=fault) as info:
        find_token(paths)
    assert info.value.channel == "metadata-disk"


def test_metadisk_with_corrupt_token_inside_valid_header(paths: Distro, tmp_path: Path) -> None:
    image = tmp_path / "meta.img"
    image.write_bytes(metadisk.build(GOOD.encode()[:-2] + "zz"))
    _attach_disk(paths, image)
    with pytest.raises(ChannelBroken, match="metadata-disk is broken: token is corrupt"):
        find_token(paths)


def test_reverse_from_console_log(tmp_path: Path) -> None:
    vm = tokens.Token(tokens.TokenKind.VM, bytes(range(32)))
    log = tmp_path / "console.log"
    log.write_text(f"[    3.2] systemd[1]: Started foo\r\n{tokens.vm_token_line(vm)}\r\nlogin:\n")
    out = subprocess.run([sys.executable, "-m", "imprint.site", "reverse", "--from", str(log)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == vm.encode()
    log.write_text("no token here\n")
    missing = subprocess.run([sys.executable, "-m", "imprint.site", "reverse", "--from", str(log)],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "no 'IMPRINT-VM-TOKEN <token>' line" in missing.stderr


def test_reverse_refuses_two_different_vm_tokens(tmp_path: Path) -> None:
    a = tokens.Token(tokens.TokenKind.VM, bytes(32))
    b = tokens.Token(tokens.TokenKind.VM, bytes([1]) * 32)
    log = tmp_path / "console.log"
    log.write_text(f"{tokens.vm_token_line(a)}\n{tokens.vm_token_line(b)}\n")
    out = subprocess.run([sys.executable, "-m", "imprint.site", "reverse", "--from", str(log)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "2 different VM tokens" in out.stderr


# -- detection order and disagreement

def test_channels_agreeing_are_all_recorded(paths: Distro, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    _write_cmdline(paths, f"imprint.token={GOOD.encode()}\n")
    _fw_cfg_raw(paths).write_text(GOOD.encode())
    found = find_token(paths)
    assert found is not None
    assert found.channels == ("cmdline", "fw_cfg")


def test_a_channel_is_one_object_the_search_and_its_hooks_go_through(paths: Distro,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A channel the registry does not know, given to the search as the registry's are: its
    # reader is asked in its turn, and its reply and consume hooks run when it carried the token.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    calls: list[str] = []

    def reply(_: Distro, line: str) -> bool:
        calls.append(f"reply {line}")
        return True

    def consume(_: Distro) -> bool:
        calls.append("consume")
        return True

    extra = Channel("test-channel", lambda _: Offer(GOOD), reply=reply, consume=consume)
    channels = (*CHANNELS, extra)
    assert "test-channel" in channel_names(channels)
    found = find_token(paths, channels=channels)
    assert found is not None and found.channel == "test-channel" and found.token == GOOD
    assert publish_vm_token(paths, found, "the line", channels) == ["test-channel"]
    assert consume_token(paths, found, channels) == ["test-channel"]
    assert calls == ["reply the line", "consume"]
    # Another channel that carries a different token is refused, as for the registry's own.
    _write_cmdline(paths, f"imprint.token={OTHER.encode()}\n")
    with pytest.raises(ChannelBroken, match="cmdline\\+test-channel is broken: the channels disagree"):
        find_token(paths, channels=channels)


def test_channels_disagreeing_are_refused(paths: Distro) -> None:
    _write_cmdline(paths, f"imprint.token={GOOD.encode()}\n")
    _fw_cfg_raw(paths).write_text(OTHER.encode())
    with pytest.raises(ChannelBroken, match="cmdline\\+fw_cfg is broken: the channels disagree"):
        find_token(paths)


def test_a_consumed_token_counts_as_absent(paths: Distro) -> None:
    """A released VM's old token stays on its channel: it neither binds nor disagrees with the
    new one on another channel."""
    _write_cmdline(paths, f"imprint.token={GOOD.encode()}\n")
    raw = _fw_cfg_raw(paths)
    raw.write_text(OTHER.encode())
    found = find_token(paths, consumed=frozenset({GOOD.token_id.hex()}))
    assert found is not None and (found.channel, found.token) == ("fw_cfg", OTHER)
    raw.unlink()
    assert find_token(paths, consumed=frozenset({GOOD.token_id.hex()})) is None


def test_broken_channel_stops_the_search(paths: Distro) -> None:
    """A corrupt cmdline token must not fall through to a good token on a later channel."""
    _write_cmdline(paths, f"imprint.token={GOOD.encode()[:-1]}\n")
    _fw_cfg_raw(paths).write_text(GOOD.encode())
    with pytest.raises(ChannelBroken) as info:
        find_token(paths)
    assert info.value.channel == "cmdline"


def test_only_narrows_the_search(paths: Distro) -> None:
    _write_cmdline(paths, f"imprint.token={GOOD.encode()[:-1]}\n")
    _fw_cfg_raw(paths).write_text(GOOD.encode())
    found = find_token(paths, only=["fw_cfg"])
    assert found is not None and found.channel == "fw_cfg"


def test_unreadable_channel_is_broken_not_absent(paths: Distro) -> None:
    if os.geteuid() == 0:
        # root reads through permission bits; make the read fail another way: a directory.
        paths.cmdline.mkdir(parents=True)
    else:
        _write_cmdline(paths, "x")
        paths.cmdline.chmod(0)
    with pytest.raises(ChannelBroken, match="cannot read"):
        find_token(paths)


def test_smbios_credential_artefact_is_accepted_by_qemu(tmp_path: Path) -> None:
    """The SMBIOS type 11 artefact: the token in a 0600 file QEMU reads, never in argv."""
    out = tmp_path / "smbios-cred"
    result = subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", "credentials-smbios",
                             "--token", GOOD.encode(), "--out", str(out), "--json"],
                            capture_output=True, text=True, check=True)
    artefact = json.loads(result.stdout)
    assert artefact["qemu_args"] == ["-smbios", f"type=11,path={out}"]
    assert out.read_text() == f"io.systemd.credential:imprint.token={GOOD.encode()}"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (tools/bootstrap.sh installs it)")
    # QEMU parses and loads the SMBIOS file at start-up; -S stops before the guest runs.
    proc = subprocess.Popen([qemu, "-M", "pc", "-accel", "tcg", "-nodefaults", "-display", "none",
                             "-S", "-qmp", "stdio", *artefact["qemu_args"]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        greeting = proc.stdout.readline()
        assert '"QMP"' in greeting, proc.stderr.read() if proc.stderr else greeting
    finally:
        proc.kill()
        proc.communicate(timeout=10)
