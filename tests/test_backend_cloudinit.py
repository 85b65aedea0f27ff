"""The cloudinit backend with Debian's cloud-init: its schema validator refuses bad documents with
its own message; its module runner applies write_files and users in the VM's root.

cloud-init's modules have no root prefix: they act on "/" of the system they run in. So the
backend runs them with `chroot ROOT /usr/bin/python3`, and the test makes the agent's root a
real chroot the way an image mounted for offline customisation is one: in a private mount
namespace (set up by a wrapper that is the fixtures' python), the host's /usr is bind-mounted
read-only into the root (bin, lib, lib64, sbin are the merged-/usr symlinks), /dev/null too. The
root's own /etc (a minimal user database, login.defs, cloud.cfg as Debian ships them) and /home
and /srv are the VM's. Nothing of the host's /etc is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from imprint.backends import run_backend
from imprint.guest.paths import GuestPaths

from tests.conftest import AgentFactory, Owner
from tests.sshkit import seed_root

needs_chroot = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/etc/cloud/cloud.cfg").exists() or shutil.which("unshare") is None
    or shutil.which("useradd") is None,
    reason="needs root (mount namespace, chroot, useradd) and Debian's cloud-init",
)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJN1QQaGrlNiT4zze3Ytxp9STE332LaSnMYjOqtRgLUW alice@owner"
DOCUMENT = f"""#cloud-config
write_files:
  - path: /srv/hello.txt
    content: hello from the owner
    permissions: '0640'
  - path: /home/alice/notes.txt
    content: written after alice exists
    owner: alice:alice
    defer: true
users:
  - name: alice
    shell: /bin/sh
    sudo: ALL=(ALL) NOPASSWD:ALL
    ssh_authorized_keys: ["{KEY}"]
"""


def make_chroot(root: Path, tmp: Path) -> Path:
    """The root as an offline image's chroot, and a python wrapper that enters it mounted."""
    seed_root(root)
    for name in ("login.defs",):
        shutil.copy(Path("/etc") / name, root / "etc" / name)
    (root / "etc/cloud").mkdir()
    shutil.copy("/etc/cloud/cloud.cfg", root / "etc/cloud/cloud.cfg")
    (root / "usr").mkdir()
    for name in ("bin", "lib", "lib64", "sbin"):
        (root / name).symlink_to(f"usr/{name}")
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev/null").touch()
    wrapper = tmp / "chroot-python"
    wrapper.write_text("#!/bin/sh\nexec unshare --mount --propagation private -- sh -ec "
                       f"'mount --bind -o ro /usr {root}/usr; mount --bind /dev/null {root}/dev/null; exec \"$@\"' "
                       f'sh {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.lstat().st_mtime_ns, p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
            for d in ("etc", "home", "srv", "var") if (root / d).exists() for p in sorted((root / d).rglob("*"))}


@needs_chroot
def test_bind_then_cloud_init_applies_write_files_and_users(agents: AgentFactory, owner: Owner, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = agents.make_root(owner.token("web1", "shared"))
    monkeypatch.setattr(sys, "executable", str(make_chroot(root, tmp_path)))
    agent = agents.start(root)
    (tmp_path / "web1.user-data").write_text(DOCUMENT)
    profile = tmp_path / "profile.toml"
    profile.write_text(f'[cloudinit]\nfile = "{tmp_path / "web1.user-data"}"\n')
    bound = owner.json("bind", "web1", "--address", agent.address, "--profile", str(profile))
    result = bound["apply"]["results"]["cloudinit"]  # type: ignore[index]
    assert result["ok"] and result["changed"], result
    assert result["data"]["ran"] == ["write_files", "users_groups", "write_files_deferred"]  # cloud.cfg's order

    hello = root / "srv/hello.txt"
    assert hello.read_text() == "hello from the owner" and stat.S_IMODE(hello.stat().st_mode) == 0o640
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    uid, gid = int(users["alice"][2]), int(users["alice"][3])
    assert users["alice"][5:] == ["/home/alice", "/bin/sh"]
    keys = root / "home/alice/.ssh/authorized_keys"
    assert keys.read_text().strip() == KEY and (keys.stat().st_uid, stat.S_IMODE(keys.stat().st_mode)) == (uid, 0o600)
    notes = root / "home/alice/notes.txt"  # deferred: written after the user exists, owned by her
    assert (notes.read_text(), notes.stat().st_uid, notes.stat().st_gid) == ("written after alice exists", uid, gid)
    assert "alice ALL=(ALL) NOPASSWD:ALL" in (root / "etc/sudoers.d/90-cloud-init-users").read_text()
    assert not (root / "run/imprint-cloud-config").exists() or not any((root / "run/imprint-cloud-config").iterdir())

    # The same document again: not run again, nothing changes.
    before = snapshot(root)
    again = owner.json("apply", "web1", "--profile", str(profile))["results"]["cloudinit"]  # type: ignore[index]
    assert again["ok"] and again["changed"] is False and again["data"]["skipped"] is True, again
    assert snapshot(root) == before

    # An invalid document: refused with cloud-init's own message, nothing runs.
    profile.write_text('[cloudinit]\ndocument = "#cloud-config\\nwrite_files:\\n  - content: no path\\n"\n')
    refused = owner.run("apply", "web1", "--profile", str(profile), check=5)
    assert ("cloudinit: FAILED — cloud-init refuses the document: Cloud config schema errors: write_files.0: "
            "'path' is a required property") in refused.stdout, refused.stdout
    assert snapshot(root) == before

    # A TOML table as the document, always = true: cloud-init runs it (again) and says so.
    profile.write_text('[cloudinit]\nalways = true\nconfig = { write_files = [{ path = "/srv/hello.txt", '
                       'content = "second" }] }\n')
    table = owner.json("apply", "web1", "--profile", str(profile))["results"]["cloudinit"]  # type: ignore[index]
    assert table["ok"] and table["changed"] and hello.read_text() == "second", table


def apply_doc(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    result = run_backend(GuestPaths(root), "cloudinit", config)
    json.dumps(result)
    return result


@pytest.mark.parametrize(("document", "message"), [
    ("write_files: []\n", "cloudinit.document must begin with '#cloud-config'"),
    ("#cloud-config\nusers: [\n", "cloudinit.document is not YAML: "),
    ("#cloud-config\n- a list\n", "cloudinit.document must be a non-empty mapping"),
    ("#cloud-config\nusers:\n  - name: bob\n    sudo: 3\n",
     "cloud-init refuses the document: Cloud config schema errors: users.0: {'name': 'bob', 'sudo': 3} is not valid "
     "under any of the given schemas"),
    ("#cloud-config\nwrite_files:\n  - path: /x\n    permissions: 640\n",
     "cloud-init refuses the document: Cloud config schema errors: write_files.0.permissions: 640 is not of type "
     "'string'"),
    ("#cloud-config\nssh_deletekeys: true\n", "does not run cloud-init's ssh module: cc_ssh deletes and regenerates"),
    ("#cloud-config\nruncmd: [[touch, /x]]\n", "does not run cloud-init's runcmd module"),
    ("#cloud-config\nno_such_key: 1\n", "no cloud-init module acts on this document's keys (no_such_key)"),
])
def test_bad_documents_are_refused_before_anything_runs(tmp_path: Path, document: str, message: str) -> None:
    result = apply_doc(tmp_path, {"document": document})
    assert result["ok"] is False and message in result["summary"], result["summary"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_under_a_root_without_python_the_backend_says_why(tmp_path: Path) -> None:
    result = apply_doc(tmp_path, {"document": "#cloud-config\nwrite_files: [{path: /srv/x, content: y}]\n"})
    assert result["ok"] is False
    assert result["summary"] == (f"cloud-init's modules act on the system they run in: under --root {tmp_path} they "
                                 f"run with chroot, and {tmp_path}/usr/bin/python3 does not exist")
