"""The kerberos backend against a real MIT KDC: the owner makes the principal and extracts its key
with kadmin (keytab or password), the agent installs the keytab merged and a krb5.conf snippet,
and `kinit -k` with the installed keytab gets a ticket from the KDC."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imprint.backends import run_backend
from imprint.backends.kerberos.keytab import merge_keytabs, parse_keytab, serialize_keytab
from imprint.guest.distro import Distro

from tests.backend_samples import crash_between_write_and_rename
from tests.helpers import AgentFactory, Owner
from tests.krb5kit import ADMIN, PW, PW_ADMIN, REALM, Realm, needs_krb5

HOST = f"host/web1.test.imprint@{REALM}"
pytestmark = needs_krb5


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    r = Realm(tmp_path_factory.mktemp("realm")).start()
    yield r
    r.stop()


def extract(realm: Realm, tmp: Path, principal: str, name: str = "x.keytab") -> bytes:
    """A keytab straight from kadmin.local (ktadd: the principal gets a new key)."""
    if realm.kvno(principal) is None:
        realm.local(f"addprinc -randkey {principal}")
    path = tmp / name
    path.unlink(missing_ok=True)
    assert "added to keytab" in realm.local(f"ktadd -k {path} {principal}")
    return path.read_bytes()


def klist(path: Path) -> list[tuple[int, str, str]]:
    out = subprocess.run(["klist", "-k", "-e", str(path)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines()[3:]:
        kvno, principal, enctype = line.split()
        rows.append((int(kvno), principal, enctype.strip("()")))
    return rows


def apply_kerberos(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    result = run_backend(Distro(root), "kerberos", config)
    json.dumps(result)
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_mode,
                                       p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


# -- the keytab format, against what MIT writes and reads
def test_parser_agrees_with_mit(realm: Realm, tmp_path: Path) -> None:
    data = extract(realm, tmp_path, f"nfs/parse.test.imprint@{REALM}")
    entries = parse_keytab(data)
    assert serialize_keytab(entries) == data  # byte for byte
    assert [(e.kvno, e.principal, e.report()["enctype"]) for e in entries] == klist(tmp_path / "x.keytab")
    # ktadd appends to an existing file; the parser reads the second kvno too.
    realm.local(f"ktadd -k {tmp_path / 'x.keytab'} nfs/parse.test.imprint@{REALM}")
    both = parse_keytab((tmp_path / "x.keytab").read_bytes())
    assert sorted({e.kvno for e in both}) == [2, 3]


def test_merge_keeps_others_dedupes_and_replaces(realm: Realm, tmp_path: Path) -> None:
    other = parse_keytab(extract(realm, tmp_path, f"nfs/merge.test.imprint@{REALM}", "o.keytab"))
    mine = parse_keytab(extract(realm, tmp_path, f"host/merge.test.imprint@{REALM}", "m.keytab"))
    merged, added, replaced = merge_keytabs(other, mine)
    assert merged == other + mine and (added, replaced) == (len(mine), 0)
    assert merge_keytabs(merged, mine) == (merged, 0, 0)  # the same keys again: nothing changes
    forged = [type(e)(e.principal, e.name_type, e.timestamp, e.kvno, e.enctype, b"x" * len(e.key),
                      e.raw[:-len(e.key) - 4] + b"x" * len(e.key) + e.raw[-4:]) for e in mine]
    again, added, replaced = merge_keytabs(merged, forged)  # same principal/kvno/enctype, other key
    assert again == other + forged and (added, replaced) == (0, len(mine))
    path = tmp_path / "merged.keytab"
    path.write_bytes(serialize_keytab(again))
    assert len(klist(path)) == len(other) + len(forged)  # MIT reads what we wrote


# -- the backend on a root
@pytest.mark.parametrize(("keytab", "message"), [
    ("not base64!", "kerberos.keytab is not base64"),
    (base64.b64encode(b"\x05\x01\x00\x00").decode(), "keytab format 0x0501 is not supported"),
    (base64.b64encode(b"ssh-ed25519 AAAA").decode(), "kerberos.keytab is not a keytab: it does not start with"),
    (base64.b64encode(b"\x05\x02\x00\x00\x00\x40\x00\x01").decode(), "entry 0 is truncated"),
    (base64.b64encode(b"\x05\x02").decode(), "kerberos.keytab holds no entries"),
    ("OTHER", f"holds a key for nfs/other.test.imprint@{REALM}, which is not one of kerberos.principals"),
])
def test_a_keytab_that_is_not_one_is_refused_and_nothing_is_written(realm: Realm, tmp_path: Path, keytab: str,
                                                                    message: str) -> None:
    root = tmp_path / "vm"
    (root / "etc").mkdir(parents=True)
    (root / "etc/krb5.keytab").write_bytes(extract(realm, tmp_path, HOST))
    if keytab == "OTHER":
        keytab = base64.b64encode(extract(realm, tmp_path, f"nfs/other.test.imprint@{REALM}")).decode()
    before = snapshot(root)
    result = apply_kerberos(root, {"principals": [HOST], "keytab": keytab,
                                   "krb5_conf": {"realm": REALM, "kdc": [realm.kdc]}})
    assert result["ok"] is False and message in result["summary"], result["summary"]
    assert snapshot(root) == before


@pytest.mark.parametrize(("conf", "message"), [
    ({"realm": "TEST\n"}, "kerberos.krb5_conf.realm 'TEST\\n' is not a realm name"),  # $ would let it through
    ({"realm": "TEST", "kdc": ["kdc.test\n"]}, "kerberos.krb5_conf: 'kdc.test\\n' is not a host[:port]"),
    ({"realm": "TEST", "domain_realm": ["web1\n"]}, "kerberos.krb5_conf.domain_realm: 'web1\\n' is not a host name"),
])
def test_names_with_a_line_break_are_refused(tmp_path: Path, conf: dict[str, Any], message: str) -> None:
    result = apply_kerberos(tmp_path, {"principals": ["host/web1@TEST"], "krb5_conf": conf})
    assert result["ok"] is False and result["summary"] == message, result["summary"]
    assert list(tmp_path.iterdir()) == []
    assert apply_kerberos(tmp_path, {"principals": ["host/web1@TEST\n"]})["summary"] == \
        "kerberos.principals[0] 'host/web1@TEST\\n' is not a principal (name/host@REALM)"


def test_an_unreadable_existing_keytab_is_not_overwritten(realm: Realm, tmp_path: Path) -> None:
    root = tmp_path / "vm"
    (root / "etc").mkdir(parents=True)
    (root / "etc/krb5.keytab").write_bytes(b"\x05\x02garbage")
    result = apply_kerberos(root, {"principals": [HOST],
                                   "keytab": base64.b64encode(extract(realm, tmp_path, HOST)).decode()})
    assert not result["ok"]
    assert result["summary"].startswith("the existing /etc/krb5.keytab is not a keytab this backend can merge with")
    assert (root / "etc/krb5.keytab").read_bytes() == b"\x05\x02garbage"


def test_install_merge_idempotence_and_crash(realm: Realm, tmp_path: Path) -> None:
    root = tmp_path / "vm"
    (root / "etc").mkdir(parents=True)
    nfs = extract(realm, tmp_path, f"nfs/web1.test.imprint@{REALM}", "nfs.keytab")
    (root / "etc/krb5.keytab").write_bytes(nfs)  # the image's own entries
    (root / "etc/krb5.conf").write_text("[libdefaults]\n    default_realm = ATHENA.MIT.EDU\n")
    host = extract(realm, tmp_path, HOST)
    config = {"principals": [HOST], "keytab": base64.b64encode(host).decode(),
              "krb5_conf": {"realm": REALM, "kdc": [realm.kdc], "admin_server": realm.admin_server,
                            "domain_realm": ["web1.test.imprint"]}}
    first = apply_kerberos(root, config)
    assert first["ok"] and first["changed"], first
    keytab = root / "etc/krb5.keytab"
    st = keytab.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    assert keytab.read_bytes() == nfs + host[2:]  # the image's entries kept byte for byte, ours appended
    kvno = realm.kvno(HOST)
    assert {(e["principal"], e["kvno"]) for e in first["data"]["entries"]} == {(HOST, kvno)}
    assert realm.kinit(keytab, HOST).returncode == 0
    assert (root / "etc/krb5.conf").read_text().startswith(
        "# Added by imprint's kerberos backend: read /etc/krb5.conf.d/ (imprint.conf) first.\n"
        "includedir /etc/krb5.conf.d/\n\n[libdefaults]\n    default_realm = ATHENA.MIT.EDU\n")
    snippet = (root / "etc/krb5.conf.d/imprint.conf").read_text()
    assert f"default_realm = {REALM}" in snippet and f"kdc = {realm.kdc}" in snippet
    assert f"web1.test.imprint = {REALM}" in snippet

    before = snapshot(root)
    second = apply_kerberos(root, config)
    assert second["ok"] and second["changed"] is False and second["changes"] == [], second
    assert snapshot(root) == before

    # A rekey: the new kvno is appended, the old one stays for tickets issued before.
    newer = extract(realm, tmp_path, HOST)
    config["keytab"] = base64.b64encode(newer).decode()
    crash_between_write_and_rename(root, "krb5.keytab", "kerberos", config)
    assert keytab.read_bytes() == nfs + host[2:]  # the power went before the rename: the old file
    third = apply_kerberos(root, config)
    assert third["ok"] and third["data"]["added"] == len(parse_keytab(newer))
    assert keytab.read_bytes() == nfs + host[2:] + newer[2:]
    assert sorted(p.name for p in keytab.parent.iterdir()) == ["krb5.conf", "krb5.conf.d", "krb5.keytab"]
    assert realm.kinit(keytab, HOST).returncode == 0


# -- the whole path: real agent, `imprint bind --profile`, real KDC
def profile_text(realm: Realm, **extra: str) -> str:
    lines = ["[kerberos]", f'realm = "{REALM}"', f'kdc = ["{realm.kdc}"]', f'admin_server = "{realm.admin_server}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def in_vm_etc(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a program that sees the VM's /etc: an overlay of <root>/etc on the host's /etc in a
    private mount namespace, so krb5.conf's `includedir /etc/krb5.conf.d/` and the default keytab
    /etc/krb5.keytab are the VM's, at their guest paths, and the libraries still load."""
    script = f'mount -t overlay overlay -o "lowerdir={root}/etc:/etc" /etc && exec "$@"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRB5")}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", script, "sh", *argv],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the mount namespace and keytab ownership")
def test_bind_with_a_profile_then_kinit(realm: Realm, agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    root = agents.make_root(owner.token("web1", "shared"))
    (root / "etc").mkdir()
    (root / "etc/krb5.conf").write_text("[libdefaults]\n    default_realm = ATHENA.MIT.EDU\n")  # Debian's default
    agent = agents.start(root)
    profile = tmp_path / "profile.toml"
    profile.write_text(profile_text(realm, admin_principal=f'"{ADMIN}"', admin_keytab=f'"{realm.admin_keytab}"'))
    assert realm.kvno(HOST) is None or realm.local(f"delprinc -force {HOST}")
    bound = owner.json("bind", "web1", "--address", agent.address, "--profile", str(profile))
    result = bound["apply"]["results"]["kerberos"]  # type: ignore[index]
    assert result["ok"] and result["changed"] and result["rounds"] == 2, result
    assert result["owner"][0] == f"created {HOST} with a random key"
    assert result["owner"][1].startswith(f"extracted {HOST} (ktadd: new random key, kvno 2)")
    keytab = root / "etc/krb5.keytab"
    assert realm.kvno(HOST) == 2 and {r[0] for r in klist(keytab)} == {2}
    assert realm.kinit(keytab, HOST).returncode == 0

    # In the VM's view of /etc: no -t, no realm: the default keytab and the snippet's default_realm
    # (ahead of the image's ATHENA.MIT.EDU), the KDC found through the included snippet.
    got = in_vm_etc(root, "kinit", "-k", "-c", f"FILE:{tmp_path}/cc", "host/web1.test.imprint")
    assert got.returncode == 0, got.stderr
    shown = subprocess.run(["klist", "-c", f"FILE:{tmp_path}/cc"], capture_output=True, text=True, check=True).stdout
    assert f"Default principal: {HOST}" in shown

    # Applied again: the VM holds the current key, nothing is extracted, nothing changes.
    again = owner.json("apply", "web1", "--profile", str(profile))
    result = again["results"]["kerberos"]  # type: ignore[index]
    assert result["ok"] and result["changed"] is False, result
    assert result["owner"] == [f"the VM holds the current key of {HOST} (kvno 2)"]
    assert realm.kvno(HOST) == 2

    # With a password (from the environment) and rotate = true: a new key every time, the old
    # kvno kept next to it, and kinit works with the new one.
    profile.write_text(profile_text(realm, admin_principal=f'"{PW_ADMIN}"', admin_password_env='"KRB_PW"',
                                    rotate="true"))
    assert "admin_password_env: the environment variable KRB_PW is not set" in \
        owner.run("apply", "web1", "--profile", str(profile), check=2).stderr
    os.environ["KRB_PW"] = PW
    try:
        rotated = owner.json("apply", "web1", "--profile", str(profile))
    finally:
        del os.environ["KRB_PW"]
    assert rotated["ok"] is True and rotated["results"]["kerberos"]["changed"] is True  # type: ignore[index]
    assert realm.kvno(HOST) == 3 and {r[0] for r in klist(keytab)} == {2, 3}
    assert realm.kinit(keytab, HOST).returncode == 0


def test_a_wrong_admin_credential_is_a_clear_owner_error(realm: Realm, agents: AgentFactory, owner: Owner,
                                                         tmp_path: Path) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    owner.run("bind", "web1", "--address", agent.address)
    wrong = tmp_path / "wrong.keytab"
    wrong.write_bytes(extract(realm, tmp_path, f"nobody/admin@{REALM}"))
    profile = tmp_path / "profile.toml"
    profile.write_text(profile_text(realm, admin_principal=f'"nobody/admin@{REALM}"', admin_keytab=f'"{wrong}"'))
    failed = owner.run("apply", "web1", "--profile", str(profile), check=5)
    assert (f"kerberos: FAILED — owner side: kadmin getprinc {HOST}: get_principal: Operation requires ``get'' "
            f'privilege while retrieving "{HOST}".') in failed.stdout, failed.stdout
    assert not (agent.root / "etc/krb5.keytab").exists()
    profile.write_text(profile_text(realm, admin_principal=f'"{ADMIN}"'))
    assert "give exactly one of admin_keytab" in owner.run("apply", "web1", "--profile", str(profile),
                                                            check=2).stderr


def test_kadmin_local_several_services_and_no_krb5_conf(realm: Realm, agents: AgentFactory, owner: Owner,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner runs the KDC: kadmin.local with the realm's own configuration."""
    monkeypatch.setenv("KRB5_CONFIG", realm.env["KRB5_CONFIG"])
    monkeypatch.setenv("KRB5_KDC_PROFILE", realm.env["KRB5_KDC_PROFILE"])
    agent = agents.start(agents.make_root(owner.token("db", "shared")))
    profile = tmp_path / "profile.toml"
    profile.write_text(f'[kerberos]\nrealm = "{REALM}"\nkadmin_local = true\nfqdn = "db.example.net"\n'
                       'services = ["host", "nfs"]\nkrb5_conf = false\n')
    bound = owner.json("bind", "db", "--address", agent.address, "--profile", str(profile))
    assert bound["apply"]["ok"] is True, bound  # type: ignore[index]
    keytab = agent.root / "etc/krb5.keytab"
    assert {r[1] for r in klist(keytab)} == {f"host/db.example.net@{REALM}", f"nfs/db.example.net@{REALM}"}
    assert realm.kinit(keytab, f"nfs/db.example.net@{REALM}").returncode == 0
    assert sorted(p.name for p in (agent.root / "etc").iterdir()) == ["krb5.keytab"]
