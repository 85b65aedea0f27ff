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

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from imprint.backends import run_backend
from imprint.faults import TARGET_ENV, TRACE_ENV
from imprint.fsatomic import TEMP_MARK
from imprint.guest.distro import Distro

from tests.helpers import AgentFactory, Owner
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
    """What the backend could write. Not the agent's own state: every pinned request moves its
    session counter (docs/protocol.md §4.7)."""
    state = root / "var/lib/imprint"
    return {str(p.relative_to(root)): (p.lstat().st_mtime_ns, p.lstat().st_mode,
                                       p.read_bytes() if stat.S_ISREG(p.lstat().st_mode) else b"")
            for d in ("etc", "home", "run", "srv", "var") if (root / d).exists() for p in sorted((root / d).rglob("*"))
            if p != state and state not in p.parents}


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
    result = run_backend(Distro(root), "cloudinit", config)
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


# -- the policy (issue 9, item 11): an allowlist of keys, refusals that name the field
@pytest.mark.parametrize(("document", "message"), [
    ("bootcmd: [[touch, /x]]", "cloudinit.document.bootcmd is refused: runs commands of the document's own, and "
                               "cloud-init runs it again at every boot"),
    ("runcmd: [[touch, /x]]", "cloudinit.document.runcmd is refused: runs commands of the document's own"),
    ("power_state: {mode: reboot}", "cloudinit.document.power_state is refused: it would shut down or reboot the VM"),
    ("ssh_deletekeys: true", "cloudinit.document.ssh_deletekeys is refused: cc_ssh deletes and regenerates the host "
                             "keys the [ssh] backend attested"),
    ("package_reboot_if_required: true",
     "cloudinit.document.package_reboot_if_required may only be false: it would reboot the VM under the agent"),
    ("package_upgrade: true", "cloudinit.document.package_upgrade may only be false: an upgrade of every package"),
    ("no_such_key: 1", "cloudinit.document.no_such_key is not in this backend's allowlist of cloud-config keys "
                       "(ca_certs, chpasswd, fqdn, groups, hostname,"),
    ("snap: {commands: [[install, x]]}", "cloudinit.document.snap is not in this backend's allowlist"),
    ("write_files: [{path: /var/lib/imprint/state.json, content: x}]",
     "cloudinit.document.write_files[0].path '/var/lib/imprint/state.json' is refused: /var/lib/imprint is imprint's "
     "state: the agent's key and the owner it is bound to"),
    ("write_files: [{path: /srv/ok, content: x}, {path: /etc/imprint/x, content: x}]",
     "cloudinit.document.write_files[1].path '/etc/imprint/x' is refused: /etc/imprint is imprint's configuration"),
    ("write_files: [{path: /etc/ssh/sshd_config.d/x.conf, content: 'PermitRootLogin yes'}]",
     "write_files[0].path '/etc/ssh/sshd_config.d/x.conf' is refused: /etc/ssh is sshd's host keys and configuration "
     "are the [ssh] backend's"),
    ("write_files: [{path: /home/alice/.ssh/authorized_keys, content: x}]",
     "write_files[0].path '/home/alice/.ssh/authorized_keys' is refused: ~/.ssh is sshd's trust"),
    ("write_files: [{path: /etc/systemd/system/imprint-agent.service.d/override.conf, content: x}]",
     "is refused: imprint's agent unit"),
    ("write_files: [{path: /etc/cloud/cloud.cfg.d/99-boot.cfg, content: 'bootcmd: [reboot]'}]",
     "is refused: /etc/cloud is cloud-init's configuration: it would run again at the next boot"),
    ("write_files: [{path: /var/lib/cloud/scripts/per-boot/x.sh, content: x}]",
     "is refused: /var/lib/cloud is cloud-init's state and scripts"),
    ("write_files: [{path: /proc/sysrq-trigger, content: b}]", "is refused: /proc is the kernel's interface"),
    ("write_files: [{path: /etc/krb5.keytab, content: x}]", "is refused: it is a file another imprint backend"),
    ("write_files: [{path: /etc/sudoers.d/imprint-alice, content: x}]", "is refused: the [ssh] backend's sudo grants"),
    ("write_files: [{path: /usr/local/lib/python3.11/dist-packages/imprint/__init__.py, content: x}]",
     "is refused: imprint's code"),
    ("write_files: [{path: srv/relative, content: x}]", "write_files[0].path 'srv/relative' is not an absolute path"),
    ("write_files: [{path: /srv/../var/lib/imprint/x, content: x}]",
     "write_files[0].path '/srv/../var/lib/imprint/x' is not a plain path"),
    ("write_files: [{path: /srv/x, content: x, owner: 'root;id'}]",
     "write_files[0].owner 'root;id' is not user[:group]"),
    ("users: [{name: alice, ssh_import_id: [gh:alice]}]",
     "cloudinit.document.users[0].ssh_import_id is refused: it fetches keys from a third party over the network"),
    ('users: [{name: "evil\\nroot"}]', "cloudinit.document.users[0].name 'evil\\nroot' contains a control character"),
    ("users: [{name: Alice}]", "cloudinit.document.users[0].name 'Alice' is not a user name"),
    ("users: [{name: alice, homedir: /var/lib/imprint}]",
     "users[0].homedir '/var/lib/imprint' is refused: /var/lib/imprint is imprint's state"),
    ("packages: ['-oAPT::Update::Pre-Invoke::=touch /x']",
     "cloudinit.document.packages[0] '-oAPT::Update::Pre-Invoke::=touch /x' is not a package name"),
    ("chpasswd: {users: [{name: alice, type: RANDOM}]}",
     "cloudinit.document.chpasswd.users[0] is refused: cloud-init prints a RANDOM password on the console"),
    ("chpasswd: {list: ['alice:x']}", "cloudinit.document.chpasswd.list is refused: deprecated: use chpasswd.users"),
    ("ntp: {config: {check_exe: /tmp/x}}", "cloudinit.document.ntp.config is refused: it overrides the client's"),
    ("timezone: ../../../etc/shadow", "cloudinit.document.timezone '../../../etc/shadow' is not a time zone name"),
])
def test_the_policy_refuses_with_the_field_named(tmp_path: Path, document: str, message: str) -> None:
    result = apply_doc(tmp_path, {"document": "#cloud-config\n" + document + "\n"})
    assert result["ok"] is False and message in result["summary"], result["summary"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_gzip_bomb_is_refused_before_cloud_init_unpacks_it(tmp_path: Path) -> None:
    import base64
    import gzip

    bomb = base64.b64encode(gzip.compress(b"\0" * (80 << 20))).decode()  # 80 MiB of zeros in ~80 KiB
    result = apply_doc(tmp_path, {"document": {"write_files": [{"path": "/srv/x", "encoding": "gz+b64",
                                                                "content": bomb}]}})
    assert result["ok"] is False and result["summary"] == \
        "cloudinit.document.write_files[0].content unpacks to more than 67108864 bytes", result["summary"]


def fake_chroot(root: Path) -> None:
    """Enough of a root for the backend to get to its last check (cloud-init would run next)."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").touch()


def test_paths_that_lead_through_a_users_directory_or_a_link_are_refused(tmp_path: Path) -> None:
    fake_chroot(tmp_path)
    (tmp_path / "home/alice").mkdir(parents=True)
    os.chown(tmp_path / "home/alice", 1000, 1000)  # alice could put a link there between check and write
    result = apply_doc(tmp_path, {"document": {"write_files": [{"path": "/srv/ok", "content": "x"},
                                                               {"path": "/home/alice/notes", "content": "x"}]}})
    assert result["ok"] is False and result["summary"] == (
        "cloudinit.document.write_files[1].path '/home/alice/notes' is in a directory that uid 1000 controls: "
        "cloud-init would follow a link she puts there; refused"), result["summary"]
    # Root's own link is followed, as cloud-init would: to where it leads.
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/state").symlink_to("/var/lib/imprint")
    result = apply_doc(tmp_path, {"document": {"write_files": [{"path": "/srv/state/state.json", "content": "x"}]}})
    assert result["ok"] is False and result["summary"] == (
        "cloudinit.document.write_files[0].path '/srv/state/state.json' leads to /var/lib/imprint/state.json "
        "(/var/lib/imprint is imprint's state: the agent's key and the owner it is bound to); refused")
    (tmp_path / "srv/file").symlink_to("/etc/ssh/sshd_config")
    result = apply_doc(tmp_path, {"document": {"write_files": [{"path": "/srv/file", "content": "x"}]}})
    assert result["ok"] is False and "leads to /etc/ssh/sshd_config" in result["summary"]
    assert not (tmp_path / "var").exists() and not (tmp_path / "etc").exists()


def test_the_owner_refuses_a_table_document_before_the_bind(tmp_path: Path) -> None:
    from imprint.backends.cloudinit.owner import prepare
    from imprint.owner.errors import UsageError

    with pytest.raises(UsageError, match=r"^cloudinit\.document\.bootcmd is refused: runs commands"):
        prepare(None, {"config": {"bootcmd": [["reboot"]]}})  # type: ignore[arg-type]
    assert prepare(None, {"config": {"timezone": "Europe/Paris"}}) == {  # type: ignore[arg-type]
        "document": {"timezone": "Europe/Paris"}}


def test_keys_for_a_user_whose_home_a_user_controls_are_refused(tmp_path: Path) -> None:
    """cloud-init 22.4 writes users[].ssh_authorized_keys to ~/.ssh/authorized_keys as root and
    follows a link there (checked: it appended the key to a root-only file alice linked)."""
    fake_chroot(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    for home in ("home/alice/.ssh", "home/bob"):
        (tmp_path / home).mkdir(parents=True)
    for mine in ("home/alice", "home/alice/.ssh", "home/bob"):
        os.chown(tmp_path / mine, 1000, 1000)
    before = snapshot(tmp_path)
    result = apply_doc(tmp_path, {"document": {"users": [{"name": "alice", "ssh_authorized_keys": [KEY]}]}})
    assert result["ok"] is False and result["summary"] == (
        "cloudinit.document.users[0].ssh_authorized_keys go to '/home/alice/.ssh/authorized_keys', in a directory "
        "that uid 1000 controls: cloud-init writes them as root and would follow a link she puts there; refused; "
        "the [ssh] backend adds keys for an existing user without following her links"), result["summary"]
    # A new user whose home (useradd's default) is already someone else's directory.
    result = apply_doc(tmp_path, {"document": {"users": ["default", {"name": "bob", "ssh_authorized_keys": [KEY]}]}})
    assert result["ok"] is False and result["summary"].startswith(
        "cloudinit.document.users[1].ssh_authorized_keys go to '/home/bob/.ssh/authorized_keys', in a directory "
        "that uid 1000 controls"), result["summary"]
    result = apply_doc(tmp_path, {"document": {"user": {"name": "alice", "ssh_authorized_keys": [KEY]}}})
    assert result["ok"] is False and result["summary"].startswith(
        "cloudinit.document.user.ssh_authorized_keys go to '/home/alice/.ssh/authorized_keys', in a directory "), \
        result["summary"]
    assert snapshot(tmp_path) == before


# -- an apply killed half-way (the crash points of imprint.faults), then the same document again
APPLIED = "backend.cloudinit.applied.written"  # cloud-init has run, the document is not recorded yet
DIGEST = hashlib.sha256(DOCUMENT.encode()).hexdigest()
CHILD = """import json, sys
from pathlib import Path
from imprint.backends import run_backend
from imprint.guest.distro import Distro
print(json.dumps(run_backend(Distro(Path(sys.argv[1])), "cloudinit", json.loads(sys.argv[2]))))
"""


def apply_in_chroot(wrapper: Path, root: Path, crash: str | None = None) -> subprocess.CompletedProcess[str]:
    """DOCUMENT applied by the backend in a process of its own (in the root's mount namespace), which
    IMPRINT_CRASHPOINT kills by SIGKILL at the named durable write."""
    env = {k: v for k, v in os.environ.items() if k not in (TARGET_ENV, TRACE_ENV)} | (
        {TARGET_ENV: crash} if crash else {})
    return subprocess.run([str(wrapper), "-c", CHILD, str(root), json.dumps({"document": DOCUMENT})], env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def killed_at(point: str, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    root.mkdir()
    wrapper = make_chroot(root, tmp_path)
    killed = apply_in_chroot(wrapper, root, crash=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    state = root / "var/lib/imprint/cloud-config"
    assert (state / "started").read_text() == DIGEST + "\n"  # written ahead of cloud-init's run
    assert not (state / "applied").exists()
    return root, wrapper


def alice(root: Path) -> tuple[int, int]:
    passwd = (root / "etc/passwd").read_text().splitlines()
    entry = next(line.split(":") for line in passwd if line.startswith("alice:"))
    return int(entry[2]), int(entry[3])


@needs_chroot
@pytest.mark.parametrize(("point", "done"), [
    (APPLIED, ["write_files[0]", "write_files[1]", "users[0].ssh_authorized_keys", "users[0].sudo"]),
    ("backend.cloudinit.document.synced", []),  # before cloud-init: its document (maybe hashes) left in /run
    ("backend.cloudinit.started.synced", []),
])
def test_the_same_document_after_a_kill_resumes_and_completes(tmp_path: Path, point: str, done: list[str]) -> None:
    root, wrapper = killed_at(point, tmp_path)
    scratch = root / "run/imprint-cloud-config"
    if point == APPLIED:  # cloud-init ran: alice and her files exist, her home is hers
        assert (root / "home/alice/notes.txt").read_text() == "written after alice exists"
    if "document" in point:
        assert [p.name for p in scratch.iterdir()] == [p.name for p in scratch.glob("doc-*.yaml")] != []

    again = result_of(apply_in_chroot(wrapper, root))
    assert again["ok"] and again["changed"], again["summary"]
    assert again["data"]["resumed"] is True
    assert again["data"]["already_done"] == [f"cloudinit.document.{part}" for part in done]
    assert again["data"]["ran"] == ["write_files", "users_groups", "write_files_deferred"]
    hello = root / "srv/hello.txt"
    assert (hello.read_text(), stat.S_IMODE(hello.stat().st_mode), hello.stat().st_uid) == (
        "hello from the owner", 0o640, 0)
    notes = root / "home/alice/notes.txt"
    assert (notes.read_text(), (notes.stat().st_uid, notes.stat().st_gid), stat.S_IMODE(notes.stat().st_mode)) == (
        "written after alice exists", alice(root), 0o644)
    assert (root / "home/alice/.ssh/authorized_keys").read_text() == KEY + "\n"
    sudoers = (root / "etc/sudoers.d/90-cloud-init-users").read_text()
    assert sudoers.count("# User rules for alice\nalice ALL=(ALL) NOPASSWD:ALL\n") == 1, sudoers  # not appended twice
    state = root / "var/lib/imprint/cloud-config"
    assert sorted(p.name for p in state.iterdir()) == ["applied"] and (state / "applied").read_text() == DIGEST + "\n"
    assert not scratch.exists() or list(scratch.iterdir()) == []
    assert [p for p in root.rglob("*") if TEMP_MARK in p.name] == []

    third = result_of(apply_in_chroot(wrapper, root))
    assert third["data"]["skipped"] is True and third["changed"] is False, third


@needs_chroot
@pytest.mark.parametrize("tamper", ["notes-link", "notes-edited", "keys-link"])
def test_a_resumed_run_still_refuses_what_alice_changed_in_her_home(tmp_path: Path, tamper: str) -> None:
    """Between the killed run and the rerun alice (who exists now) changes what the rerun would
    find done: the entry is to be written again, into her directory, and that stays refused."""
    root, wrapper = killed_at(APPLIED, tmp_path)
    uid, gid = alice(root)
    home = root / "home/alice"
    planted = home / (".ssh/authorized_keys" if tamper == "keys-link" else "notes.txt")
    planted.unlink()
    if tamper.endswith("-link"):
        planted.symlink_to("/etc/shadow")  # root's, 0640: a write through it would be root's
    else:
        planted.write_text("alice's own notes")
    os.lchown(planted, uid, gid)
    before = snapshot(root)

    again = result_of(apply_in_chroot(wrapper, root))
    resumed = (" (this apply resumes an interrupted run of the same document, and this is not as the document says: "
               "it would be written again)")
    expected = {
        "notes-link": "cloudinit.document.write_files[1].path '/home/alice/notes.txt': /home/alice/notes.txt is a "
                      f"symlink a user controls; refused{resumed}",
        "notes-edited": f"cloudinit.document.write_files[1].path '/home/alice/notes.txt' is in a directory that uid "
                        f"{uid} controls: cloud-init would follow a link she puts there; refused{resumed}",
        "keys-link": "cloudinit.document.users[0].ssh_authorized_keys go to '/home/alice/.ssh/authorized_keys': "
                     f"/home/alice/.ssh/authorized_keys is a symlink a user controls; refused{resumed}",
    }[tamper]
    assert again["ok"] is False and again["summary"] == expected, again["summary"]
    assert snapshot(root) == before  # /etc/shadow, the link, the records: nothing written, cloud-init not run
    assert planted.is_symlink() == tamper.endswith("-link")


@needs_chroot
def test_the_same_document_after_a_failed_module_resumes(tmp_path: Path) -> None:
    """A module that fails leaves the write-ahead record: the next apply resumes, as after a kill."""
    root = tmp_path / "root"
    root.mkdir()
    wrapper = make_chroot(root, tmp_path)
    (root / "srv/hello.txt").mkdir(parents=True)  # write_files cannot write there; the other modules run
    failed = result_of(apply_in_chroot(wrapper, root))
    assert failed["ok"] is False and failed["summary"].startswith(
        "cloud-init module(s) failed: write_files: IsADirectoryError"), failed["summary"]
    assert (root / "home/alice/notes.txt").exists()
    (root / "srv/hello.txt").rmdir()

    again = result_of(apply_in_chroot(wrapper, root))
    assert again["ok"] and again["data"]["already_done"] == [
        "cloudinit.document.write_files[1]", "cloudinit.document.users[0].ssh_authorized_keys",
        "cloudinit.document.users[0].sudo"], again
    assert (root / "srv/hello.txt").read_text() == "hello from the owner"
    assert (root / "var/lib/imprint/cloud-config/applied").read_text() == DIGEST + "\n"
