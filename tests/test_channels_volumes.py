"""Seed-volume boot channels under a test root: imprint's own IMPRINT seed, NoCloud (cidata) and
OpenStack config-2, each ISO9660 or vfat.

``<root>/dev/disk/by-label/<LABEL>`` is a symlink to an image file, made by the real tools
(genisoimage, xorriso, mkfs.vfat + mtools) and by ``imprint-site seed``. Each channel: present
with a good token, present but corrupt (the fault named), absent, and someone else's seed.
cloud-init's own NoCloud and ConfigDrive datasources (Debian's code) read the seeds imprint-site
makes, from their content extracted with xorriso / mtools.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from imprint import tokens
from imprint.channels import (
    ChannelBroken,
    Offer,
    channel_names,
    configdrive,
    consume_token,
    find_token,
    nocloud,
    seed,
)
from imprint.guest import volumes
from imprint.guest.distro import Distro, Programs

GOOD = tokens.Token(tokens.TokenKind.SHARED, bytes(range(32)))
OTHER = tokens.Token(tokens.TokenKind.NOSECRET, bytes(range(1, 33)))
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

Files = dict[str, bytes]


@pytest.fixture
def paths(tmp_path: Path) -> Distro:
    root = tmp_path / "root"
    root.mkdir()
    return Distro(root)


def attach(paths: Distro, label: str, image: Path) -> None:
    link = paths.by_label(label)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(image)


# -- what each channel's seed holds


def imprint_files(token: str) -> Files:
    return {"token": f"{token}\n".encode()}


def nocloud_files(token: str, *, key: str = "imprint-token") -> Files:
    meta = f"instance-id: iid-test\nlocal-hostname: test\n{key}: {token}\n"
    return {"meta-data": meta.encode(), "user-data": b"#cloud-config\n{}\n"}


def config2_files(token: str, *, meta: dict[str, object] | None = None) -> Files:
    document = {"uuid": "00000000-0000-0000-0000-000000000001", "hostname": "test",
                "meta": {"imprint-token": token} if meta is None else meta}
    return {"openstack/latest/meta_data.json": json.dumps(document).encode()}


Reader = Callable[[Distro], Offer | None]

# channel -> (reader, ISO label, vfat label, files, site channel prefix)
CHANNELS: dict[str, tuple[Reader, str, str, Callable[[str], Files], str]] = {
    "imprint-seed": (seed.read, "IMPRINT", "IMPRINT", imprint_files, "imprint-seed"),
    "nocloud": (nocloud.read, "cidata", "CIDATA", nocloud_files, "nocloud"),
    "config-2": (configdrive.read, "config-2", "CONFIG-2", config2_files, "config-2"),
}


# -- image makers: the real tools


def _tree(files: Files, directory: Path) -> Path:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def genisoimage(label: str, files: Files, out: Path, *extensions: str) -> Path:
    src = _tree(files, out.with_suffix(".d"))
    subprocess.run(["genisoimage", "-quiet", "-output", str(out), "-volid", label, *extensions, str(src)],
                   check=True, capture_output=True)
    return out


def xorriso(label: str, files: Files, out: Path) -> Path:
    src = _tree(files, out.with_suffix(".d"))
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(out), "-V", label, "-J", "-R", str(src)],
                   check=True, capture_output=True)
    return out


def mkfs_vfat(label: str, files: Files, out: Path) -> Path:
    mkfs = shutil.which("mkfs.vfat", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert mkfs is not None
    subprocess.run([mkfs, "-n", label, "-C", str(out), "1024"], check=True, capture_output=True)
    src = _tree(files, out.with_suffix(".d"))
    for entry in sorted(src.iterdir()):
        subprocess.run(["mcopy", "-s", "-i", str(out), str(entry), "::/"], check=True, env=MTOOLS_ENV)
    return out


def site_seed(channel: str, token: str, out: Path) -> Path:
    """Run the real CLI, as a site would."""
    subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", channel, "--token", token,
                    "--out", str(out)], check=True, capture_output=True, text=True)
    assert out.stat().st_mode & 0o777 == 0o600
    return out


MAKERS = ["genisoimage", "genisoimage-plain", "xorriso", "mkfs.vfat", "site-iso", "site-vfat"]


def make(channel: str, maker: str, token: str, out: Path) -> tuple[str, Path]:
    """(label, image) for ``channel`` with ``token`` on it, made by ``maker``."""
    _, iso_label, vfat_label, files, prefix = CHANNELS[channel]
    if maker == "genisoimage":
        return iso_label, genisoimage(iso_label, files(token), out, "-joliet", "-rock")
    if maker == "genisoimage-plain":  # ISO9660 names only: META_DAT.;1, OPENSTAC/LATEST/META_DAT.JSO;1
        return iso_label, genisoimage(iso_label, files(token), out)
    if maker == "xorriso":
        return iso_label, xorriso(iso_label, files(token), out)
    if maker == "mkfs.vfat":
        return vfat_label, mkfs_vfat(vfat_label, files(token), out)
    if maker == "site-iso":
        return iso_label, site_seed(f"{prefix}-iso", token, out)
    return vfat_label, site_seed(f"{prefix}-vfat", token, out)


def read(channel: str, paths: Distro) -> tokens.Token | None:
    """The token the channel's reader finds (its owner addresses: tests/test_channel_owners.py)."""
    found = CHANNELS[channel][0](paths)
    return None if found is None else found.token


# -- registry


def test_registry_order() -> None:
    names = channel_names()
    assert names.index("fw_cfg") < names.index("imprint-seed") < names.index("nocloud") \
        < names.index("config-2") < names.index("metadata-disk")


# -- good token, every channel x every maker


@pytest.mark.parametrize("maker", MAKERS)
@pytest.mark.parametrize("channel", list(CHANNELS))
def test_good_token_is_found(paths: Distro, tmp_path: Path, channel: str, maker: str) -> None:
    label, image = make(channel, maker, GOOD.encode(), tmp_path / "seed.img")
    attach(paths, label, image)
    assert read(channel, paths) == GOOD
    found = find_token(paths, only=[channel])
    assert found is not None and found.channel == channel and found.token == GOOD
    kind = volumes.detect(image)
    assert kind is (volumes.Kind.VFAT if "vfat" in maker else volumes.Kind.ISO9660)


@pytest.mark.parametrize("channel", list(CHANNELS))
def test_absent_without_the_label(paths: Distro, tmp_path: Path, channel: str) -> None:
    assert read(channel, paths) is None
    assert find_token(paths, only=[channel]) is None
    # A seed for another channel does not count, and a dangling link is a device that went away.
    other = "nocloud" if channel != "nocloud" else "config-2"
    label, image = make(other, "site-iso", GOOD.encode(), tmp_path / "other.img")
    attach(paths, label, image)
    own_label = CHANNELS[channel][1]
    attach(paths, own_label, tmp_path / "gone.img")
    assert read(channel, paths) is None


# -- present but corrupt


def _garbage(out: Path) -> Path:
    out.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(100_000)))
    return out


@pytest.mark.parametrize("channel", list(CHANNELS))
def test_garbage_under_the_label_is_broken(paths: Distro, tmp_path: Path, channel: str) -> None:
    attach(paths, CHANNELS[channel][1], _garbage(tmp_path / "garbage.img"))
    with pytest.raises(ChannelBroken, match="neither an ISO9660 nor a FAT filesystem") as info:
        find_token(paths, only=[channel])
    assert info.value.channel == channel


@pytest.mark.parametrize("channel", list(CHANNELS))
def test_empty_device_is_broken(paths: Distro, tmp_path: Path, channel: str) -> None:
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    attach(paths, CHANNELS[channel][1], empty)
    with pytest.raises(ChannelBroken, match="the device is empty"):
        read(channel, paths)


@pytest.mark.parametrize("maker", ["genisoimage", "site-iso"])
@pytest.mark.parametrize("channel", list(CHANNELS))
def test_truncated_iso_is_broken(paths: Distro, tmp_path: Path, channel: str, maker: str) -> None:
    label, image = make(channel, maker, GOOD.encode(), tmp_path / "seed.iso")
    image.write_bytes(image.read_bytes()[: 0x8000 + 4096])  # the descriptors survive, the files do not
    attach(paths, label, image)
    with pytest.raises(ChannelBroken, match="ISO9660 image is truncated: the volume declares"):
        read(channel, paths)


def test_iso_with_corrupt_directory_record_names_pycdlib_reason(paths: Distro, tmp_path: Path) -> None:
    label, image = make("nocloud", "genisoimage", GOOD.encode(), tmp_path / "seed.iso")
    data = bytearray(image.read_bytes())
    # The root directory record in the primary volume descriptor: its both-endian extent disagrees.
    data[0x8000 + 156 + 2 : 0x8000 + 156 + 6] = b"\x12\x34\x56\x78"
    image.write_bytes(bytes(data))
    attach(paths, label, image)
    with pytest.raises(ChannelBroken, match=r"ISO9660 image is corrupt: .*extent location disagree"):
        read("nocloud", paths)


def test_truncated_vfat_is_broken(paths: Distro, tmp_path: Path) -> None:
    label, image = make("imprint-seed", "site-vfat", GOOD.encode(), tmp_path / "seed.img")
    image.write_bytes(image.read_bytes()[:4096])
    attach(paths, label, image)
    with pytest.raises(ChannelBroken, match="FAT filesystem is truncated"):
        read("imprint-seed", paths)


def test_vfat_that_mtools_cannot_open_is_broken(paths: Distro, tmp_path: Path) -> None:
    label, image = make("config-2", "site-vfat", GOOD.encode(), tmp_path / "seed.img")
    data = bytearray(image.read_bytes())
    data[22:24] = b"\0\0"  # sectors per FAT of a FAT12 volume: 0
    image.write_bytes(bytes(data))
    attach(paths, label, image)
    with pytest.raises(ChannelBroken, match=r"FAT filesystem is corrupt: mdir failed: Cannot initialize"):
        read("config-2", paths)


def _corrupt(token: str) -> str:
    return token[:-3] + ("a" if token[-3] != "a" else "b") + token[-2:]


@pytest.mark.parametrize("maker", ["genisoimage", "xorriso", "mkfs.vfat"])
def test_nocloud_meta_data_with_corrupt_token(paths: Distro, tmp_path: Path, maker: str) -> None:
    label, image = make("nocloud", maker, _corrupt(GOOD.encode()), tmp_path / "seed.img")
    attach(paths, label, image)
    with pytest.raises(ChannelBroken, match="meta-data: imprint-token is not a valid token: token is corrupt") as info:
        find_token(paths, only=["nocloud"])
    assert info.value.channel == "nocloud" and label in info.value.fault
    assert GOOD.encode()[12:] not in str(info.value)


@pytest.mark.parametrize("maker", ["xorriso", "mkfs.vfat"])
def test_config2_with_corrupt_token(paths: Distro, tmp_path: Path, maker: str) -> None:
    label, image = make("config-2", maker, _corrupt(GOOD.encode()), tmp_path / "seed.img")
    attach(paths, label, image)
    fault = "openstack/latest/meta_data.json: meta.imprint-token is not a valid token: token is corrupt"
    with pytest.raises(ChannelBroken, match=fault):
        read("config-2", paths)


@pytest.mark.parametrize(("content", "fault"), [
    (b'{"uuid": "x", "meta": {"imprint-token": ', "is not valid JSON: Expecting value"),
    (b"\xff\xfe garbage", "is not valid JSON"),
    (b"[" * 100_00 + b"]" * 100_00, "is not valid JSON"),
    (b'["a list"]', "is not a JSON object"),
    (b'{"meta": "imprint-token=x"}', "meta is not an object"),
    (b'{"meta": {"imprint-token": 42}}', "meta.imprint-token is not a string"),
])
@pytest.mark.parametrize("maker", ["xorriso", "mkfs.vfat"])
def test_config2_invalid_meta_data_json(paths: Distro, tmp_path: Path, maker: str, content: bytes,
                                        fault: str) -> None:
    files = {"openstack/latest/meta_data.json": content}
    image = xorriso("config-2", files, tmp_path / "seed.iso") if maker == "xorriso" \
        else mkfs_vfat("CONFIG-2", files, tmp_path / "seed.img")
    attach(paths, "config-2" if maker == "xorriso" else "CONFIG-2", image)
    with pytest.raises(ChannelBroken, match=fault) as info:
        find_token(paths, only=["config-2"])
    assert info.value.channel == "config-2"


@pytest.mark.parametrize("maker", ["genisoimage", "mkfs.vfat"])
def test_imprint_seed_without_token_file_is_broken(paths: Distro, tmp_path: Path, maker: str) -> None:
    files = {"README": b"not a token\n"}
    image = genisoimage("IMPRINT", files, tmp_path / "s.iso", "-rock") if maker == "genisoimage" \
        else mkfs_vfat("IMPRINT", files, tmp_path / "s.img")
    attach(paths, "IMPRINT", image)
    with pytest.raises(ChannelBroken, match="the seed has no token file"):
        read("imprint-seed", paths)


@pytest.mark.parametrize("maker", ["genisoimage", "mkfs.vfat"])
def test_oversized_file_is_refused(paths: Distro, tmp_path: Path, maker: str) -> None:
    big = b"instance-id: x\n" + b"# padding\n" * 8000
    files = {"meta-data": big, "user-data": b""}
    image = genisoimage("cidata", files, tmp_path / "s.iso", "-rock") if maker == "genisoimage" \
        else mkfs_vfat("CIDATA", files, tmp_path / "s.img")
    attach(paths, "cidata" if maker == "genisoimage" else "CIDATA", image)
    with pytest.raises(ChannelBroken, match="larger than"):
        read("nocloud", paths)


@pytest.mark.parametrize("maker", ["xorriso", "mkfs.vfat"])
def test_directory_where_the_file_belongs_is_broken(paths: Distro, tmp_path: Path, maker: str) -> None:
    files = {"token/inside": b"x\n"}
    image = xorriso("IMPRINT", files, tmp_path / "s.iso") if maker == "xorriso" \
        else mkfs_vfat("IMPRINT", files, tmp_path / "s.img")
    attach(paths, "IMPRINT", image)
    with pytest.raises(ChannelBroken, match="/token is a directory"):
        read("imprint-seed", paths)


# -- someone else's seed: absent


@pytest.mark.parametrize("maker", ["genisoimage", "mkfs.vfat"])
def test_nocloud_seed_without_imprint_token_is_absent(paths: Distro, tmp_path: Path, maker: str) -> None:
    files = {"meta-data": b"instance-id: someone-else\nlocal-hostname: theirs\n",
             "user-data": b"#cloud-config\npackages: [htop]\n"}
    image = genisoimage("cidata", files, tmp_path / "s.iso", "-joliet", "-rock") if maker == "genisoimage" \
        else mkfs_vfat("CIDATA", files, tmp_path / "s.img")
    attach(paths, "cidata" if maker == "genisoimage" else "CIDATA", image)
    assert read("nocloud", paths) is None
    assert find_token(paths, only=["nocloud"]) is None


@pytest.mark.parametrize("meta", [None, {}, {"role": "web"}])
def test_config2_without_imprint_token_is_absent(paths: Distro, tmp_path: Path,
                                                 meta: dict[str, object] | None) -> None:
    document: dict[str, object] = {"uuid": "u", "hostname": "h"}
    if meta is not None:
        document["meta"] = meta
    files = {"openstack/latest/meta_data.json": json.dumps(document).encode()}
    attach(paths, "config-2", xorriso("config-2", files, tmp_path / "s.iso"))
    assert read("config-2", paths) is None


def test_config2_without_meta_data_json_is_absent(paths: Distro, tmp_path: Path) -> None:
    files = {"openstack/latest/user_data": b"#cloud-config\n"}
    attach(paths, "config-2", xorriso("config-2", files, tmp_path / "s.iso"))
    assert read("config-2", paths) is None


# -- NoCloud specifics


@pytest.mark.parametrize("maker", ["genisoimage", "genisoimage-plain", "mkfs.vfat"])
def test_nocloud_imprint_file_at_the_root(paths: Distro, tmp_path: Path, maker: str) -> None:
    files = {"meta-data": b"instance-id: x\n", "user-data": b"", "imprint": f"{GOOD.encode()}\n".encode()}
    if maker == "mkfs.vfat":
        image, label = mkfs_vfat("CIDATA", files, tmp_path / "s.img"), "CIDATA"
    else:
        extensions = ("-joliet", "-rock") if maker == "genisoimage" else ()
        image, label = genisoimage("cidata", files, tmp_path / "s.iso", *extensions), "cidata"
    attach(paths, label, image)
    assert read("nocloud", paths) == GOOD


def test_nocloud_meta_data_and_imprint_file_must_agree(paths: Distro, tmp_path: Path) -> None:
    files = {**nocloud_files(GOOD.encode()), "imprint": OTHER.encode().encode()}
    attach(paths, "cidata", genisoimage("cidata", files, tmp_path / "s.iso", "-rock"))
    with pytest.raises(ChannelBroken, match="meta-data's imprint-token .* and the imprint file .* disagree"):
        read("nocloud", paths)


def test_nocloud_json_meta_data(paths: Distro, tmp_path: Path) -> None:
    meta = json.dumps({"instance-id": "x", "imprint-token": GOOD.encode()}).encode()
    attach(paths, "cidata", genisoimage("cidata", {"meta-data": meta, "user-data": b""}, tmp_path / "s.iso", "-rock"))
    assert read("nocloud", paths) == GOOD


def test_nocloud_cidata_and_CIDATA_disagreeing_are_broken(paths: Distro, tmp_path: Path) -> None:
    attach(paths, *make("nocloud", "site-iso", GOOD.encode(), tmp_path / "a.iso"))
    attach(paths, *make("nocloud", "site-vfat", OTHER.encode(), tmp_path / "b.img"))
    with pytest.raises(ChannelBroken, match="two seeds labelled cidata and CIDATA disagree") as info:
        read("nocloud", paths)
    assert GOOD.token_id.hex() in str(info.value) and OTHER.token_id.hex() in str(info.value)


def test_nocloud_cidata_and_CIDATA_one_without_token_are_broken(paths: Distro, tmp_path: Path) -> None:
    attach(paths, *make("nocloud", "site-iso", GOOD.encode(), tmp_path / "a.iso"))
    theirs = {"meta-data": b"instance-id: theirs\n", "user-data": b""}
    attach(paths, "CIDATA", mkfs_vfat("CIDATA", theirs, tmp_path / "b.img"))
    with pytest.raises(ChannelBroken, match="CIDATA carries no imprint token"):
        read("nocloud", paths)


def test_nocloud_cidata_and_CIDATA_agreeing(paths: Distro, tmp_path: Path) -> None:
    attach(paths, *make("nocloud", "site-iso", GOOD.encode(), tmp_path / "a.iso"))
    attach(paths, *make("nocloud", "mkfs.vfat", GOOD.encode(), tmp_path / "b.img"))
    assert read("nocloud", paths) == GOOD


def test_config2_and_CONFIG2_disagreeing_are_broken(paths: Distro, tmp_path: Path) -> None:
    attach(paths, *make("config-2", "xorriso", GOOD.encode(), tmp_path / "a.iso"))
    attach(paths, *make("config-2", "site-vfat", OTHER.encode(), tmp_path / "b.img"))
    with pytest.raises(ChannelBroken, match="two seeds labelled config-2 and CONFIG-2 disagree"):
        read("config-2", paths)


T = GOOD.encode()


@pytest.mark.parametrize(("text", "expected"), [
    (f"imprint-token: {T}\n", T),
    (f"instance-id: x\r\nimprint-token: {T}\r\n", T),
    (f"---\n# a comment\ninstance-id: x\nimprint-token: {T}  # the owner's\n...\n", T),
    (f"imprint-token: '{T}'\n", T),
    (f'imprint-token: "{T}"\n', T),
    (f'"imprint-token": {T}\n', T),
    (f"imprint-token:   {T}   \n", T),
    (f'{{"instance-id": "x", "imprint-token": "{T}"}}', T),
    (f'\ufeffimprint-token: {T}\n', T),
    (f"network-interfaces: |\n  auto eth0\n  imprint-token: nested\nimprint-token: {T}\n", T),
    (f"public-keys:\n  - ssh-ed25519 AAAA\nimprint-token: {T}\nlocal-hostname: h\n", T),
    ("instance-id: x\nlocal-hostname: h\n", None),
    ("instance-id: x\nnested:\n  imprint-token: not-top-level\n", None),
    ('{"instance-id": "x"}', None),
    ("{instance-id: x, local-hostname: y}", None),
    ("seedfrom: http://example.com:8000/\n", None),
    ("", None),
])
def test_meta_data_subset_matches_yaml(text: str, expected: str | None) -> None:
    assert nocloud.meta_data_value(text, "imprint-token") == expected
    # What cloud-init's YAML parser makes of the same document.
    import yaml

    loaded = yaml.safe_load(text.lstrip("\ufeff")) or {}
    assert loaded.get("imprint-token") == expected


@pytest.mark.parametrize(("text", "fault"), [
    ("imprint-token: |\n  imprint1s-aaaa\n", "YAML form this reader does not take"),
    ("imprint-token: >-\n  imprint1s-aaaa\n", "YAML form this reader does not take"),
    ("imprint-token:\n  imprint1s-aaaa\n", "has no value on its line"),
    (f"imprint-token: {T[:20]}\n  {T[20:]}\n", "continues on the next line"),
    (f"imprint-token: {T}\nimprint-token: {T}\n", "given 2 times"),
    (f'imprint-token: "{T}\\n"\n', "double-quoted value"),
    (f"imprint-token: '{T}\n", "without its closing quote"),
    (f"imprint-token: '{T}' trailing\n", "text after its quoted value"),
    (f"{{instance-id: x, imprint-token: {T}}}", "inside a YAML flow mapping"),
    (f"? imprint-token\n: {T}\n", "cannot split"),
    (f"imprint-token: &anchor {T}\n", "YAML form this reader does not take"),
])
def test_meta_data_forms_not_read_are_refused(text: str, fault: str) -> None:
    with pytest.raises(nocloud.MetaDataError, match=fault):
        nocloud.meta_data_value(text, "imprint-token")


def test_meta_data_refusal_is_a_broken_channel(paths: Distro, tmp_path: Path) -> None:
    files = {"meta-data": f"imprint-token: |\n  {T}\n".encode(), "user-data": b""}
    attach(paths, "cidata", genisoimage("cidata", files, tmp_path / "s.iso", "-rock"))
    with pytest.raises(ChannelBroken, match="meta-data: imprint-token is written in a YAML form"):
        read("nocloud", paths)


# -- consuming K from the IMPRINT seed


def test_consume_wipes_k_from_a_writable_vfat_seed(paths: Distro, tmp_path: Path) -> None:
    label, image = make("imprint-seed", "site-vfat", GOOD.encode(), tmp_path / "seed.img")
    attach(paths, label, image)
    found = find_token(paths, only=["imprint-seed"])
    assert found is not None and found.token == GOOD
    assert consume_token(paths, found) == ["imprint-seed"]
    # Not only the file: the freed clusters must not keep K either.
    assert GOOD.encode().encode() not in image.read_bytes()
    with pytest.raises(ChannelBroken, match="consumed by an earlier bind"):
        read("imprint-seed", paths)
    # The filesystem is still consistent after the in-place wipe.
    fsck = shutil.which("fsck.vfat", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert fsck is not None
    check = subprocess.run([fsck, "-n", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_vfat_seed_is_read_and_wiped_with_the_mtools_the_distro_names(tmp_path: Path) -> None:
    # Each named program is a wrapper that logs its argv, then runs the real one: a distribution
    # (or a test) that names other mtools gets those run, for reading and for the wipe alike.
    tools = ("mdir", "mtype", "mshowfat", "mmd", "mcopy")
    logs = {tool: tmp_path / f"{tool}.argv" for tool in tools}
    named: dict[str, str] = {}
    for tool in tools:
        real = shutil.which(tool)
        assert real is not None, f"{tool} is not installed"
        wrapper = tmp_path / f"wrapped-{tool}"
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {logs[tool]}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
        named[tool] = str(wrapper)
    paths = Distro(tmp_path / "root", programs=Programs(**named))
    # A token file in a directory, so that writing it back needs mmd too.
    image = mkfs_vfat("IMPRINT", {"token": f"{GOOD.encode()}\n".encode()}, tmp_path / "seed.img")
    attach(paths, "IMPRINT", image)
    assert seed.read(paths) == Offer(GOOD)
    assert logs["mdir"].exists() and logs["mtype"].exists()
    assert seed.consume(paths)
    assert logs["mshowfat"].exists() and logs["mcopy"].exists()
    volumes.write_file(image, "/a/b.txt", b"x", paths.programs)
    assert "::/a" in logs["mmd"].read_text().split()
    with pytest.raises(ChannelBroken, match="consumed by an earlier bind"):
        seed.read(paths)


def test_consume_on_a_vfat_seed_made_by_mtools_with_a_long_file(paths: Distro, tmp_path: Path) -> None:
    # A token file spanning several clusters (with padding lines after the token): all are zeroed.
    content = f"{GOOD.encode()}\n".encode() + b"#" * 9000
    image = mkfs_vfat("IMPRINT", {"token": content}, tmp_path / "s.img")
    attach(paths, "IMPRINT", image)
    assert seed.consume(paths)
    assert GOOD.encode().encode() not in image.read_bytes()
    assert b"#" * 100 not in image.read_bytes()
    assert volumes.detect(image) is volumes.Kind.VFAT
    with volumes.open_volume(image) as volume:
        assert volume.read("/token") == seed.CONSUMED_MARKER


def test_consume_leaves_an_iso_seed_alone(paths: Distro, tmp_path: Path) -> None:
    label, image = make("imprint-seed", "site-iso", GOOD.encode(), tmp_path / "seed.iso")
    attach(paths, label, image)
    before = image.read_bytes()
    assert seed.consume(paths) is False
    assert image.read_bytes() == before
    assert read("imprint-seed", paths) == GOOD


def test_consume_without_a_seed(paths: Distro) -> None:
    assert seed.consume(paths) is False


def test_consume_on_a_read_only_vfat_seed(paths: Distro, tmp_path: Path) -> None:
    label, image = make("imprint-seed", "site-vfat", GOOD.encode(), tmp_path / "seed.img")
    image.chmod(0o400)
    immutable = False
    if os.geteuid() == 0:
        # Root ignores permission bits; the immutable attribute refuses writes even to root,
        # like a device attached readonly=on.
        immutable = subprocess.run(["chattr", "+i", str(image)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("running as root on a filesystem without chattr +i: cannot make the seed read-only")
    try:
        attach(paths, label, image)
        assert seed.consume(paths) is False
        assert read("imprint-seed", paths) == GOOD
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(image)], check=True)


def test_interrupted_wipe_is_broken_not_k(paths: Distro, tmp_path: Path) -> None:
    image = mkfs_vfat("IMPRINT", {"token": bytes(75)}, tmp_path / "s.img")
    attach(paths, "IMPRINT", image)
    with pytest.raises(ChannelBroken, match="only zero bytes"):
        read("imprint-seed", paths)


def test_write_file_refuses_iso(tmp_path: Path) -> None:
    _, image = make("imprint-seed", "site-iso", GOOD.encode(), tmp_path / "seed.iso")
    with pytest.raises(volumes.VolumeError, match="read-only"):
        volumes.write_file(image, "/token", b"x")


def test_write_file_creates_directories(tmp_path: Path) -> None:
    _, image = make("imprint-seed", "site-vfat", GOOD.encode(), tmp_path / "seed.img")
    volumes.write_file(image, "/a/b/c.txt", b"hello\n")
    with volumes.open_volume(image) as volume:
        assert volume.read("/a/b/c.txt") == b"hello\n"
        assert volume.read("/a/b/missing") is None
        assert volume.read("/missing/dir/file") is None


# -- channels together


def test_nocloud_and_config2_disagreeing_are_refused(paths: Distro, tmp_path: Path) -> None:
    attach(paths, *make("nocloud", "site-iso", GOOD.encode(), tmp_path / "a.iso"))
    attach(paths, *make("config-2", "site-iso", OTHER.encode(), tmp_path / "b.iso"))
    with pytest.raises(ChannelBroken, match="the channels disagree") as info:
        find_token(paths)
    assert info.value.channel == "nocloud+config-2"
    assert GOOD.token_id.hex() in info.value.fault and OTHER.token_id.hex() in info.value.fault


def test_agreeing_channels_are_all_recorded_in_order(paths: Distro, tmp_path: Path) -> None:
    attach(paths, *make("config-2", "site-vfat", GOOD.encode(), tmp_path / "c.img"))
    attach(paths, *make("nocloud", "xorriso", GOOD.encode(), tmp_path / "n.iso"))
    attach(paths, *make("imprint-seed", "site-iso", GOOD.encode(), tmp_path / "i.iso"))
    found = find_token(paths)
    assert found is not None and found.token == GOOD
    assert found.channels == ("imprint-seed", "nocloud", "config-2")


def test_broken_channel_first_in_order_stops_the_search(paths: Distro, tmp_path: Path) -> None:
    attach(paths, "IMPRINT", _garbage(tmp_path / "garbage.img"))
    attach(paths, *make("nocloud", "site-iso", GOOD.encode(), tmp_path / "n.iso"))
    with pytest.raises(ChannelBroken) as info:
        find_token(paths)
    assert info.value.channel == "imprint-seed"


def test_broken_channel_later_in_order_is_not_skipped(paths: Distro, tmp_path: Path) -> None:
    attach(paths, *make("imprint-seed", "site-iso", GOOD.encode(), tmp_path / "i.iso"))
    label, image = make("config-2", "xorriso", _corrupt(GOOD.encode()), tmp_path / "c.iso")
    attach(paths, label, image)
    with pytest.raises(ChannelBroken) as info:
        find_token(paths)
    assert info.value.channel == "config-2"


# -- cloud-init reads what imprint-site makes


def _extract(image: Path, into: Path) -> None:
    """The image's content, extracted by tools independent of imprint's reader."""
    into.mkdir(parents=True)
    if volumes.detect(image) is volumes.Kind.ISO9660:
        subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(image), "-extract", "/", str(into)],
                       check=True, capture_output=True)
        for path in [into, *into.rglob("*")]:  # xorriso keeps the 0400 modes; cloud-init runs as root
            path.chmod(0o700 if path.is_dir() else 0o600)
    else:
        subprocess.run(["mcopy", "-s", "-n", "-i", str(image), "::/*", str(into)], check=True, env=MTOOLS_ENV,
                       capture_output=True)


def _blkid(image: Path) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _cloudinit_paths(tmp_path: Path) -> object:
    from cloudinit import helpers

    return helpers.Paths({"cloud_dir": str(tmp_path / "cloud"), "run_dir": str(tmp_path / "run")})


@pytest.mark.parametrize("form", ["iso", "vfat"])
def test_cloudinit_nocloud_reads_the_site_seed(tmp_path: Path, form: str) -> None:
    from cloudinit.sources import DataSourceNoCloud

    image = site_seed(f"nocloud-{form}", GOOD.encode(), tmp_path / "seed.img")
    # The label and type cloud-init's NoCloud looks for (blkid LABEL=cidata|CIDATA, TYPE=iso9660|vfat).
    probed = _blkid(image)
    assert probed["TYPE"] == ("iso9660" if form == "iso" else "vfat")
    assert probed["LABEL"] in ("cidata", "CIDATA")
    _extract(image, tmp_path / "cloud/seed/nocloud")
    # fs_label None: look only in the seed directory, never at the host's block devices.
    sys_cfg = {"datasource": {"NoCloud": {"fs_label": None}}}
    datasource = DataSourceNoCloud.DataSourceNoCloud(sys_cfg, None, _cloudinit_paths(tmp_path))
    assert datasource.get_data()
    assert datasource.metadata["imprint-token"] == GOOD.encode()
    assert datasource.metadata["instance-id"] == f"imprint-{GOOD.token_id.hex()}"
    assert datasource.metadata["local-hostname"]
    assert datasource.userdata_raw == b"#cloud-config\n{}\n"
    # Why the imprint-site note steers K to the IMPRINT seed: cloud-init publishes meta-data,
    # imprint-token included, in an instance-data.json every user of the guest can read.
    public = tmp_path / "run/instance-data.json"
    assert public.stat().st_mode & 0o777 == 0o644
    assert GOOD.encode() in public.read_text()


@pytest.mark.parametrize("form", ["iso", "vfat"])
def test_cloudinit_configdrive_reads_the_site_seed(tmp_path: Path, form: str) -> None:
    from cloudinit.sources import DataSourceConfigDrive
    from cloudinit.sources.helpers import openstack

    image = site_seed(f"config-2-{form}", GOOD.encode(), tmp_path / "seed.img")
    probed = _blkid(image)
    assert probed["TYPE"] == ("iso9660" if form == "iso" else "vfat")
    assert probed["LABEL"] in ("config-2", "CONFIG-2")
    seed_dir = tmp_path / "cloud/seed/config_drive"
    _extract(image, seed_dir)
    results = openstack.ConfigDriveReader(str(seed_dir)).read_v2()
    assert results["metadata"]["meta"]["imprint-token"] == GOOD.encode()
    datasource = DataSourceConfigDrive.DataSourceConfigDrive({}, None, _cloudinit_paths(tmp_path))
    assert datasource.get_data()
    assert datasource.metadata["meta"]["imprint-token"] == GOOD.encode()
    assert datasource.get_instance_id() == results["metadata"]["uuid"]
    assert datasource.metadata["local-hostname"] == f"imprint-{GOOD.token_id.hex()}"
