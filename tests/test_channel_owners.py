"""Owner addresses on every boot channel: the site writes them beside the token under the
channel's owner key, and the guest reads back the same token and the same addresses.

Every site artefact is built by the site's own builders (imprint.site.seeds, and the CLI), then
put where the guest finds it under a test root (``Distro(root)``): the kernel command line, a
credential directory, fw_cfg's by_name tree, a disk linked under /dev/disk. The channels without
an artefact (cloud-init, the metadata service) are fed as the existing tests feed them.

Each channel also: owner addresses without a token are broken; malformed ones are broken with
the channel, the key and the fault named (and never fall through to another channel); two
channels with the same token but different owner lists are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from imprint import metadisk, tokens
from imprint.channels import (
    ChannelBroken,
    Offer,
    cloudinit,
    configdrive,
    credentials,
    find_token,
    fwcfg,
    imds,
    nocloud,
    seed,
)
from imprint.channels import metadisk as metadisk_channel
from imprint.guest.distro import Distro
from imprint.owneraddr import encode_list, parse_list
from imprint.site import seeds

from tests.helpers.fake_imds import FakeIMDS
from tests.test_channels_network import configdrive as configdrive_ds
from tests.test_channels_network import (
    ec2,
    instance_data,
    openstack_meta_data,
    run_cloudinit,
    write_instance_data,
    write_user_data,
)
from tests.test_channels_network import nocloud as nocloud_ds
from tests.test_channels_volumes import attach, genisoimage, mkfs_vfat

GOOD = tokens.Token(tokens.TokenKind.SHARED, bytes(range(32)))
OWNERS = parse_list("owner.example:7444,[2001:db8::1]:7444,192.0.2.7:1")
OTHER_OWNERS = parse_list("other.example:7444")
BAD_OWNER = "evil\x1b[31m.example:7444"
CREDENTIALS_PREFIX = "opt/io.systemd.credentials/"
SMBIOS_PREFIX = "io.systemd.credential:"

# artefact name -> the channel the guest finds it on
ARTEFACT_CHANNELS = {
    "cmdline": "cmdline", "credentials": "credentials", "credentials-smbios": "credentials",
    "fw_cfg": "fw_cfg", "imprint-seed-iso": "imprint-seed", "imprint-seed-vfat": "imprint-seed",
    "nocloud-iso": "nocloud", "nocloud-vfat": "nocloud", "config-2-iso": "config-2",
    "config-2-vfat": "config-2", "metadata-disk": "metadata-disk",
}
LABELS = {
    "imprint-seed-iso": seed.LABEL, "imprint-seed-vfat": seed.LABEL,
    "nocloud-iso": nocloud.LABELS[0], "nocloud-vfat": nocloud.LABELS[1],
    "config-2-iso": configdrive.LABELS[0], "config-2-vfat": configdrive.LABELS[1],
}


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Distro:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv(imds.BASE_URL_ENV, raising=False)
    root = tmp_path / "root"
    root.mkdir()
    return Distro(root)


def _credential_dir(paths: Distro) -> Path:
    return paths.credential_dirs[-1]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def install(paths: Distro, name: str, artefact: seeds.Artefact) -> None:
    """Put a site artefact where the guest finds it, as QEMU, the kernel and systemd would."""
    if artefact.kernel_cmdline is not None:
        _write(paths.cmdline, f"root=LABEL=root ro {artefact.kernel_cmdline} quiet\n".encode())
        return
    if name == "metadata-disk":
        link = paths.by_id(metadisk_channel.DEVICE_ID)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(artefact.path)
        return
    if name in LABELS:
        attach(paths, LABELS[name], artefact.path)
        return
    args = iter(artefact.qemu_args)
    for flag in args:
        options = dict(option.split("=", 1) for option in next(args).split(","))
        if flag == "-fw_cfg":
            data = Path(options["file"]).read_bytes()
            if options["name"].startswith(CREDENTIALS_PREFIX):  # systemd imports it as a credential
                _write(_credential_dir(paths) / options["name"].removeprefix(CREDENTIALS_PREFIX), data)
            else:
                _write(paths.fw_cfg / "by_name" / options["name"] / "raw", data)
        elif flag == "-smbios":
            text = Path(options["path"]).read_text()
            assert text.startswith(SMBIOS_PREFIX)
            credential, _, value = text.removeprefix(SMBIOS_PREFIX).partition("=")
            _write(_credential_dir(paths) / credential, value.encode())


def build(name: str, out: Path, owners: tuple[object, ...] = ()) -> seeds.Artefact:
    return seeds.build(name, GOOD.encode(), out, owners)  # type: ignore[arg-type]


# -- every artefact: the site writes them, the guest reads the same


def test_every_artefact_is_covered() -> None:
    assert set(ARTEFACT_CHANNELS) == set(seeds.ARTEFACTS)


@pytest.mark.parametrize("name", list(ARTEFACT_CHANNELS))
def test_site_writes_owners_and_the_guest_reads_them(paths: Distro, tmp_path: Path, name: str) -> None:
    artefact = build(name, tmp_path / "art" / "token", OWNERS)
    install(paths, name, artefact)
    found = find_token(paths)
    assert found is not None
    assert found.channel == ARTEFACT_CHANNELS[name] and found.token == GOOD and found.owners == OWNERS
    assert all(channel in ("nocloud", "config-2", found.channel) for channel in found.channels)


@pytest.mark.parametrize("name", list(ARTEFACT_CHANNELS))
def test_without_owners_the_artefact_is_what_it_was(paths: Distro, tmp_path: Path, name: str) -> None:
    out = tmp_path / "art" / "token"
    artefact = build(name, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["token"]  # no owner file beside it
    assert not any(".owner" in arg or "imprint/owner" in arg for arg in artefact.qemu_args)
    assert len(artefact.qemu_args) == (0 if name == "cmdline" else 4 if name == "metadata-disk" else 2)
    if name == "cmdline":
        assert artefact.kernel_cmdline == f"imprint.token={GOOD.encode()}"
    if name == "metadata-disk":
        assert out.read_bytes() == metadisk.build(GOOD.encode())
    install(paths, name, artefact)
    found = find_token(paths)
    assert found is not None and found.token == GOOD and found.owners == ()


def test_cmdline_fragment_is_one_word_per_parameter(tmp_path: Path) -> None:
    artefact = build("cmdline", tmp_path / "frag", OWNERS)
    assert artefact.kernel_cmdline == f"imprint.token={GOOD.encode()} imprint.owner={encode_list(OWNERS)}"
    assert (tmp_path / "frag").read_text() == artefact.kernel_cmdline + "\n"


def test_where_each_channel_writes_them(tmp_path: Path) -> None:
    """The documented key of each channel format."""
    listed = encode_list(OWNERS)
    fw = build("fw_cfg", tmp_path / "fw" / "token", OWNERS)
    assert f"name={fwcfg.OWNER_ENTRY},file={tmp_path / 'fw' / 'token.owner'}" in fw.qemu_args
    assert (tmp_path / "fw" / "token.owner").read_text() == listed
    cred = build("credentials", tmp_path / "cr" / "token", OWNERS)
    assert f"name=opt/io.systemd.credentials/imprint.owner,file={tmp_path / 'cr' / 'token.owner'}" in cred.qemu_args
    smbios = build("credentials-smbios", tmp_path / "sm" / "token", OWNERS)
    assert (tmp_path / "sm" / "token.owner").read_text() == f"io.systemd.credential:imprint.owner={listed}"
    assert smbios.qemu_args[-2:] == ["-smbios", f"type=11,path={tmp_path / 'sm' / 'token.owner'}"]
    assert seed.files(GOOD.encode(), OWNERS)["/owner"] == listed.replace(",", "\n").encode() + b"\n"
    assert f"imprint-owner: '{listed}'\n" in nocloud.files(GOOD.encode(), OWNERS)["/meta-data"].decode()
    meta = json.loads(configdrive.files(GOOD.encode(), OWNERS)[configdrive.META_DATA])["meta"]
    assert meta == {"imprint-token": GOOD.encode(), "imprint-owner": listed}
    header = metadisk.decode_header(metadisk.build(GOOD.encode(), owners=listed)[: metadisk.REPLY_OFFSET])
    assert header.owners == listed and header.token == GOOD.encode()


# -- owners without a token: broken, per channel


def _seed_image(tmp_path: Path, label: str, files: dict[str, bytes], vfat: bool = False) -> Path:
    out = tmp_path / f"seed-{label}.img"
    return mkfs_vfat(label, files, out) if vfat else genisoimage(label, files, out, "-joliet", "-rock")


def _owners_only(paths: Distro, tmp_path: Path, channel: str, owners: str) -> None:
    """The owner addresses ``owners`` on ``channel``, and no token."""
    if channel == "cmdline":
        _write(paths.cmdline, f"ro imprint.owner={owners}\n".encode())
    elif channel == "credentials":
        _write(_credential_dir(paths) / credentials.OWNER_CREDENTIAL, owners.encode())
    elif channel == "fw_cfg":
        _write(paths.fw_cfg / "by_name" / fwcfg.OWNER_ENTRY / "raw", owners.encode())
    elif channel == "imprint-seed":
        attach(paths, seed.LABEL, _seed_image(tmp_path, seed.LABEL, {"owner": owners.encode()}))
    elif channel == "nocloud":
        meta = f"instance-id: iid-x\nimprint-owner: '{owners}'\n".encode()
        attach(paths, "cidata", _seed_image(tmp_path, "cidata", {"meta-data": meta, "user-data": b""}))
    elif channel == "config-2":
        document = json.dumps({"uuid": "u", "meta": {"imprint-owner": owners}}).encode()
        attach(paths, "config-2", _seed_image(tmp_path, "config-2", {"openstack/latest/meta_data.json": document}))
    elif channel == "metadata-disk":
        image = tmp_path / "meta.img"
        image.write_bytes(metadisk.build("", owners=owners))
        link = paths.by_id(metadisk_channel.DEVICE_ID)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image)
    elif channel == "cloud-init":
        write_instance_data(paths, instance_data(nocloud_ds({"imprint-owner": owners})))
    else:
        raise AssertionError(channel)


LOCAL = ["cmdline", "credentials", "fw_cfg", "imprint-seed", "nocloud", "config-2", "metadata-disk", "cloud-init"]


@pytest.mark.parametrize("channel", LOCAL)
def test_owners_without_a_token_are_broken(paths: Distro, tmp_path: Path, channel: str) -> None:
    _owners_only(paths, tmp_path, channel, encode_list(OWNERS))
    with pytest.raises(ChannelBroken, match="no token") as info:
        find_token(paths)
    assert info.value.channel == channel


@pytest.mark.parametrize("channel", LOCAL)
def test_malformed_owners_are_broken_naming_the_channel_and_the_key(paths: Distro, tmp_path: Path,
                                                                    channel: str) -> None:
    # A good token on a later channel must not be reached: broken never falls through.
    _write(paths.fw_cfg / "by_name" / fwcfg.ENTRY / "raw", GOOD.encode().encode())
    if channel == "fw_cfg":
        _write(paths.fw_cfg / "by_name" / fwcfg.OWNER_ENTRY / "raw", b"owner.example:0")
        fault, key = "port is 0", "org.imprint/owner"
    elif channel == "cmdline":
        _write(paths.cmdline, f"ro imprint.token={GOOD.encode()} imprint.owner=owner.example:7444/x\n".encode())
        fault, key = "a path", "imprint.owner"
    elif channel == "credentials":
        _write(_credential_dir(paths) / "imprint.token", GOOD.encode().encode())
        _write(_credential_dir(paths) / "imprint.owner", BAD_OWNER.encode())
        fault, key = "control", "imprint.owner"
    elif channel == "imprint-seed":
        files = {"token": GOOD.encode().encode() + b"\n", "owner": b"2001:db8::1:7444\n"}
        attach(paths, seed.LABEL, _seed_image(tmp_path, seed.LABEL, files, vfat=True))
        fault, key = "without brackets", "owner file"
    elif channel == "nocloud":
        meta = f"instance-id: x\nimprint-token: {GOOD.encode()}\nimprint-owner: user@owner.example:1\n".encode()
        attach(paths, "cidata", _seed_image(tmp_path, "cidata", {"meta-data": meta, "user-data": b""}))
        fault, key = "userinfo", "imprint-owner"
    elif channel == "config-2":
        meta = {"imprint-token": GOOD.encode(), "imprint-owner": [f"h{i}.example:1" for i in range(9)]}
        document = json.dumps({"uuid": "u", "meta": meta}).encode()
        attach(paths, "config-2", _seed_image(tmp_path, "config-2", {"openstack/latest/meta_data.json": document}))
        fault, key = "more than 8", "meta.imprint-owner"
    elif channel == "metadata-disk":
        image = tmp_path / "meta.img"
        image.write_bytes(metadisk.build(GOOD.encode(), owners="[fe80::1%eth0]:7444"))
        link = paths.by_id(metadisk_channel.DEVICE_ID)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image)
        fault, key = "zone id", "owners"
    else:
        write_instance_data(paths, instance_data(nocloud_ds({"imprint-token": GOOD.encode(),
                                                             "imprint-owner": {"not": "a list"}})))
        fault, key = "not a list", "imprint-owner"
    with pytest.raises(ChannelBroken) as info:
        find_token(paths)
    assert info.value.channel == channel
    assert fault in info.value.fault and key in info.value.fault, info.value.fault
    assert "\x1b" not in str(info.value)
    assert GOOD.encode() not in str(info.value)


# -- disagreement


def test_two_channels_with_the_same_token_and_different_owners_are_refused(paths: Distro) -> None:
    _write(paths.cmdline, f"imprint.token={GOOD.encode()} imprint.owner={encode_list(OWNERS)}\n".encode())
    _write(paths.fw_cfg / "by_name" / fwcfg.ENTRY / "raw", GOOD.encode().encode())
    _write(paths.fw_cfg / "by_name" / fwcfg.OWNER_ENTRY / "raw", encode_list(OTHER_OWNERS).encode())
    with pytest.raises(ChannelBroken, match="the channels disagree on the owner addresses") as info:
        find_token(paths)
    assert info.value.channel == "cmdline+fw_cfg"
    assert "other.example:7444" in info.value.fault and GOOD.encode() not in str(info.value)


def test_one_channel_with_owners_and_one_without_disagree(paths: Distro) -> None:
    _write(paths.cmdline, f"imprint.token={GOOD.encode()} imprint.owner={encode_list(OWNERS)}\n".encode())
    _write(paths.fw_cfg / "by_name" / fwcfg.ENTRY / "raw", GOOD.encode().encode())
    with pytest.raises(ChannelBroken, match="disagree on the owner addresses.*fw_cfg gives none"):
        find_token(paths)


def test_channels_agreeing_on_owners_are_all_recorded(paths: Distro) -> None:
    _write(paths.cmdline, f"imprint.token={GOOD.encode()} imprint.owner={encode_list(OWNERS)}\n".encode())
    _write(paths.fw_cfg / "by_name" / fwcfg.ENTRY / "raw", GOOD.encode().encode())
    # The same list, written in another (equivalent) form.
    _write(paths.fw_cfg / "by_name" / fwcfg.OWNER_ENTRY / "raw",
           b"Owner.Example:7444\n[2001:DB8:0::1]:7444\n192.0.2.7:1\nowner.example:7444\n")
    found = find_token(paths)
    assert found is not None and found.channels == ("cmdline", "fw_cfg") and found.owners == OWNERS


def test_two_seeds_of_one_channel_disagreeing_on_owners(paths: Distro, tmp_path: Path) -> None:
    token = GOOD.encode().encode() + b"\n"
    iso = genisoimage("cidata", {"meta-data": b"instance-id: x\n", "imprint": token}, tmp_path / "a.iso")
    vfat = mkfs_vfat("CIDATA", {"meta-data": b"instance-id: x\nimprint-owner: a.example:1\n", "imprint": token},
                     tmp_path / "b.img")
    attach(paths, "cidata", iso)
    attach(paths, "CIDATA", vfat)
    with pytest.raises(ChannelBroken, match="disagree.*without owner addresses.*with owner addresses a.example:1"):
        nocloud.read(paths)


def test_cloudinit_metadata_and_user_data_disagreeing_on_owners(paths: Distro) -> None:
    write_instance_data(paths, instance_data(nocloud_ds({"imprint-token": GOOD.encode(),
                                                         "imprint-owner": "a.example:1"})))
    write_user_data(paths, "#cloud-config\nimprint-owner: b.example:1\n")
    with pytest.raises(ChannelBroken, match="carry different owner addresses"):
        cloudinit.read(paths)


# -- cloud-init's places


@pytest.mark.parametrize("shape", ["nocloud", "configdrive", "ec2"])
def test_cloudinit_metadata_owners(paths: Distro, shape: str) -> None:
    builder = {"nocloud": nocloud_ds, "configdrive": configdrive_ds, "ec2": ec2}[shape]
    write_instance_data(paths, instance_data(builder({"imprint-token": GOOD.encode(),
                                                      "imprint-owner": encode_list(OWNERS)})))
    assert cloudinit.read(paths) == Offer(GOOD, OWNERS)


def test_cloudinit_user_data_owners_and_a_list_in_metadata(paths: Distro) -> None:
    write_instance_data(paths, instance_data(nocloud_ds({"imprint-owner": [str(a) for a in OWNERS]})))
    write_user_data(paths, f"#cloud-config\nimprint-token: {GOOD.encode()}\nimprint-owner: '{encode_list(OWNERS)}'\n")
    assert cloudinit.read(paths) == Offer(GOOD, OWNERS)


def test_real_cloudinit_reads_the_sites_nocloud_seed_with_owners(tmp_path: Path) -> None:
    root = tmp_path / "root"
    seed_dir = root / "var/lib/cloud/seed/nocloud"
    for name, data in nocloud.files(GOOD.encode(), OWNERS).items():
        _write(seed_dir / name.lstrip("/"), data)
    run_cloudinit(root, "NoCloud")
    assert cloudinit.read(Distro(root)) == Offer(GOOD, OWNERS)


def test_real_cloudinit_reads_the_sites_config_drive_with_owners(tmp_path: Path) -> None:
    root = tmp_path / "root"
    seed_dir = root / "var/lib/cloud/seed/config_drive"
    for name, data in configdrive.files(GOOD.encode(), OWNERS).items():
        _write(seed_dir / name.lstrip("/"), data)
    run_cloudinit(root, "ConfigDrive")
    assert cloudinit.read(Distro(root)) == Offer(GOOD, OWNERS)


# -- the metadata service


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIMDS]:
    with FakeIMDS() as fake:
        monkeypatch.setenv(imds.BASE_URL_ENV, fake.url)
        yield fake


def _owner_tag(server: FakeIMDS, value: str) -> None:
    server.site.meta.setdefault("tags", {}).setdefault("instance", {})["imprint-owner"] = value


def test_imds_owner_tag_beside_the_token_tag(server: FakeIMDS, tmp_path: Path) -> None:
    server.site.tag = GOOD.encode()
    _owner_tag(server, "owner.example:7444 192.0.2.7:1")  # AWS tag values allow spaces, not commas
    assert imds.read(Distro(tmp_path)) == Offer(GOOD, parse_list("owner.example:7444,192.0.2.7:1"))
    found = find_token(Distro(tmp_path))
    assert found is not None and found.channel == "http-metadata" and len(found.owners) == 2


def test_imds_openstack_meta_owners(server: FakeIMDS, tmp_path: Path) -> None:
    server.site.openstack = openstack_meta_data({"imprint-token": GOOD.encode(), "imprint-owner": encode_list(OWNERS)})
    assert imds.read(Distro(tmp_path)) == Offer(GOOD, OWNERS)
    server.site.openstack = openstack_meta_data({"imprint-token": GOOD.encode(),
                                                 "imprint-owner": [str(a) for a in OWNERS]})
    assert imds.read(Distro(tmp_path)) == Offer(GOOD, OWNERS)


def test_imds_owners_without_a_token_are_broken(server: FakeIMDS, tmp_path: Path) -> None:
    _owner_tag(server, "owner.example:7444")
    with pytest.raises(ChannelBroken, match="no token") as info:
        imds.read(Distro(tmp_path))
    assert info.value.channel == "http-metadata"
    server.site.meta["tags"] = {}
    server.site.openstack = openstack_meta_data({"imprint-owner": "owner.example:7444"})
    with pytest.raises(ChannelBroken, match="no token"):
        imds.read(Distro(tmp_path))


@pytest.mark.parametrize("value", [BAD_OWNER, "owner.example:7444,", "owner.example:\uff17"])
def test_imds_malformed_owner_tag_is_broken(server: FakeIMDS, tmp_path: Path, value: str) -> None:
    server.site.tag = GOOD.encode()
    _owner_tag(server, value)
    with pytest.raises(ChannelBroken) as info:
        imds.read(Distro(tmp_path))
    assert info.value.channel == "http-metadata" and "imprint-owner" in info.value.fault
    assert "\x1b" not in str(info.value)


# -- the metadata disk's header


def test_metadisk_owners_are_under_the_checksum(tmp_path: Path) -> None:
    disk = bytearray(metadisk.build(GOOD.encode(), owners=encode_list(OWNERS)))
    start = 56 + len(GOOD.encode())
    assert disk[start : start + 5] == b"owner"
    disk[start] = ord("x")
    with pytest.raises(metadisk.MetadiskError, match="checksum"):
        metadisk.decode_header(bytes(disk))
    with pytest.raises(metadisk.MetadiskError, match="exceeds"):
        metadisk.build(GOOD.encode(), owners="a" * (metadisk.MAX_OWNERS + 1))


# -- imprint-site: --owner


def _site(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imprint.site", *args], capture_output=True, text=True,
                          timeout=120)


def test_site_seed_owner_round_trip(paths: Distro, tmp_path: Path) -> None:
    out = tmp_path / "fw" / "token"
    result = _site("seed", "--channel", "fw_cfg", "--token", GOOD.encode(), "--out", str(out), "--json",
                   "--owner", "Owner.Example:7444,[2001:db8:0::1]:7444", "--owner", "192.0.2.7:1",
                   "--owner", "owner.example:7444")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["owners"] == [str(a) for a in OWNERS]
    assert GOOD.encode() not in result.stdout
    install(paths, "fw_cfg", seeds.Artefact("fw_cfg", out, qemu_args=printed["qemu_args"]))
    found = find_token(paths)
    assert found is not None and found.token == GOOD and found.owners == OWNERS


def test_site_seed_cmdline_owner_text_output(tmp_path: Path) -> None:
    nosecret = tokens.Token(tokens.TokenKind.NOSECRET, bytes(range(32))).encode()
    result = _site("seed", "--channel", "cmdline", "--token", nosecret, "--out", str(tmp_path / "frag"),
                   "--owner", "[2001:db8::1]:7444")
    assert result.returncode == 0, result.stderr
    assert f"kernel command line: imprint.token={nosecret} imprint.owner=[2001:db8::1]:7444" in result.stdout
    assert "owner addresses: [2001:db8::1]:7444" in result.stdout


@pytest.mark.parametrize("owner", [BAD_OWNER, "owner.example", "2001:db8::1:7444", "",
                                   ",".join(f"h{i}.example:1" for i in range(9))])
def test_site_seed_bad_owner_is_a_usage_error(tmp_path: Path, owner: str) -> None:
    out = tmp_path / "frag"
    result = _site("seed", "--channel", "cmdline", "--token", GOOD.encode(), "--out", str(out), "--owner", owner)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imprint-site: error: --owner: "), result.stderr
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr
    assert GOOD.encode() not in result.stderr
    assert not out.exists()


def test_site_seed_too_many_owners_across_flags(tmp_path: Path) -> None:
    flags = [arg for i in range(9) for arg in ("--owner", f"h{i}.example:1")]
    result = _site("seed", "--channel", "cmdline", "--token", GOOD.encode(), "--out", str(tmp_path / "f"), *flags)
    assert result.returncode == 2 and "more than 8" in result.stderr


def test_site_boot_and_attach_check_owners_first(tmp_path: Path) -> None:
    result = _site("boot", "--image", str(tmp_path / "none.qcow2"), "--owner", "owner.example:7444")
    assert result.returncode == 2 and "--owner goes with --token" in result.stderr
    result = _site("boot", "--image", str(tmp_path / "none.qcow2"), "--channel", "fw_cfg", "--token", GOOD.encode(),
                   "--owner", BAD_OWNER)
    assert result.returncode == 2 and result.stderr.startswith("imprint-site: error: --owner: ")
    assert "Traceback" not in result.stderr
    result = _site("attach", str(tmp_path), "--channel", "metadata-disk", "--token", GOOD.encode(),
                   "--owner", "owner.example:0")
    assert result.returncode == 2 and "--owner: " in result.stderr and "Traceback" not in result.stderr
