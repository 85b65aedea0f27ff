"""Hostile seeds (issue 9, item 4): whatever a site puts on its boot channels, the agent reaches its
listening line or refuses clearly, within a bounded time and memory, never in a traceback.

Real artefacts throughout: ISO images made by genisoimage and then patched (a directory record
pointing back at the root), vfat images made by mkfs.vfat and mtools then patched (a size that
lies, a cluster chain that loops), FIFOs where files and devices belong, the real
``imprint-agent run --root`` process (its peak RSS from /proc and wait4, its address space capped
so that a runaway fails instead of filling the machine), and a metadata service that drips its
answer a byte at a time. Each case here hung, grew without bound, crashed or was accepted at
b64daa9.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from imprint import metadisk, tokens
from imprint.channels import ChannelBroken, cloudinit, configdrive, imds, nocloud
from imprint.guest.distro import Distro

from tests.helpers import agentroot
from tests.helpers.fake_imds import FakeIMDS
from tests.helpers.servers import LoopbackServer

GOOD = tokens.Token(tokens.TokenKind.SHARED, bytes(range(32)))
NOSECRET = tokens.Token(tokens.TokenKind.NOSECRET, bytes(range(7, 39)))
# A run of the agent must reach READY or its refusal within this, on a busy two-core machine.
AGENT_BOUND = 25.0
# The agent peaks at ~30 MB; the cyclic ISO took it to 900 MB at b64daa9.
RSS_BOUND = 120 * 1024 * 1024
# The agent's address space is capped (RLIMIT_AS) so that a runaway fails fast instead of
# swapping the machine; ~250 MB of it is mapped at READY.
ADDRESS_SPACE = 2 * 1024 * 1024 * 1024
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
DEEP = 100_000


# -- the real agent process


@dataclass
class Outcome:
    ready: bool
    timed_out: bool
    returncode: int
    peak_rss: int
    elapsed: float
    log: str

    def describe(self) -> str:
        return (f"ready={self.ready} timed_out={self.timed_out} rc={self.returncode} "
                f"peak_rss={self.peak_rss // 1024} KiB elapsed={self.elapsed:.1f} s\nlog:\n{self.log}")


def _vm_hwm(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return _hwm_bytes(status)


# The agent reports its own VmHWM when it exits: wait4's ru_maxrss would include the RSS of the
# pytest process it was forked from (Linux carries the pre-exec high-water mark into it).
_HWM_PRELUDE = """
import atexit, runpy, sys
_out = sys.argv.pop(1)
def _report():
    with open("/proc/self/status") as status, open(_out, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")))
atexit.register(_report)
sys.argv[0] = "imprint-agent"
runpy.run_module("imprint.guest", run_name="__main__")
"""


def _reported_hwm(path: Path) -> int:
    try:
        return _hwm_bytes(path.read_text())
    except OSError:
        return 0  # killed (after READY, sampled then) or never got that far


def _hwm_bytes(status: str) -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def run_agent(root: Path, *extra: str, env: dict[str, str] | None = None) -> Outcome:
    """``imprint-agent run --root`` until READY (then stopped), its exit, or AGENT_BOUND seconds."""
    sock_dir = tempfile.mkdtemp(prefix="imprint-hostile-")
    sock_path = os.path.join(sock_dir, "n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    log_path = root.parent / f"{root.name}-agent.log"
    environment = {**os.environ, **(env or {}), "NOTIFY_SOCKET": sock_path, "PYTHONUNBUFFERED": "1"}
    environment.pop("CREDENTIALS_DIRECTORY", None)
    hwm_file = Path(sock_dir) / "hwm"
    command = [sys.executable, "-c", _HWM_PRELUDE, str(hwm_file), "run", "--root", str(root), "--listen", "127.0.0.1:0",
               "--announce-interval", "3600", *extra]
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    ready = exited = False
    hwm = 0
    pidfd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(notify, selectors.EVENT_READ)
            selector.register(pidfd, selectors.EVENT_READ)
            while not (ready or exited):
                remaining = started + AGENT_BOUND - time.monotonic()
                events = selector.select(remaining) if remaining > 0 else []
                if not events:
                    break
                for key, _ in events:
                    if key.fileobj is notify:
                        if "READY=1" in notify.recv(4096).decode("utf-8", "replace"):
                            ready = True
                            hwm = _vm_hwm(proc.pid)
                    else:
                        exited = True
        elapsed = time.monotonic() - started
        if not exited:  # through the pidfd: Popen.kill() would poll(), reaping it before wait4
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        os.close(pidfd)
        notify.close()
        hwm = max(hwm, _reported_hwm(hwm_file))
        shutil.rmtree(sock_dir, ignore_errors=True)
    return Outcome(ready=ready, timed_out=not (ready or exited), returncode=proc.returncode,
                   peak_rss=hwm, elapsed=elapsed, log=log_path.read_text())


def assert_prompt(outcome: Outcome) -> None:
    assert not outcome.timed_out, f"neither listening nor refusing within {AGENT_BOUND} s: {outcome.describe()}"
    assert outcome.peak_rss < RSS_BOUND, outcome.describe()
    assert "Traceback" not in outcome.log, outcome.describe()


def assert_listening(outcome: Outcome, channel: str = "cmdline") -> None:
    assert_prompt(outcome)
    assert outcome.ready, outcome.describe()
    assert re.search(rf"found a \S+-mode token \(id [0-9a-f]+\) on {channel}\b", outcome.log), outcome.describe()
    assert "listening on 127.0.0.1:" in outcome.log, outcome.describe()


def assert_refused(outcome: Outcome, fault: str) -> None:
    assert_prompt(outcome)
    assert not outcome.ready and outcome.returncode == 1, outcome.describe()
    assert re.search(fault, outcome.log), f"{fault!r} not in the log: {outcome.describe()}"


def make_root(tmp_path: Path, token: tokens.Token | None = GOOD) -> Path:
    return agentroot.make_root(tmp_path, "vm", None if token is None else token.encode())


def attach(root: Path, kind: str, name: str, target: Path) -> None:
    """udev's /dev/disk/by-<kind>/<name> link to ``target``."""
    link = root / "dev" / "disk" / f"by-{kind}" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


# -- ISO9660 with a directory cycle


def genisoimage(label: str, files: dict[str, bytes], out: Path, *extensions: str) -> Path:
    src = out.with_suffix(".d")
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    subprocess.run(["genisoimage", "-quiet", "-output", str(out), "-volid", label, *extensions, str(src)],
                   check=True, capture_output=True)
    return out


def _trees(data: bytes) -> Iterator[tuple[int, int, bool]]:
    """(root extent, root size, is Joliet) of the primary and each supplementary tree."""
    offset = 0x8000
    while data[offset] != 255:
        if data[offset] in (1, 2):
            record = data[offset + 156 : offset + 190]
            yield struct.unpack_from("<I", record, 2)[0], struct.unpack_from("<I", record, 10)[0], data[offset] == 2
        offset += 2048


def _records(data: bytes, extent: int, size: int) -> Iterator[int]:
    position, end = extent * 2048, extent * 2048 + size
    while position < end:
        if data[position] == 0:
            position = (position // 2048 + 1) * 2048
            continue
        yield position
        position += data[position]


def point_at_root(image: Path, name: str) -> None:
    """Make the directory ``name`` (in the root directory) of every tree point back at the root."""
    data = bytearray(image.read_bytes())
    patched = 0
    for root_extent, root_size, joliet in list(_trees(bytes(data))):
        wanted = name.encode("utf-16-be") if joliet else name.upper()[:8].encode()
        for position in _records(bytes(data), root_extent, root_size):
            identifier = bytes(data[position + 33 : position + 33 + data[position + 32]])
            if data[position + 25] & 2 and identifier == wanted:
                struct.pack_into("<I", data, position + 2, root_extent)
                struct.pack_into(">I", data, position + 6, root_extent)
                struct.pack_into("<I", data, position + 10, root_size)
                struct.pack_into(">I", data, position + 14, root_size)
                patched += 1
    assert patched, f"no directory {name} found to patch"
    image.write_bytes(bytes(data))


THEIRS = {"meta-data": b"instance-id: theirs\nlocal-hostname: theirs\n",
          "user-data": b"#cloud-config\npackages: [htop]\n",
          "extra/notes.txt": b"someone else's seed\n"}


@pytest.mark.parametrize("extensions", [("-joliet",), ("-joliet", "-rock"), ()],
                         ids=["joliet", "joliet+rockridge", "plain"])
def test_someone_elses_cyclic_iso_does_not_stop_the_cmdline_token(tmp_path: Path, extensions: tuple[str, ...]) -> None:
    image = genisoimage("cidata", THEIRS, tmp_path / "theirs.iso", *extensions)
    point_at_root(image, "extra")
    root = make_root(tmp_path)
    attach(root, "label", "cidata", image)
    # The cycle is in a directory no lookup of the agent goes through: the seed is someone
    # else's (no imprint token), the token on the kernel command line is found.
    assert_listening(run_agent(root))


def test_cycle_on_the_looked_up_path_is_a_prompt_refusal(tmp_path: Path) -> None:
    meta = json.dumps({"uuid": "u", "meta": {"imprint-token": GOOD.encode()}}).encode()
    image = genisoimage("config-2", {"openstack/latest/meta_data.json": meta}, tmp_path / "c2.iso", "-joliet")
    point_at_root(image, "openstack")
    root = make_root(tmp_path)
    attach(root, "label", "config-2", image)
    assert_refused(run_agent(root), r"config-2 is broken: .*ISO9660 image is corrupt: /openstack points back at "
                                    r"a directory above it \(a cycle\)")


def test_iso_seeds_are_read_without_pycdlib(tmp_path: Path) -> None:
    """The agent's ISO reader is its own: pycdlib is the site's (it builds images), not a runtime
    need of the agent."""
    made = [genisoimage("cidata", {"meta-data": f"imprint-token: {GOOD.encode()}\n".encode()},
                        tmp_path / f"{i}.iso", *ext) for i, ext in enumerate([(), ("-J",), ("-J", "-R")])]
    site = tmp_path / "site.iso"
    subprocess.run([sys.executable, "-m", "imprint.site", "seed", "--channel", "nocloud-iso", "--token",
                    GOOD.encode(), "--out", str(site)], check=True, capture_output=True)
    script = (
        "import sys; sys.modules['pycdlib'] = None\n"  # any import of pycdlib fails
        "from pathlib import Path\n"
        "from imprint.guest import volumes\n"
        "for image in sys.argv[1:]:\n"
        "    with volumes.open_volume(Path(image)) as volume:\n"
        "        print(volume.read('/meta-data').decode().split('imprint-token: ')[1].strip())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *map(str, [*made, site])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [GOOD.encode()] * 4


# -- a FIFO where a file or a device belongs


def _instance_data(instance_id: str = "iid-hostile", meta: dict[str, object] | None = None) -> bytes:
    return json.dumps({"v1": {"instance_id": instance_id}, "ds": {"meta_data": meta or {}}}).encode()


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _fifo_instead_of(case: str, root: Path, tmp_path: Path) -> str:
    """Put a FIFO where ``case`` expects a file or a device; the channel that reads it."""
    if case == "proc-cmdline":
        (root / "proc/cmdline").unlink()
        _fifo(root / "proc/cmdline")
        return "cmdline"
    if case == "credential":
        _fifo(root / "run/credentials/@system/imprint.token")
        return "credentials"
    if case == "fw_cfg":
        _fifo(root / "sys/firmware/qemu_fw_cfg/by_name/opt/org.imprint/token/raw")
        return "fw_cfg"
    if case == "metadata-disk":  # udev's by-id link, followed on purpose, leads to a FIFO
        attach(root, "id", "virtio-imprint", _fifo(tmp_path / "disk.fifo"))
        return "metadata-disk"
    if case in ("cidata", "IMPRINT"):
        attach(root, "label", case, _fifo(tmp_path / f"{case}.fifo"))
        return "nocloud" if case == "cidata" else "imprint-seed"
    if case == "instance-data":
        _fifo(root / "run/cloud-init/instance-data-sensitive.json")
        return "cloud-init"
    assert case == "user-data"
    (root / "run/cloud-init").mkdir(parents=True)
    (root / "run/cloud-init/instance-data-sensitive.json").write_bytes(_instance_data())
    _fifo(root / "var/lib/cloud/instances/iid-hostile/user-data.txt")
    return "cloud-init"


FIFOS = ["proc-cmdline", "credential", "fw_cfg", "metadata-disk", "cidata", "IMPRINT", "instance-data", "user-data"]


@pytest.mark.parametrize("case", FIFOS)
def test_fifo_is_refused_at_once(tmp_path: Path, case: str) -> None:
    root = make_root(tmp_path)  # a valid token on the command line (gone when the FIFO replaces it)
    channel = _fifo_instead_of(case, root, tmp_path)
    # A channel that is present but unreadable is broken, and broken fails closed: a prompt
    # refusal that names the channel and the fault, not a wait for a writer that never comes.
    assert_refused(run_agent(root), rf"boot channel {re.escape(channel)} is broken: .*it is a FIFO, not ")


# -- deep, duplicated and NUL-carrying JSON

DEEP_JSON = b"[" * DEEP + b"]" * DEEP


def _write_instance_data(paths: Distro, data: bytes) -> None:
    paths.cloud_init_instance_data.parent.mkdir(parents=True, exist_ok=True)
    paths.cloud_init_instance_data.write_bytes(data)


# cloud-init's pause before it reads an invalid file again, shortened: each file here stays invalid.
REREAD_PAUSE = 0.01


@pytest.fixture
def paths(tmp_path: Path) -> Distro:
    return Distro(tmp_path / "root")


def test_deep_cloudinit_instance_data_is_broken_not_a_recursion_error(paths: Distro) -> None:
    _write_instance_data(paths, b'{"ds": {"meta_data": {"x": ' + DEEP_JSON + b"}}}")
    with pytest.raises(ChannelBroken, match=rf"invalid JSON \(nested {DEEP + 3} levels deep \(at most 64\)\)"):
        cloudinit.read(paths, reread_pause=REREAD_PAUSE)


def test_deep_cloudinit_instance_data_stops_the_agent_without_traceback(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    _write_instance_data(Distro(root), DEEP_JSON)
    assert_refused(run_agent(root), r"boot channel cloud-init is broken: .*nested \d+ levels deep")


def test_nul_in_the_instance_id_is_broken_not_a_value_error(paths: Distro) -> None:
    _write_instance_data(paths, _instance_data("iid\u0000../../etc"))
    with pytest.raises(ChannelBroken, match="a string holds a NUL character"):
        cloudinit.read(paths, reread_pause=REREAD_PAUSE)


def test_control_characters_in_the_instance_id_are_broken(paths: Distro) -> None:
    _write_instance_data(paths, _instance_data("iid\u001b[2J"))
    with pytest.raises(ChannelBroken, match=r"v1/instance_id iid\\x1b\[2J cannot name a directory"):
        cloudinit.read(paths, reread_pause=REREAD_PAUSE)


def test_duplicate_key_is_broken_not_the_last_one_wins(paths: Distro) -> None:
    other = tokens.Token(tokens.TokenKind.SHARED, bytes(32)).encode()
    _write_instance_data(paths, f'{{"ds": {{"meta_data": {{"imprint-token": "{other}", '
                                f'"imprint-token": "{GOOD.encode()}"}}}}}}'.encode())
    with pytest.raises(ChannelBroken, match="the key imprint-token is given twice in one object"):
        cloudinit.read(paths, reread_pause=REREAD_PAUSE)


def test_deep_config2_meta_data_is_broken(tmp_path: Path) -> None:
    root = tmp_path / "root"
    image = genisoimage("config-2", {"openstack/latest/meta_data.json": DEEP_JSON[:40_000] + DEEP_JSON[-20_000:]},
                        tmp_path / "c2.iso", "-J", "-R")
    attach(root, "label", "config-2", image)
    with pytest.raises(ChannelBroken, match=r"meta_data.json is not valid JSON: nested \d+ levels deep"):
        configdrive.read(Distro(root))


def test_deep_nocloud_json_meta_data_names_the_depth() -> None:
    nested = "[" * 30_000 + "]" * 30_000  # what fits in a meta-data file (64 KiB)
    with pytest.raises(nocloud.MetaDataError, match=r"nested 30001 levels deep \(at most 64\)"):
        nocloud.meta_data_value('{"imprint-token": "x", "a": ' + nested + "}", "imprint-token")
    assert nocloud.meta_data_value('{"a": ' + nested + "}", "imprint-token") is None


def test_long_meta_data_line_is_read_in_linear_time() -> None:
    # The key regex backtracked quadratically over a run of blanks: 12 s for this line.
    started = time.process_time()
    assert nocloud.meta_data_value("a" + " " * 60_000 + "b\n", "imprint-token") is None
    assert nocloud.meta_data_value(f"imprint-token: {GOOD.encode()}" + " " * 60_000 + "x\n",
                                   "imprint-token") == GOOD.encode() + " " * 60_000 + "x"
    assert time.process_time() - started < 1.0


# -- the metadata disk header


def _disk(reply_offset: int, reply_size: int, token: str = NOSECRET.encode()) -> bytes:
    """A metadata disk whose header (checksum included) declares this reply area."""
    raw = token.encode()
    fixed = struct.pack(">8sHHHHII", metadisk.MAGIC, metadisk.VERSION, 0, len(raw), 0, reply_offset, reply_size)
    header = fixed + hashlib.sha256(fixed + raw).digest() + raw
    return header + bytes(metadisk.DISK_SIZE - len(header))


@pytest.mark.parametrize(("offset", "size", "fault"), [
    (metadisk.REPLY_OFFSET, 0xFFFF_FFFF, "ends past 65536"),
    (0xFFFF_F000, metadisk.REPLY_SIZE, "ends past 65536"),
    (1024, metadisk.REPLY_SIZE, "overlaps the header block"),
    (metadisk.REPLY_OFFSET, 16, "too small"),
])
def test_metadisk_reply_area_is_bounded(offset: int, size: int, fault: str) -> None:
    with pytest.raises(metadisk.MetadiskError, match=fault):
        metadisk.decode_header(_disk(offset, size))


def test_metadisk_with_4_gib_reply_is_a_prompt_refusal(tmp_path: Path) -> None:
    image = tmp_path / "meta.img"
    image.write_bytes(_disk(metadisk.REPLY_OFFSET, 0xFFFF_FFFF))
    root = make_root(tmp_path, token=None)
    attach(root, "id", "virtio-imprint", image)
    # A no-secrets token: the agent would write its VM token into the reply area.
    assert_refused(run_agent(root), r"metadata-disk is broken: reply area at 4096 of 4294967295 bytes ends past")
    assert image.stat().st_size == metadisk.DISK_SIZE


def test_site_reverse_refuses_a_4_gib_reply_area(tmp_path: Path) -> None:
    image = tmp_path / "meta.img"
    image.write_bytes(_disk(metadisk.REPLY_OFFSET, 0xFFFF_FFFF))
    result = subprocess.run([sys.executable, "-m", "imprint.site", "reverse", "--from", str(image)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "reply area at 4096 of 4294967295 bytes ends past" in result.stderr
    assert "Traceback" not in result.stderr


# -- vfat that lies


def mkfs_vfat(label: str, files: dict[str, bytes], out: Path) -> Path:
    mkfs = shutil.which("mkfs.vfat", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert mkfs is not None
    subprocess.run([mkfs, "-n", label, "-C", str(out), "1024"], check=True, capture_output=True)
    for name, data in files.items():
        subprocess.run(["mcopy", "-i", str(out), "-", f"::/{name}"], input=data, check=True, env=MTOOLS_ENV)
    return out


@dataclass(frozen=True)
class _Fat12:
    image: bytearray

    @property
    def bpb(self) -> tuple[int, ...]:
        return struct.unpack_from("<HBHBHHBH", self.image, 11)

    def entry(self, short_name: bytes) -> int:
        """Offset of the root directory entry whose 8.3 name starts with ``short_name``."""
        bps, _, reserved, fats, entries, _, _, per_fat = self.bpb
        start = (reserved + fats * per_fat) * bps
        for offset in range(start, start + entries * 32, 32):
            if self.image[offset + 11] != 0x0F and self.image[offset : offset + 11].startswith(short_name):
                return offset
        raise AssertionError(f"no entry {short_name!r}")

    def set_size(self, short_name: bytes, size: int) -> None:
        struct.pack_into("<I", self.image, self.entry(short_name) + 28, size)

    def chain_start(self, short_name: bytes) -> int:
        return int(struct.unpack_from("<H", self.image, self.entry(short_name) + 26)[0])

    def set_next(self, cluster: int, value: int) -> None:
        bps, _, reserved, fats, _, _, _, per_fat = self.bpb
        for copy in range(fats):
            offset = (reserved + copy * per_fat) * bps + cluster * 3 // 2
            word = self.image[offset] | self.image[offset + 1] << 8
            word = (word & 0x000F) | (value << 4) if cluster & 1 else (word & 0xF000) | value
            self.image[offset], self.image[offset + 1] = word & 0xFF, word >> 8


def _vfat_seed(tmp_path: Path, patch: Callable[[_Fat12], None]) -> Path:
    meta = f"instance-id: x\nimprint-token: {GOOD.encode()}\n".encode() + b"# " * 2500  # three clusters
    image = mkfs_vfat("CIDATA", {"meta-data": meta, "user-data": b"#cloud-config\n"}, tmp_path / "seed.img")
    fat = _Fat12(bytearray(image.read_bytes()))
    patch(fat)
    image.write_bytes(bytes(fat.image))
    return image


@pytest.mark.parametrize(("patch", "fault"), [
    # mtype silently outputs the cluster chain when the entry's size says more: the size is checked.
    (lambda fat: fat.set_size(b"META-D", 0xFFFF_FFF0), r"/meta-data is 4294967280 bytes, larger than"),
    (lambda fat: fat.set_size(b"META-D", 9000), r"/meta-data declares 9000 bytes, its clusters hold 6144"),
    # A chain that loops back on itself, and a size that asks mtools to follow it.
    (lambda fat: (fat.set_next(fat.chain_start(b"META-D") + 2, fat.chain_start(b"META-D")),
                  fat.set_size(b"META-D", 60_000)), r"FAT filesystem is corrupt: mtype failed: loop detected"),
], ids=["huge-size", "size-beyond-chain", "chain-loop"])
def test_vfat_that_lies_is_broken(tmp_path: Path, patch: Callable[[_Fat12], None], fault: str) -> None:
    root = make_root(tmp_path, token=None)
    attach(root, "label", "CIDATA", _vfat_seed(tmp_path, patch))
    assert_refused(run_agent(root), rf"boot channel nocloud is broken: CIDATA .*{fault}")


def test_loop_in_a_file_nobody_reads_leaves_the_seed_absent(tmp_path: Path) -> None:
    files = {"meta-data": b"instance-id: theirs\n", "user-data": b"#cloud-config\n" + b"# " * 3000}
    image = mkfs_vfat("CIDATA", files, tmp_path / "theirs.img")
    fat = _Fat12(bytearray(image.read_bytes()))
    start = fat.chain_start(b"USER-D")
    fat.set_next(start + 1, start)
    image.write_bytes(bytes(fat.image))
    root = make_root(tmp_path)
    attach(root, "label", "CIDATA", image)
    assert_listening(run_agent(root))


# -- a metadata service that drips


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIMDS]:
    with FakeIMDS() as fake:
        monkeypatch.setenv(imds.BASE_URL_ENV, fake.url)
        yield fake


def _timed_read(paths: Distro, bound: float, timeouts: imds.Timeouts = imds.DEFAULT_TIMEOUTS
                ) -> tuple[float, tokens.Token | None | BaseException]:
    """imds.read in a thread, so that a poll that never ends fails the test instead of hanging it."""
    result: list[tokens.Token | None | BaseException] = []

    def poll() -> None:
        try:
            result.append(imds.read(paths, timeouts))
        except BaseException as exc:  # handed to the test
            result.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"the metadata-service poll was still running after {bound} s"
    return time.monotonic() - started, result[0]


def test_trickling_answer_ends_within_the_deadline(service: FakeIMDS, tmp_path: Path) -> None:
    service.site.tag = GOOD.encode()
    service.site.trickle = 0.2  # ~150 bytes: 30 s per answer, each byte well within a per-read timeout
    bound = imds.CONNECT_TIMEOUT + imds.READ_TIMEOUT + 2.0
    elapsed, outcome = _timed_read(Distro(tmp_path), bound)
    assert outcome is None  # no complete answer in time: absent for this poll, asked again later
    assert elapsed >= imds.READ_TIMEOUT * 0.9


def test_the_whole_poll_is_bounded(service: FakeIMDS, tmp_path: Path) -> None:
    service.site.delay = 0.6  # each answer in time, but session + tag + OpenStack do not fit in the poll
    service.site.sessions = False
    service.site.session_refusal = 404
    service.site.require_session = False
    elapsed, outcome = _timed_read(Distro(tmp_path), 1.5 + 1.5, imds.Timeouts(poll=1.5))
    assert outcome is None
    assert [path for _, path in service.site.requests][:2] == [imds.SESSION_PATH, imds.TAG_PATH]


def _endless_headers(conn: socket.socket) -> None:
    """A service whose answer never leaves its headers (until the client hangs up)."""
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while True:
        conn.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")


def test_endless_headers_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LoopbackServer(_endless_headers, name="endless-headers") as server:
        monkeypatch.setenv(imds.BASE_URL_ENV, f"http://{server.address}")
        _, outcome = _timed_read(Distro(tmp_path), imds.CONNECT_TIMEOUT + imds.READ_TIMEOUT + 2.0)
    assert isinstance(outcome, ChannelBroken), outcome
    assert re.search(r"the answer is larger than \d+ bytes with its headers", outcome.fault)


def test_deep_openstack_json_is_broken_not_a_recursion_error(service: FakeIMDS, tmp_path: Path) -> None:
    service.site.sessions = False
    service.site.session_refusal = 404
    service.site.require_session = False
    service.site.openstack = b'{"meta": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with pytest.raises(ChannelBroken, match=r"meta_data.json: invalid JSON \(nested \d+ levels deep"):
        imds.read(Distro(tmp_path))


def test_huge_directory_is_refused_without_reading_it(tmp_path: Path) -> None:
    image = genisoimage("cidata", THEIRS, tmp_path / "theirs.iso")
    data = bytearray(image.read_bytes())
    size = 512 * 1024 * 1024  # the root directory "holds" half a GiB (past the end of the image, too)
    struct.pack_into("<I", data, 0x8000 + 156 + 10, size)
    struct.pack_into(">I", data, 0x8000 + 156 + 14, size)
    image.write_bytes(bytes(data))
    root = tmp_path / "root"
    attach(root, "label", "cidata", image)
    with pytest.raises(ChannelBroken, match=r"the root directory is 536870912 bytes \(a seed's directories hold "
                                            r"at most \d+\)"):
        nocloud.read(Distro(root))


def test_vfat_seed_without_mtools_is_a_clear_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = mkfs_vfat("CIDATA", {"meta-data": b"instance-id: x\n"}, tmp_path / "seed.img")
    root = tmp_path / "root"
    attach(root, "label", "CIDATA", image)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ChannelBroken, match=r"mdir is not installed \(mtools is needed to read a vfat seed\)"):
        nocloud.read(Distro(root))
