"""The ssh backend on a guest root: users, authorized_keys, host keys and certificates, checked
on the files and then with Debian's real sshd and OpenSSH's ssh (StrictHostKeyChecking=yes)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imprint.backends import run_backend
from imprint.guest.distro import Distro

from tests.backend_samples import crash_between_write_and_rename
from tests.helpers import AgentFactory, Owner
from tests.sshkit import SshdFactory, keygen, needs_root, needs_root_and_sshd, seed_root, ssh


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return seed_root(tmp_path / "vm")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "keys").mkdir()
    return {name: keygen(tmp_path / "keys" / name, f"{name}@owner") for name in ("alice", "alice2", "bob")}


@pytest.fixture
def sshds(tmp_path: Path) -> Iterator[SshdFactory]:
    factory = SshdFactory(tmp_path)
    yield factory
    factory.cleanup()


def apply_ssh(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    result = run_backend(Distro(root), "ssh", config)
    json.dumps(result)
    return result


def passwd(root: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, int, bytes]]:
    """Every file under the root with what a rewrite would change: inode, mtime, mode, owner."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid, data)
    return out


# -- on the files
@needs_root
def test_users_keys_modes_and_running_twice(root: Path, keys: dict[str, str]) -> None:
    config = {"users": [{"name": "alice", "authorized_keys": [keys["alice"], keys["alice"] + "  ", keys["alice2"]],
                         "sudo": True},
                        {"name": "bob", "authorized_keys": [keys["bob"]], "shell": "/bin/sh"}]}
    first = apply_ssh(root, config)
    assert first["ok"] and first["changed"], first
    users = passwd(root)
    assert users["alice"][5:] == ["/home/alice", "/bin/sh"]  # no /bin/bash in this root
    assert users["alice"][1] == "x" and users["bob"][6] == "/bin/sh"
    shadow = {line.split(":")[0]: line.split(":")[1] for line in (root / "etc/shadow").read_text().splitlines()}
    assert shadow["alice"] == "*"  # no password, and not locked (sshd without PAM refuses "!")
    uid, gid = int(users["alice"][2]), int(users["alice"][3])
    ssh_dir = root / "home/alice/.ssh"
    for path, mode in ((ssh_dir, 0o700), (ssh_dir / "authorized_keys", 0o600)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), path
    assert (ssh_dir / "authorized_keys").read_text() == f"{keys['alice']}\n{keys['alice2']}\n"  # no duplicate
    sudoers = root / "etc/sudoers.d/imprint-alice"
    assert sudoers.read_text().endswith("alice ALL=(ALL:ALL) NOPASSWD: ALL\n")
    assert (stat.S_IMODE(sudoers.stat().st_mode), sudoers.stat().st_uid) == (0o440, 0)
    assert not (root / "etc/sudoers.d/imprint-bob").exists()
    assert [(u["name"], u["created"], u["keys_added"]) for u in first["data"]["users"]] == \
        [("alice", True, 2), ("bob", True, 1)]

    # Host keys: generated (ssh-keygen -A) and reported exactly as the .pub files say.
    reported = {k["path"]: k["key"] for k in first["data"]["host_keys"]}
    assert sorted(reported) == [f"/etc/ssh/ssh_host_{t}_key" for t in ("ecdsa", "ed25519", "rsa")]
    for path, key in reported.items():
        assert (root / (path.lstrip("/") + ".pub")).read_text().split()[:2] == key.split()

    before = snapshot(root)
    second = apply_ssh(root, config)
    assert second["ok"] and second["changed"] is False and second["changes"] == [], second
    assert snapshot(root) == before  # not a byte, inode, mode or owner changed
    assert second["data"]["host_keys"] == first["data"]["host_keys"]

    # sudo = false takes the grant away again.
    config["users"][0]["sudo"] = False
    third = apply_ssh(root, config)
    assert third["changed"] and not sudoers.exists()


@needs_root
def test_merge_keeps_what_is_there(root: Path, keys: dict[str, str]) -> None:
    assert apply_ssh(root, {"users": [{"name": "alice"}]})["ok"]
    path = root / "home/alice/.ssh/authorized_keys"
    existing = (f"# the admin's own notes\nfrom=\"10.0.0.0/8\" {keys['alice']}\nthis line is not a key\n"
                f"{keys['bob']}")  # no final newline
    path.write_text(existing)  # by root: a root-owned file in alice's directory
    config = {"users": [{"name": "alice", "authorized_keys": [keys["alice"], keys["alice2"], keys["bob"]]}]}
    # Only alice's own file is read there: a root-owned one may be a file alice renamed or linked
    # into place, and merging would hand its content to her. Refused, nothing lost.
    refused = apply_ssh(root, config)
    assert not refused["ok"] and refused["summary"] == (
        "/home/alice/.ssh/authorized_keys is owned by uid 0, not by the user who controls its directory "
        f"(uid {passwd(root)['alice'][2]}); refusing to read it"), refused["summary"]
    assert path.read_text() == existing
    uid = int(passwd(root)["alice"][2])
    os.chown(path, uid, -1)
    path.chmod(0o644)
    result = apply_ssh(root, config)
    assert result["ok"] and result["data"]["users"][0]["keys_added"] == 1
    assert path.read_text() == existing + "\n" + keys["alice2"] + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # its mode fixed too
    assert path.stat().st_uid == uid


@needs_root
@pytest.mark.parametrize(("config", "message"), [
    ({"users": [{"name": "alice", "authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKE alice@x"]}]},
     "ssh.users[0] (alice).authorized_keys[0] is not a valid public key: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKE"),
    ({"users": [{"name": "alice", "authorized_keys": ["KEY\nssh-ed25519 AAAA injected"]}]},
     "ssh.users[0] (alice).authorized_keys[0] must be one line"),
    ({"users": [{"name": "Alice!"}]}, "ssh.users[0].name 'Alice!' is not a user name"),
    ({"users": [{"name": "alice\n"}]}, "ssh.users[0].name 'alice\\n' is not a user name"),  # $ would pass it
    ({"users": [{"name": "alice", "shell": "/bin/sh\x1b[2J"}]},
     "ssh.users[0] (alice).shell '/bin/sh\\x1b[2J' is not an absolute path"),
    ({"users": [{"name": "alice"}, {"name": "alice"}]}, "ssh.users[1]: user 'alice' is listed twice"),
    ({"users": [{"name": "alice", "shell": "bash"}]}, "ssh.users[0] (alice).shell 'bash' is not an absolute path"),
    ({"users": [{"name": "alice", "sudo": "yes"}]}, "ssh.users[0] (alice).sudo must be bool, not str"),
    ({"users": [{"name": "alice", "keys": []}]}, "ssh.users[0]: unknown key(s) keys"),
    ({"users": "alice"}, "ssh.users must be list, not str"),
    ({"user": []}, "ssh: unknown key(s) user"),
    ({"trusted_user_ca_keys": ["not a key"]}, "ssh.trusted_user_ca_keys[0] is not a valid public key"),
    ({"host_certificates": ["ssh-ed25519-cert-v01@openssh.com AAAA"]},
     "ssh.host_certificates[0] is not an OpenSSH certificate"),
])
def test_bad_inputs_are_named_and_nothing_is_written(root: Path, keys: dict[str, str], config: dict[str, Any],
                                                     message: str) -> None:
    text = json.dumps(config).replace("KEY", keys["alice"])
    before = snapshot(root)
    result = apply_ssh(root, json.loads(text))
    assert result["ok"] is False
    assert message in result["summary"], result["summary"]
    assert snapshot(root) == before


@needs_root
def test_a_bad_key_of_one_user_stops_all_users_before_any_change(root: Path, keys: dict[str, str]) -> None:
    result = apply_ssh(root, {"users": [{"name": "alice", "authorized_keys": [keys["alice"]]},
                                        {"name": "bob", "authorized_keys": [keys["bob"], "ssh-rsa " + "A" * 40]}]})
    assert not result["ok"]
    assert result["summary"].startswith(
        "ssh.users[1] (bob).authorized_keys[1] is not a valid public key: 'ssh-rsa AAAA")
    assert "alice" not in passwd(root) and not (root / "home/alice").exists()


@needs_root
def test_host_certificates_must_certify_a_host_key(root: Path, tmp_path: Path) -> None:
    assert apply_ssh(root, {})["ok"]
    keygen(tmp_path / "ca", "ca")
    keygen(tmp_path / "stranger", "stranger")
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "x", "-h", "-n", "vm",
                    str(tmp_path / "stranger.pub")], check=True)
    result = apply_ssh(root, {"host_certificates": [(tmp_path / "stranger-cert.pub").read_text()]})
    assert not result["ok"] and "which is not one of this VM's host keys" in result["summary"]
    host_pub = root / "etc/ssh/ssh_host_ed25519_key.pub"
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "x", "-n", "alice", str(host_pub)],
                   check=True)  # a *user* certificate on the host key
    result = apply_ssh(root, {"host_certificates": [(root / "etc/ssh/ssh_host_ed25519_key-cert.pub").read_text()]})
    assert not result["ok"] and result["summary"] == "ssh.host_certificates[0] is not a host certificate"
    assert not (root / "etc/ssh/sshd_config.d/imprint.conf").exists()


@needs_root
def test_users_need_a_user_database(tmp_path: Path, keys: dict[str, str]) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    result = apply_ssh(bare, {"users": [{"name": "alice", "authorized_keys": [keys["alice"]]}]})
    assert not result["ok"]
    assert result["summary"] == (f"{bare}/etc/passwd does not exist: this root has no user database to add 'alice' "
                                 "to (seed etc/passwd, etc/group, etc/shadow, etc/gshadow)")
    assert not (bare / "home").exists()


@needs_root
def test_a_user_cannot_redirect_the_write_with_a_symlink(root: Path, keys: dict[str, str], tmp_path: Path) -> None:
    assert apply_ssh(root, {"users": [{"name": "alice"}]})["ok"]
    ssh_dir = root / "home/alice/.ssh"
    ssh_dir.rmdir()
    target = tmp_path / "root-only"
    target.mkdir()
    ssh_dir.symlink_to(target)
    result = apply_ssh(root, {"users": [{"name": "alice", "authorized_keys": [keys["alice"]]}]})
    assert not result["ok"] and result["summary"] == "/home/alice/.ssh is a symlink; refusing to follow it"
    assert list(target.iterdir()) == []


@needs_root
def test_a_crash_between_write_and_rename_leaves_the_old_authorized_keys(root: Path, keys: dict[str, str]) -> None:
    first = {"users": [{"name": "alice", "authorized_keys": [keys["alice"]]}]}
    assert apply_ssh(root, first)["ok"]
    path = root / "home/alice/.ssh/authorized_keys"
    old = path.read_bytes()
    second = {"users": [{"name": "alice", "authorized_keys": [keys["alice"], keys["bob"]]}]}
    crash_between_write_and_rename(root, "authorized_keys", "ssh", second)
    assert path.read_bytes() == old and stat.S_IMODE(path.stat().st_mode) == 0o600
    result = apply_ssh(root, second)
    assert result["ok"] and result["data"]["users"][0]["keys_added"] == 1
    assert path.read_text() == f"{keys['alice']}\n{keys['bob']}\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["authorized_keys"]  # the crash's temp file is gone


# -- with the real sshd and ssh
@needs_root_and_sshd
def test_attested_host_keys_let_ssh_in_and_another_host_key_is_refused(root: Path, keys: dict[str, str],
                                                                       tmp_path: Path, sshds: SshdFactory) -> None:
    result = apply_ssh(root, {"users": [{"name": "alice", "authorized_keys": [keys["alice"]]}]})
    assert result["ok"]
    sshd = sshds.make(root).start()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("".join(f"[127.0.0.1]:{sshd.port} {k['key']}\n" for k in result["data"]["host_keys"]))
    login = ssh(sshd.port, known_hosts, tmp_path / "keys/alice", "alice", "id", "-un")
    assert login.returncode == 0, login.stderr + sshd.log()
    assert login.stdout == "alice\n"
    refused = ssh(sshd.port, known_hosts, tmp_path / "keys/bob", "alice", "true")  # bob's key is not alice's
    assert refused.returncode == 255 and "Permission denied (publickey)" in refused.stderr

    # Another machine at the same address: other host keys, same port. ssh refuses it.
    sshd.stop()
    rogue = seed_root(tmp_path / "rogue")
    subprocess.run(["ssh-keygen", "-A", "-f", str(rogue)], check=True, capture_output=True)
    sshds.make(rogue, sshd.port).start()
    impostor = ssh(sshd.port, known_hosts, tmp_path / "keys/alice", "alice", "true")
    assert impostor.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in impostor.stderr
    assert "Host key verification failed." in impostor.stderr


class Vm:
    """A real agent on a seeded root, bound by the real `imprint` with a profile, and its sshd."""

    def __init__(self, agents: AgentFactory, owner: Owner, sshds: SshdFactory, tmp_path: Path) -> None:
        self.owner, self.tmp = owner, tmp_path
        self.root = seed_root(agents.make_root(owner.token("web1", "shared")))
        self.agent = agents.start(self.root)
        self.sshd = sshds.make(self.root)
        self.sshds = sshds
        self.profile = tmp_path / "profile.toml"

    def write_profile(self, text: str) -> Path:
        self.profile.write_text(text)
        return self.profile

    def imprint_ssh(self, identity: str, *command: str, user: str = "alice") -> subprocess.CompletedProcess[str]:
        return self.owner.run("ssh", "web1", "-l", user, "--", "-F", "/dev/null", "-o", "BatchMode=yes",
                              "-o", "IdentitiesOnly=yes", "-i", str(self.tmp / "keys" / identity), *command,
                              check=None)

    def rogue(self, name: str) -> Path:
        """Another machine's root, with its own host keys, to put at the VM's SSH address."""
        rogue = seed_root(self.tmp / name)
        subprocess.run(["ssh-keygen", "-A", "-f", str(rogue)], check=True, capture_output=True)
        return rogue


@pytest.fixture
def vm(agents: AgentFactory, owner: Owner, sshds: SshdFactory, tmp_path: Path) -> Vm:
    return Vm(agents, owner, sshds, tmp_path)


@needs_root_and_sshd
def test_bind_with_a_profile_then_imprint_ssh(vm: Vm, keys: dict[str, str]) -> None:
    """The whole path: token, real agent, `imprint bind --profile`, real sshd, `imprint ssh`."""
    owner = vm.owner
    assert "web1 is not bound yet" in owner.run("ssh", "web1", check=2).stderr
    vm.write_profile(f'[ssh]\nusers = [{{name = "alice", authorized_keys = ["{keys["alice"]}"], sudo = true}}]\n')
    bound = owner.json("bind", "web1", "--address", vm.agent.address, "--profile", str(vm.profile),
                       "--ssh-port", str(vm.sshd.port))
    result = bound["apply"]["results"]["ssh"]  # type: ignore[index]
    assert bound["apply"]["ok"] is True and result["ok"] and result["changed"], result  # type: ignore[index]
    known_hosts = owner.home / "known_hosts" / "web1"
    assert result["owner_data"]["known_hosts"] == str(known_hosts)
    lines = [line for line in known_hosts.read_text().splitlines() if not line.startswith("#")]
    assert sorted(lines) == sorted(f"[127.0.0.1]:{vm.sshd.port} {k['key']}" for k in result["data"]["host_keys"])
    assert len(lines) == 3

    vm.sshd.start()
    login = vm.imprint_ssh("alice", "id", "-un")
    assert login.returncode == 0, login.stderr + vm.sshd.log()
    assert login.stdout == "alice\n"
    printed = owner.run("ssh", "web1", "--print").stdout
    assert "-o StrictHostKeyChecking=yes" in printed and f"-p {vm.sshd.port} 127.0.0.1" in printed

    again = owner.json("apply", "web1", "--profile", str(vm.profile))
    assert again["ok"] is True and again["results"]["ssh"]["changed"] is False  # type: ignore[index]
    assert "unchanged" in again["results"]["ssh"]["owner"][0]  # type: ignore[index]

    vm.sshd.stop()
    vm.sshds.make(vm.rogue("rogue"), vm.sshd.port).start()
    impostor = vm.imprint_ssh("alice", "true")
    assert impostor.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in impostor.stderr


def _sign(ca: Path, pub: Path, *args: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "test", *args, str(pub)], check=True)
    return pub.with_name(pub.name.removesuffix(".pub") + "-cert.pub").read_text()


@needs_root_and_sshd
def test_host_certificates_and_the_user_ca(vm: Vm, keys: dict[str, str], tmp_path: Path) -> None:
    owner = vm.owner
    owner.run("ca", "init")
    assert owner.json("ca", "init")["created"] is False
    ca_key = owner.home / "ssh_ca"
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    # carol has no authorized_keys at all: she gets in with a user certificate from the owner's CA.
    vm.write_profile(f'[ssh]\nusers = [{{name = "alice", authorized_keys = ["{keys["alice"]}"]}}, '
                     f'{{name = "carol"}}]\n')
    owner.run("bind", "web1", "--address", vm.agent.address, "--profile", str(vm.profile),
              "--ssh-port", str(vm.sshd.port))
    vm.sshd.start()

    # Now certificates and the user CA, with sshd reloaded by the backend (SIGHUP).
    vm.write_profile(f'[ssh]\nusers = [{{name = "alice", authorized_keys = ["{keys["alice"]}"]}}]\n'
                     f'host_certificate = true\nhost_certificate_validity = "+4w"\ntrusted_user_ca = true\n'
                     f'reload_command = ["kill", "-HUP", "{vm.sshd.pid}"]\n')
    applied = owner.json("apply", "web1", "--profile", str(vm.profile))
    result = applied["results"]["ssh"]  # type: ignore[index]
    assert applied["ok"] is True and result["rounds"] == 2, result
    assert result["data"]["sshd_reloaded"] is True
    assert any("signed 3 host certificate(s) for web1, 127.0.0.1" in n for n in result["owner"]), result["owner"]
    vm.sshd.starts += 1  # one reload: the first round only collected the host keys
    vm.sshd.wait_listening(vm.sshd.starts)
    assert vm.sshd.log().count("Received SIGHUP") == 1
    snippet = (vm.root / "etc/ssh/sshd_config.d/imprint.conf").read_text().splitlines()
    assert snippet[1:] == [f"HostCertificate /etc/ssh/ssh_host_{t}_key-cert.pub" for t in ("ecdsa", "ed25519", "rsa")] \
        + ["TrustedUserCAKeys /etc/ssh/imprint_user_ca.pub"]
    cert = subprocess.run(["ssh-keygen", "-L", "-f", str(vm.root / "etc/ssh/ssh_host_ed25519_key-cert.pub")],
                          capture_output=True, text=True, check=True).stdout
    assert "host certificate" in cert and "web1" in cert and "127.0.0.1" in cert

    # Trusting only the CA line: the host certificate alone authenticates the VM.
    known_hosts = owner.home / "known_hosts" / "web1"
    ca_only = tmp_path / "ca_only"
    ca_only.write_text("".join(line + "\n" for line in known_hosts.read_text().splitlines()
                               if line.startswith("@cert-authority")))
    assert ca_only.read_text().startswith(f"@cert-authority [127.0.0.1]:{vm.sshd.port} ssh-ed25519 ")
    login = ssh(vm.sshd.port, ca_only, tmp_path / "keys/alice", "alice", "id", "-un", extra=("-v",))
    assert login.returncode == 0, login.stderr + vm.sshd.log()
    assert "Server host certificate:" in login.stderr and "Host '[127.0.0.1]" in login.stderr
    assert vm.imprint_ssh("alice", "true").returncode == 0

    # A user certificate from the owner's CA for carol, who has no authorized_keys.
    keygen(tmp_path / "keys/carol", "carol")
    _sign(ca_key, tmp_path / "keys/carol.pub", "-n", "carol", "-V", "-5m:+1h")
    carol = ssh(vm.sshd.port, ca_only, tmp_path / "keys/carol", "carol", "id", "-un",
                extra=("-o", f"CertificateFile={tmp_path}/keys/carol-cert.pub"))
    assert carol.returncode == 0 and carol.stdout == "carol\n", carol.stderr + vm.sshd.log()

    # Applied again: nothing to sign, nothing changes, no reload.
    again = owner.json("apply", "web1", "--profile", str(vm.profile))
    assert again["results"]["ssh"]["rounds"] == 2 and again["results"]["ssh"]["changed"] is False  # type: ignore
    assert any("are current" in n for n in again["results"]["ssh"]["owner"])  # type: ignore[index]
    assert vm.sshd.log().count("Received SIGHUP") == 1

    vm.sshd.stop()
    # A machine whose host key another CA signed for the right names: refused.
    rogue = vm.rogue("rogue-other-ca")
    keygen(tmp_path / "other_ca", "other")
    _sign(tmp_path / "other_ca", rogue / "etc/ssh/ssh_host_ed25519_key.pub", "-h", "-n", "web1,127.0.0.1")
    (rogue / "etc/ssh/sshd_config.d/x.conf").write_text("HostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub\n")
    impostor = vm.sshds.make(rogue, vm.sshd.port).start()
    refused = ssh(vm.sshd.port, ca_only, tmp_path / "keys/alice", "alice", "true")
    assert refused.returncode == 255 and "Host key verification failed." in refused.stderr, refused.stderr
    assert vm.imprint_ssh("alice", "true").returncode == 255
    impostor.stop()
    # Another VM of the same owner, whose host key the owner's CA signed for *its* names: refused here.
    rogue = vm.rogue("rogue-sibling")
    _sign(ca_key, rogue / "etc/ssh/ssh_host_ed25519_key.pub", "-h", "-n", "web2,10.9.9.9")
    (rogue / "etc/ssh/sshd_config.d/x.conf").write_text("HostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub\n")
    vm.sshds.make(rogue, vm.sshd.port).start()
    refused = ssh(vm.sshd.port, ca_only, tmp_path / "keys/alice", "alice", "true", extra=("-v",))
    assert refused.returncode == 255 and "Host key verification failed." in refused.stderr
    assert "Certificate invalid: name is not a listed principal" in refused.stderr


def test_known_hosts_patterns() -> None:
    from imprint.backends.ssh.owner import host_pattern, valid_public_key

    assert host_pattern("10.0.0.5", 22) == "10.0.0.5"
    assert host_pattern("10.0.0.5", 2222) == "[10.0.0.5]:2222"
    assert host_pattern("::1", 2222) == "[::1]:2222"
    good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJN1QQaGrlNiT4zze3Ytxp9STE332LaSnMYjOqtRgLUW"
    assert valid_public_key(good)
    assert not valid_public_key(good.replace("ssh-ed25519", "ssh-rsa"))  # the blob says ed25519
    assert not valid_public_key(good + "\n@cert-authority * ssh-ed25519 AAAA")
    assert not valid_public_key("ssh-ed25519 not*base64")
    assert os.sep == "/"
