"""Writes the seed corpora of the boot-channel targets (iso9660, vfat, metadisk_header, nocloud,
configdrive_json, cloudinit_json, imds): ``python -m tests.fuzz.channel_seeds``.

ISO and vfat seeds are made by the real tools (genisoimage, xorriso, imprint-site's pycdlib
builder, mkfs.vfat + mtools) and trimmed the way the targets take them: an ISO without its 32 KiB
system area, both without trailing zeros (the targets pad with zeros again). Their timestamps
differ from run to run, so unlike tests/fuzz/seeds.py this is not checked for being current: it
is how the committed seeds were made. Each seed is a valid input or a near miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from imprint import metadisk
from imprint.tokens import Token, TokenKind

from tests.fuzz.run import corpus_dir

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def _token(kind: TokenKind = TokenKind.SHARED, label: str = "") -> str:
    return Token(kind, hashlib.sha256(b"imprint fuzz seed\0" + label.encode()).digest()).encode()


T = _token()
N = _token(TokenKind.NOSECRET)


def _files(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def _trim(data: bytes) -> bytes:
    return data.rstrip(b"\0")


NOCLOUD = {"meta-data": f"instance-id: iid-seed\nimprint-token: {T}\n".encode(), "user-data": b"#cloud-config\n{}\n"}
CONFIG2 = {"openstack/latest/meta_data.json": json.dumps({"uuid": "u", "meta": {"imprint-token": T}}).encode()}
IMPRINT = {"token": f"{T}\n".encode()}


def iso9660(work: Path) -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    made: dict[str, Path] = {}
    for name, label, files, args in [
        ("genisoimage-plain-nocloud", "cidata", NOCLOUD, ()),
        ("genisoimage-joliet-nocloud", "cidata", NOCLOUD, ("-J",)),
        ("genisoimage-rockridge-config2", "config-2", CONFIG2, ("-J", "-R")),
        ("genisoimage-rockridge-imprint", "IMPRINT", IMPRINT, ("-R",)),
    ]:
        out = work / f"{name}.iso"
        subprocess.run(["genisoimage", "-quiet", "-o", str(out), "-V", label, *args,
                        str(_files(work / name, files))], check=True, capture_output=True)
        made[name] = out
    out = work / "xorriso.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(out), "-V", "config-2", "-J", "-R",
                    str(_files(work / "xorriso", CONFIG2))], check=True, capture_output=True)
    made["xorriso-config2"] = out
    out = work / "site.iso"
    subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", "nocloud-iso", "--token", T,
                    "--out", str(out)], check=True, capture_output=True)
    made["site-pycdlib-nocloud"] = out
    for name, path in made.items():
        seeds[name] = _trim(path.read_bytes()[0x8000:])
    return seeds


def _through_mtools(image: bytes) -> bytes:
    """The image with a few bytes after it (past the volume: mtools never reads them) such that
    fuzz_vfat's CRC choice sends it through mtools, so that the replay of the seeds does."""
    for pad in range(256):
        padded = image + b"pad" + bytes([pad])
        if zlib.crc32(padded) % 8 == 0:
            return padded
    raise AssertionError("no padding found")


def vfat(work: Path) -> dict[str, bytes]:
    mkfs = shutil.which("mkfs.vfat", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert mkfs is not None
    seeds: dict[str, bytes] = {}
    for name, label, files, args in [
        ("fat12-nocloud", "CIDATA", NOCLOUD, ("-C",)),
        ("fat12-config2", "CONFIG-2", CONFIG2, ("-C",)),
        ("fat12-imprint", "IMPRINT", IMPRINT, ("-C",)),
    ]:
        out = work / f"{name}.img"
        subprocess.run([mkfs, "-n", label, *args, str(out), "256"], check=True, capture_output=True)
        for path, data in files.items():
            parts = path.split("/")
            for depth in range(1, len(parts)):
                subprocess.run(["mmd", "-D", "s", "-i", str(out), "::/" + "/".join(parts[:depth])],
                               env=MTOOLS_ENV, capture_output=True)
            subprocess.run(["mcopy", "-i", str(out), "-", f"::/{path}"], input=data, check=True, env=MTOOLS_ENV)
        seeds[name] = _through_mtools(_trim(out.read_bytes()))
    for fat in ("16", "32"):
        out = work / f"fat{fat}.img"
        subprocess.run([mkfs, "-F", fat, "-n", "CIDATA", "-C", str(out), "40000"], check=True, capture_output=True)
        seeds[f"fat{fat}-boot-sector"] = out.read_bytes()[:512]
    return seeds


def _disk(reply_offset: int, reply_size: int) -> bytes:
    raw = N.encode()
    fixed = struct.pack(">8sHHHHII", metadisk.MAGIC, metadisk.VERSION, 0, len(raw), 0, reply_offset, reply_size)
    return fixed + hashlib.sha256(fixed + raw).digest() + raw


def metadisk_header(work: Path) -> dict[str, bytes]:
    replied = bytearray(metadisk.build(N))
    replied[metadisk.REPLY_OFFSET:] = metadisk.encode_reply(f"IMPRINT-VM-TOKEN {_token(TokenKind.VM)}\n")
    return {
        "fresh": _trim(metadisk.build(N)),
        "shared": _trim(metadisk.build(T)),
        "replied": _trim(bytes(replied)),
        "consumed": _trim(metadisk.encode_header("", flags=metadisk.FLAG_CONSUMED)),
        "reply-4gib": _disk(metadisk.REPLY_OFFSET, 0xFFFF_FFFF),
        "reply-offset-past-end": _disk(0xFFFF_F000, metadisk.REPLY_SIZE),
    }


def nocloud(work: Path) -> dict[str, bytes]:
    texts = {
        "plain": f"instance-id: x\nlocal-hostname: h\nimprint-token: {T}\n",
        "crlf-comment": f"---\r\n# c\r\ninstance-id: x\r\nimprint-token: {T}  # the owner's\r\n...\r\n",
        "single-quoted": f"imprint-token: '{T}'\n",
        "double-quoted-key": f'"imprint-token": "{T}"\n',
        "json": json.dumps({"instance-id": "x", "imprint-token": T}),
        "nested-block": f"network-interfaces: |\n  auto eth0\n  imprint-token: nested\nimprint-token: {T}\n",
        "list-before": f"public-keys:\n  - ssh-ed25519 AAAA\nimprint-token: {T}\nlocal-hostname: h\n",
        "someone-else": "instance-id: theirs\nlocal-hostname: h\nseedfrom: http://example.com:8000/\n",
        "block-scalar": f"imprint-token: |\n  {T}\n",
        "continued": f"imprint-token: {T[:20]}\n  {T[20:]}\n",
        "twice": f"imprint-token: {T}\nimprint-token: {T}\n",
        "flow-mapping": f"{{instance-id: x, imprint-token: {T}}}",
        "anchor": f"imprint-token: &a {T}\n",
        "long-blank-run": "a" + " " * 2000 + "b\n",
        "with-imprint-file": f"instance-id: x\n\n\0imprint\0\n{T}\n",
    }
    return {name: text.encode() for name, text in texts.items()}


def configdrive_json(work: Path) -> dict[str, bytes]:
    site = {"uuid": "0e5e1d7e-6b5f-4f6a-9d55-1a2b3c4d5e6f", "hostname": "h", "name": "h", "launch_index": 0,
            "meta": {"imprint-token": T}}
    return {
        "site": (json.dumps(site, indent=2) + "\n").encode(),
        "no-meta": json.dumps({"uuid": "u", "random_seed": "x" * 64, "public_keys": {"k": "ssh-ed25519 A"}}).encode(),
        "meta-not-object": b'{"meta": "imprint-token=x"}',
        "token-not-string": b'{"meta": {"imprint-token": 42}}',
        "duplicate-key": f'{{"meta": {{"imprint-token": "{T}", "imprint-token": "{T}"}}}}'.encode(),
        "nul-escape": b'{"meta": {"imprint-token": "a\\u0000b"}}',
        "deep": b'{"meta": ' + b"[" * 80 + b"]" * 80 + b"}",
        "constants": b'{"a": NaN, "b": Infinity, "c": 1e999, "d": 123456789012345678901234567890}',
        "truncated": b'{"uuid": "x", "meta": {"imprint-token": ',
    }


def cloudinit_json(work: Path) -> dict[str, bytes]:
    def instance(ds: dict[str, object], instance_id: str = "fuzz", **extra: object) -> bytes:
        return json.dumps({"v1": {"instance_id": instance_id, "cloud_name": "nocloud"}, "ds": ds,
                           "merged_cfg": {}, **extra}).encode()

    user = b"\n\0user-data\0\n"
    return {
        "nocloud-meta": instance({"meta_data": {"imprint-token": T}}),
        "configdrive-meta": instance({"meta_data": {"meta": {"imprint-token": T}}}),
        "ec2-tag": instance({"meta-data": {"tags": {"instance": {"imprint-token": T}}}}),
        "base64-key": instance({"meta_data": {"imprint-token": "aW1wcmludA=="}},
                               base64_encoded_keys=["ds/meta_data/imprint-token"]),
        "user-data": instance({"meta_data": {}}) + user + f"#cloud-config\nimprint-token: {T}\n".encode(),
        "user-data-block": instance({"meta_data": {}}) + user + f"#cloud-config\nimprint-token: |\n  {T}\n".encode(),
        "user-data-gzip": instance({"meta_data": {}}) + user + b"\x1f\x8b\x08\x00",
        "instance-id-control": instance({"meta_data": {}}, instance_id="a\u001bb"),
        "empty": b"",
    }


def _http(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def imds(work: Path) -> dict[str, bytes]:
    openstack = json.dumps({"uuid": "u", "meta": {"imprint-token": N}}).encode()
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (openstack[:10], openstack[10:]))
    return {
        "session": b"\x00" + _http("200 OK", b"AQAEAHq-session-token==", "Content-Type: text/plain"),
        "session-refused": b"\x00" + _http("405 Method Not Allowed", b""),
        "tag": b"\x01" + _http("200 OK", T.encode(), "Content-Type: text/plain"),
        "tag-absent": b"\x01" + _http("404 Not Found", b"Not Found\n"),
        "tag-unauthorised": b"\x81" + _http("401 Unauthorized", b""),
        "openstack": b"\x02" + _http("200 OK", openstack, "Content-Type: application/json"),
        "openstack-chunked": b"\x02" + _http("200 OK", chunked + b"0\r\n\r\n", "Transfer-Encoding: chunked"),
        "openstack-5xx": b"\x02" + _http("503 Service Unavailable", b"busy"),
        "too-long": b"\x01" + _http("200 OK", b"x", "Content-Length: 999999"),
        "http-1.0-no-length": b"\x01" + b"HTTP/1.0 200 OK\r\n\r\n" + T.encode(),
    }


SEEDS = {"iso9660": iso9660, "vfat": vfat, "metadisk_header": metadisk_header, "nocloud": nocloud,
         "configdrive_json": configdrive_json, "cloudinit_json": cloudinit_json, "imds": imds}


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        for name, make in SEEDS.items():
            directory = corpus_dir(name)
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            work = Path(scratch) / name
            work.mkdir()
            for seed, data in make(work).items():
                (directory / seed).write_bytes(data)
            files = list(directory.iterdir())
            print(f"{name}: {len(files)} seeds, {sum(p.stat().st_size for p in files)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
