"""A local user of the VM against the root agent's backends (issue 9, item 7): sparse files of
256 MiB and 4 GiB, symlinks, hard links, FIFOs and devices where a backend reads or writes, in a
real guest root with a real user database. Every one is refused with a message that names the
file and the fault, the agent's memory stays bounded (its peak RSS, measured in the process
that runs the backends), nothing outside the user's own files is read or written, and the other
backends of the same apply still run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from imprint.backends import run_backend
from imprint.backends.rootfs import MAX_HOPS, FileRefused, GuestRoot
from imprint.guest.distro import Distro

from tests.sshkit import keygen, needs_root, seed_root

MiB = 1 << 20
SHADOW = "root:$y$j9T$secret-hash-of-root:19000:0:99999:7:::\n"
# The backends run in a child process, as in the agent, which reports its own peak RSS.
CHILD = """
import json, sys
from pathlib import Path
from imprint.backends import apply_document
from imprint.guest.distro import Distro
report = apply_document(Distro(Path(sys.argv[1])), json.loads(sys.argv[2]))
# VmHWM, the peak RSS of this program (ru_maxrss would include the forking parent's, kept across exec).
with open("/proc/self/status") as f:
    report["maxrss_kib"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps(report))
"""
RSS_BOUND_KIB = 120 * 1024  # the process with every backend module imported is ~40 MiB


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = seed_root(tmp_path / "vm")
    (r / "etc/shadow").write_text((r / "etc/shadow").read_text() + SHADOW)
    return r


@pytest.fixture
def key(tmp_path: Path) -> str:
    return keygen(tmp_path / "alice", "alice@owner")


def apply_in_child(root: Path, document: dict[str, Any], python: str = sys.executable,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([python, "-c", CHILD, str(root), json.dumps(document)], capture_output=True, text=True,
                          timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def alice(root: Path) -> tuple[int, int, Path]:
    """alice, created by the ssh backend: (uid, gid, her ~/.ssh)."""
    assert run_backend(Distro(root), "ssh", {"users": [{"name": "alice"}]})["ok"]
    fields = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                  if line.startswith("alice:"))
    return int(fields[2]), int(fields[3]), root / "home/alice/.ssh"


def as_user(path: Path, uid: int, gid: int) -> Path:
    os.chown(path, uid, gid, follow_symlinks=False)
    return path


def ssh_and_kerberos(key: str) -> dict[str, Any]:
    return {"ssh": {"users": [{"name": "alice", "authorized_keys": [key]}]},
            "kerberos": {"principals": ["host/web1.test@TEST"], "krb5_conf": {"realm": "TEST", "kdc": ["kdc.test"]}}}


# -- sizes: refused from fstat, memory bounded
@needs_root
@pytest.mark.parametrize("size", ["256M", "4G"])
def test_a_sparse_authorized_keys_is_refused_with_bounded_memory(root: Path, key: str, size: str) -> None:
    uid, gid, ssh_dir = alice(root)
    keys = ssh_dir / "authorized_keys"
    subprocess.run(["truncate", "-s", size, str(keys)], check=True)
    as_user(keys, uid, gid)
    report = apply_in_child(root, ssh_and_kerberos(key))
    ssh, kerberos = report["results"]["ssh"], report["results"]["kerberos"]
    assert ssh["ok"] is False
    assert ssh["summary"] == (f"/home/alice/.ssh/authorized_keys is {keys.stat().st_size} bytes; "
                              f"at most {MiB} are read"), ssh["summary"]
    assert kerberos["ok"] is True and kerberos["changed"] is True, kerberos  # the other backend still ran
    assert report["maxrss_kib"] < RSS_BOUND_KIB, report["maxrss_kib"]
    assert keys.stat().st_size == int(size[:-1]) << (20 if size.endswith("M") else 30)  # left as it was


@needs_root
def test_a_sparse_keytab_is_refused_with_bounded_memory(root: Path) -> None:
    keytab = root / "etc/krb5.keytab"
    subprocess.run(["truncate", "-s", "256M", str(keytab)], check=True)
    report = apply_in_child(root, {"kerberos": {"principals": ["host/web1.test@TEST"]}})
    result = report["results"]["kerberos"]
    assert result["ok"] is False and result["summary"] == (
        f"/etc/krb5.keytab is {256 * MiB} bytes; at most {MiB} are read"), result["summary"]
    assert report["maxrss_kib"] < RSS_BOUND_KIB, report["maxrss_kib"]


# -- links and file types a user can make in her own directories
@needs_root
def test_a_hard_link_to_shadow_is_not_read_or_handed_to_the_user(root: Path, key: str) -> None:
    uid, gid, ssh_dir = alice(root)
    keys = ssh_dir / "authorized_keys"
    os.link(root / "etc/shadow", keys)  # what alice can do where fs.protected_hardlinks is 0
    shadow = (root / "etc/shadow").stat()
    result = run_backend(Distro(root), "ssh", {"users": [{"name": "alice", "authorized_keys": [key]}]})
    assert result["ok"] is False
    assert result["summary"] == (f"/home/alice/.ssh/authorized_keys is owned by uid 0, not by the user who controls "
                                 f"its directory (uid {uid}); refusing to read it"), result["summary"]
    after = (root / "etc/shadow").stat()
    assert (after.st_ino, after.st_uid, after.st_mode, after.st_size) == \
        (shadow.st_ino, shadow.st_uid, shadow.st_mode, shadow.st_size)
    assert SHADOW in (root / "etc/shadow").read_text() and keys.stat().st_ino == shadow.st_ino


@needs_root
def test_her_own_hard_linked_file_is_refused_too(root: Path, key: str) -> None:
    uid, gid, ssh_dir = alice(root)
    mine = root / "home/alice/notes"
    mine.write_text("alice's notes\n")
    as_user(mine, uid, gid)
    os.link(mine, ssh_dir / "authorized_keys")
    result = run_backend(Distro(root), "ssh", {"users": [{"name": "alice", "authorized_keys": [key]}]})
    assert result["ok"] is False and result["summary"] == (
        "/home/alice/.ssh/authorized_keys has 2 hard links (it may be another file); refusing to read it")


@needs_root
def test_symlinks_from_authorized_keys_and_from_ssh_are_refused(root: Path, key: str) -> None:
    uid, gid, ssh_dir = alice(root)
    keys = ssh_dir / "authorized_keys"
    keys.symlink_to(root / "etc/shadow")
    as_user(keys, uid, gid)
    before = (root / "etc/shadow").read_bytes()
    config = {"users": [{"name": "alice", "authorized_keys": [key]}]}
    result = run_backend(Distro(root), "ssh", config)
    assert result["ok"] is False and result["summary"] == \
        "/home/alice/.ssh/authorized_keys is a symlink; refusing to follow it"
    keys.unlink()
    ssh_dir.rmdir()
    (root / "home/alice/.ssh").symlink_to(root / "etc")
    as_user(root / "home/alice/.ssh", uid, gid)
    result = run_backend(Distro(root), "ssh", config)
    assert result["ok"] is False and result["summary"] == "/home/alice/.ssh is a symlink; refusing to follow it"
    assert (root / "etc/shadow").read_bytes() == before and not (root / "etc/authorized_keys").exists()


@needs_root
def test_a_fifo_does_not_block_the_agent(root: Path, key: str) -> None:
    uid, gid, ssh_dir = alice(root)
    os.mkfifo(ssh_dir / "authorized_keys")
    as_user(ssh_dir / "authorized_keys", uid, gid)
    report = apply_in_child(root, ssh_and_kerberos(key))  # a blocked open would hang here (600 s timeout)
    assert report["results"]["ssh"]["summary"] == \
        "/home/alice/.ssh/authorized_keys is a FIFO, not a regular file; refusing to open it"
    assert report["results"]["kerberos"]["ok"] is True


@needs_root
def test_a_profile_path_through_a_users_symlink_is_refused(root: Path) -> None:
    """The owner names a path in a user's home; the user makes a directory on it a symlink to
    /etc/ssl. The write must not land in /etc/ssl/private, the read must not come from there."""
    uid, gid, _ = alice(root)
    (root / "etc/ssl/private").mkdir(parents=True)
    link = root / "home/alice/tls"
    link.symlink_to(root / "etc/ssl")
    as_user(link, uid, gid)
    result = run_backend(Distro(root), "x509", {"dns_names": ["vm"], "include_addresses": False,
                                                    "key_path": "/home/alice/tls/private/imprint.key"})
    assert result["ok"] is False and result["summary"] == (
        f"/home/alice/tls is a symlink in a directory that uid {uid} controls; refusing to follow it"), result
    assert list((root / "etc/ssl/private").iterdir()) == []
    keytab = run_backend(Distro(root), "kerberos", {"principals": ["host/vm@TEST"],
                                                        "keytab_path": "/home/alice/tls/krb5.keytab"})
    assert keytab["ok"] is False and "/home/alice/tls is a symlink in a directory that uid" in keytab["summary"]


@needs_root
def test_a_root_symlink_resolves_inside_the_root(root: Path) -> None:
    """A symlink root made (the image's own, e.g. merged /usr) is followed, but its target is a
    guest path: an absolute one starts again at --root, '..' stops there."""
    unique = f"/imprint-test-{uuid.uuid4().hex}"  # exists nowhere on the host
    (root / unique.lstrip("/")).mkdir()
    (root / "etc/certs-abs").symlink_to(unique)
    (root / "etc/certs-rel").symlink_to("../../../../../.." + unique)
    for name in ("certs-abs", "certs-rel"):
        result = run_backend(Distro(root), "x509", {"dns_names": ["vm"], "include_addresses": False,
                                                        "key_path": f"/etc/{name}/{name}.key"})
        assert result["ok"], result["summary"]
        assert stat.S_IMODE((root / unique.lstrip("/") / f"{name}.key").stat().st_mode) == 0o600
    assert not Path(unique).exists()


# -- the walk itself
def test_walk_refusals(tmp_path: Path) -> None:
    files = GuestRoot(tmp_path)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o1777)
    (tmp_path / "shared/x").write_text("x")
    with pytest.raises(FileRefused, match=r"^/shared is writable by group or others \(mode 1777\); refusing"):
        files.read("/shared/x")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(FileRefused, match=f"^/[ab]: more than {MAX_HOPS} symlinks on the way"):
        files.read("/a/x")
    os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(FileRefused, match="^/null is a character device, not a regular file; refusing to open it$"):
        files.read("/null")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileRefused, match="^/dir is a directory, not a regular file"):
        files.read("/dir")
    (tmp_path / "file").write_text("12345")
    with pytest.raises(FileRefused, match="^/file is 5 bytes; at most 4 are read$"):
        files.read("/file", limit=4)
    with pytest.raises(FileRefused, match="^/file is a regular file, not a directory$"):
        files.read("/file/below")
    for bad, message in (("relative", "is not an absolute guest path"), ("/etc/../x", "'..' is not allowed"),
                         ("/etc/\x1b[2Jx", "contains a control character"), ("/x\0y", "contains a control")):
        with pytest.raises(FileRefused, match=message):
            files.read(bad)
    assert files.read("/missing/x") is None and files.read("/missing") is None
    with pytest.raises(FileRefused, match=f"^cannot open the root {tmp_path}/none: No such file or directory$"):
        GuestRoot(tmp_path / "none").read("/x")
    assert files.read("/file") == b"12345"


def test_proc_files_are_read_up_to_the_bound(tmp_path: Path) -> None:
    """procfs says size 0: only the bounded read tells, and it stops at the bound."""
    files = GuestRoot(Path("/"))
    assert files.read("/proc/self/status", limit=64 * 1024) is not None
    with pytest.raises(FileRefused, match=r"^/proc/\d+/status is larger than 16 bytes; at most 16 are read$"):
        files.read("/proc/self/status", limit=16)


def test_a_planted_temp_name_is_never_written_through(tmp_path: Path) -> None:
    files = GuestRoot(tmp_path)
    (tmp_path / "victim").write_text("untouched")
    os.link(tmp_path / "victim", tmp_path / f".target.tmp.{os.getpid()}")  # the name the writer would use
    files.write("/target", b"new", mode=0o600)
    assert (tmp_path / "target").read_text() == "new" and (tmp_path / "victim").read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target", "victim"]
