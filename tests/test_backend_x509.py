"""The x509 backend: a key born in the VM, a CSR with the addresses pyroute2 enumerates (in a
network namespace with known addresses), the owner's CA signing under its policy, OpenSSL
verifying the installed certificate, renewal, idempotence and crash safety."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from imprint import crypto
from imprint.backends import run_backend
from imprint.guest.distro import Distro
from imprint.owner.apply import ApplyContext
from imprint.owner.home import OwnerHome
from imprint.owner.store import Store

from tests.backend_samples import crash_between_write_and_rename
from tests.helpers import AgentFactory, Owner

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces (ip netns), file owners")
ADDRESSES = {"eth0": ["192.0.2.10", "2001:db8::10"], "eth1": ["198.51.100.7"]}
CERT = "etc/ssl/certs/imprint.pem"
KEY = "etc/ssl/private/imprint.key"


class Netns:
    """A network namespace with two veth ends and known global addresses; a python wrapper that
    runs inside it (so the agent and the owner's CLI talk over its loopback)."""

    def __init__(self, tmp: Path) -> None:
        self.name = f"imprint-x509-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        for dev, addrs in ADDRESSES.items():
            for addr in addrs:
                self.ip("addr", "add", addr + ("/64" if ":" in addr else "/24"), "dev", dev,
                        *(["nodad"] if ":" in addr else []))
            self.ip("link", "set", dev, "up")
        self.python = tmp / "netns-python"
        self.python.write_text(f'#!/bin/sh\nexec ip netns exec {self.name} {sys.executable} "$@"\n')
        self.python.chmod(0o755)

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def pyroute2_addresses(self, *interfaces: str) -> list[str]:
        code = ("import json, sys; from imprint.backends.x509.guest import enumerate_addresses; "
                "print(json.dumps(enumerate_addresses(sys.argv[1:] or None)))")
        out = subprocess.run([str(self.python), "-c", code, *interfaces], capture_output=True, text=True, check=True)
        addresses: list[str] = json.loads(out.stdout)
        return addresses

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@pytest.fixture
def netns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Netns]:
    ns = Netns(tmp_path)
    # conftest's agents and owner run `sys.executable -m ...`: now inside the namespace.
    monkeypatch.setattr(sys, "executable", str(ns.python))
    yield ns
    monkeypatch.undo()
    ns.delete()


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {f"DNS:{n.value}" if isinstance(n, x509.DNSName) else f"IP:{n.value}" for n in ext}


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def near_expiry(owner_home: Path, key_path: Path, names: list[x509.GeneralName]) -> bytes:
    """A certificate from the owner's CA for the VM's key with 12 hours left."""
    ca = x509.load_pem_x509_certificate((owner_home / "x509_ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((owner_home / "x509_ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    now = datetime.datetime.utcnow()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.subject)
            .public_key(key.public_key())  # type: ignore[arg-type]
            .serial_number(4242).not_valid_before(now - datetime.timedelta(days=89))
            .not_valid_after(now + datetime.timedelta(hours=12))
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_mode,
                                       p.read_bytes() if p.is_file() else b"")
            for p in sorted((root / "etc").rglob("*"))}


@needs_root
def test_bind_sign_verify_renew_in_a_network_namespace(netns: Netns, agents: AgentFactory, owner: Owner,
                                                       tmp_path: Path) -> None:
    created = owner.json("ca", "init", "--x509")
    assert created["created"] is True
    assert owner.json("ca", "init", "--x509")["created"] is False
    ca_pem = owner.home / "x509_ca.pem"
    root = agents.make_root(owner.token("web1", "shared"))
    agent = agents.start(root, "--listen", "0.0.0.0:0")
    address = f"192.0.2.10:{agent.port}"  # the owner reaches the agent at one of the VM's addresses
    reloads = tmp_path / "reloads"
    profile = tmp_path / "profile.toml"
    profile.write_text(f'[x509]\nnames = ["www.test.example"]\nvalidity_days = 90\n'
                       f'reload_command = ["sh", "-c", "echo reloaded >> {reloads}"]\n')
    bound = owner.json("bind", "web1", "--address", address, "--profile", str(profile))
    result = bound["apply"]["results"]["x509"]  # type: ignore[index]
    assert result["ok"] and result["changed"] and result["rounds"] == 2, result
    assert result["owner"][0].startswith("signed a certificate (none installed) for DNS:web1, DNS:www.test.example, "
                                         "IP:192.0.2.10")
    # The VM has more addresses (pyroute2 reports exactly the ones the test gave it: no loopback,
    # no link-local), but the owner knows only the one it reached the agent at: by default the CA
    # signs that one, and the VM asked for no other.
    reported = netns.pyroute2_addresses()
    assert reported == ["192.0.2.10", "198.51.100.7", "2001:db8::10"]
    assert "not in the CSR: 198.51.100.7, 2001:db8::10 (the owner's CA signs only addresses it knows as this " \
           "VM's: 192.0.2.10/32)" in result["warnings"], result["warnings"]
    cert = load(root / CERT)
    assert sans(cert) == {"DNS:web1", "DNS:www.test.example", "IP:192.0.2.10"}
    assert cert.subject.rfc4514_string() == "CN=web1"

    # OpenSSL accepts the installed certificate with nothing but the owner's CA.
    verified = openssl("verify", "-CAfile", str(ca_pem), str(root / CERT))
    assert verified.returncode == 0 and verified.stdout.strip() == f"{root / CERT}: OK", verified
    assert openssl("verify", "-CAfile", str(ca_pem), "-purpose", "sslserver", str(root / CERT)).returncode == 0
    # The key stayed in the VM: 0600 root, and it is the certified one.
    key = root / KEY
    st = key.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, stat.S_IMODE(key.parent.stat().st_mode)) == (0o600, 0, 0o700)
    assert openssl("pkey", "-in", str(key), "-pubout").stdout == openssl("x509", "-in", str(root / CERT), "-noout",
                                                                         "-pubkey").stdout
    assert (root / "etc/ssl/certs/imprint-chain.pem").read_bytes() == ca_pem.read_bytes()
    assert (root / "etc/ssl/certs/imprint-fullchain.pem").read_bytes() == (root / CERT).read_bytes() + \
        ca_pem.read_bytes()
    assert reloads.read_text() == "reloaded\n"

    # Again: the certificate is current, nothing changes, nothing reloads.
    before = snapshot(root)
    again = owner.json("apply", "web1", "--profile", str(profile))
    result = again["results"]["x509"]  # type: ignore[index]
    assert result["ok"] and result["changed"] is False, result
    assert result["owner"][0].startswith(f"the installed certificate (serial {cert.serial_number:x}) is current")
    assert snapshot(root) == before and reloads.read_text() == "reloaded\n"

    # Within the renewal window (12 h of 90 days left): renewed, same key, new serial.
    names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    (root / CERT).write_bytes(near_expiry(owner.home, key, names))
    renewed = owner.json("apply", "web1", "--profile", str(profile))["results"]["x509"]  # type: ignore[index]
    assert renewed["ok"] and renewed["changed"], renewed
    assert renewed["owner"][0].startswith("signed a certificate (renewal: it expires ")
    new = load(root / CERT)
    assert new.serial_number not in (4242, cert.serial_number)
    assert crypto.not_valid_after(new) - datetime.datetime.utcnow() > datetime.timedelta(days=89)
    assert openssl("verify", "-CAfile", str(ca_pem), str(root / CERT)).returncode == 0
    assert reloads.read_text() == "reloaded\nreloaded\n"

    # The owner vouches for the other two addresses: a new certificate that names them all.
    profile.write_text('[x509]\nnames = ["www.test.example"]\naddresses = ["198.51.100.7", "2001:db8::10"]\n')
    vouched = owner.json("apply", "web1", "--profile", str(profile))["results"]["x509"]  # type: ignore[index]
    assert "(the names or addresses changed)" in vouched["owner"][0], vouched
    assert sans(load(root / CERT)) == {"DNS:web1", "DNS:www.test.example", *(f"IP:{a}" for a in reported)}

    # A new address in the VM: not signed until the owner's policy covers it (here a network).
    netns.ip("addr", "add", "203.0.113.5/24", "dev", "eth1")
    unknown = owner.json("apply", "web1", "--profile", str(profile))["results"]["x509"]  # type: ignore[index]
    assert unknown["ok"] and unknown["changed"] is False and "IP:203.0.113.5" not in sans(load(root / CERT))
    profile.write_text('[x509]\nnames = ["www.test.example"]\naddresses = ["198.51.100.7", "2001:db8::10"]\n'
                       'allowed_networks = ["203.0.113.0/24"]\n')
    moved = owner.json("apply", "web1", "--profile", str(profile))["results"]["x509"]  # type: ignore[index]
    assert "(the names or addresses changed)" in moved["owner"][0]
    assert "IP:203.0.113.5" in sans(load(root / CERT))

    # Only eth0's addresses, and a policy that allows only 192.0.2.0/24 and 2001:db8::/32.
    profile.write_text('[x509]\nnames = ["www.test.example"]\ninterfaces = ["eth0"]\n'
                       'allowed_networks = ["192.0.2.0/24", "2001:db8::/32"]\n')
    narrowed = owner.json("apply", "web1", "--profile", str(profile))["results"]["x509"]  # type: ignore[index]
    assert narrowed["ok"], narrowed
    assert sans(load(root / CERT)) == {"DNS:web1", "DNS:www.test.example", "IP:192.0.2.10", "IP:2001:db8::10"}
    assert netns.pyroute2_addresses("eth0") == ["192.0.2.10", "2001:db8::10"]


# -- the CA's SAN policy, on real CSRs (what a compromised VM may send)
def ca_context(owner: Owner, address: str = "192.0.2.10:4433", ssh_host: str | None = None) -> ApplyContext:
    owner.run("ca", "init", "--x509")
    return ApplyContext(home=OwnerHome(owner.home), store=cast(Store, None), vm="web1", address=address,
                        options={"ssh_host": ssh_host or address.rpartition(":")[0].strip("[]"), "ssh_port": 22})


def csr_pem(names: list[x509.GeneralName], cn: str = "evil.example") -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)]))
           .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign_csr(ctx: ApplyContext, section: dict[str, Any], names: list[x509.GeneralName],
             cn: str = "evil.example") -> x509.Certificate:
    from imprint.backends.x509.owner import review

    out = review(ctx, section, {"data": {"csr": csr_pem(names, cn)}}, 1)
    assert out.follow_up is not None
    return x509.load_pem_x509_certificate(out.follow_up["certificate"].encode())


IP = x509.IPAddress
DNS = x509.DNSName


def test_by_default_the_ca_signs_the_address_it_reaches_the_vm_at(owner: Owner, tmp_path: Path) -> None:
    ctx = ca_context(owner)
    cert = sign_csr(ctx, {}, [DNS("WEB1"), IP(ipaddress.ip_address("192.0.2.10"))])
    # The subject and SANs are the owner's values: not the CSR's CN, not its spelling.
    assert cert.subject.rfc4514_string() == "CN=web1"
    assert sans(cert) == {"DNS:web1", "IP:192.0.2.10"}
    path = tmp_path / "leaf.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verified = openssl("verify", "-CAfile", str(owner.home / "x509_ca.pem"), str(path))
    assert verified.returncode == 0 and verified.stdout.strip() == f"{path}: OK", verified
    text = openssl("x509", "-in", str(path), "-noout", "-text").stdout
    assert "DNS:web1, IP Address:192.0.2.10" in text and "Subject: CN = web1" in text


@pytest.mark.parametrize(("section", "names", "message"), [
    ({}, [IP(ipaddress.ip_address("198.51.100.7"))],
     "IP address 198.51.100.7 is not one the owner knows as this VM's (192.0.2.10); name it in addresses or "
     "allowed_networks"),
    ({"allowed_networks": ["0.0.0.0/0"]}, [DNS("web1"), IP(ipaddress.ip_network("0.0.0.0/0"))],
     "IP SAN 0.0.0.0/0 is in network form; only single host addresses are signed"),
    ({}, [IP(ipaddress.ip_network("192.0.2.10/32"))],
     "IP SAN 192.0.2.10/32 is in network form; only single host addresses are signed"),
    ({"allowed_networks": ["0.0.0.0/0"]}, [IP(ipaddress.ip_address("0.0.0.0"))],
     "IP address 0.0.0.0 is not a single host's address"),
    ({"allowed_networks": ["0.0.0.0/0"]}, [IP(ipaddress.ip_address("255.255.255.255"))],
     "IP address 255.255.255.255 is not a single host's address"),
    ({"allowed_networks": ["::/0"]}, [IP(ipaddress.ip_address("ff02::1"))],
     "IP address ff02::1 is not a single host's address"),
    ({}, [DNS("web1"), DNS("other.example")],
     "DNS name 'other.example' is not one the profile asks for (web1, kelvin.example)"),
    ({"include_addresses": False}, [IP(ipaddress.ip_address("192.0.2.10"))],
     "IP address 192.0.2.10 (include_addresses = false)"),
])
def test_the_ca_refuses_what_the_owner_does_not_know(owner: Owner, section: dict[str, Any],
                                                     names: list[x509.GeneralName], message: str) -> None:
    from imprint.owner.errors import OwnerError

    ctx = ca_context(owner)
    with pytest.raises(OwnerError) as refused:
        sign_csr(ctx, {"names": ["kelvin.example"], **section}, names)
    assert str(refused.value) == "the CA refuses the CSR: " + message


def test_a_loopback_or_named_agent_address_vouches_for_nothing(owner: Owner) -> None:
    from imprint.owner.errors import OwnerError

    for address in ("127.0.0.1:4433", "vm.example:4433", "[fe80::1]:4433"):
        with pytest.raises(OwnerError, match=r"IP address 192\.0\.2\.10 is not one the owner knows as this VM's "
                                             r"\(none\)"):
            sign_csr(ca_context(owner, address), {}, [IP(ipaddress.ip_address("192.0.2.10"))])
    # The ssh host the owner named counts as well; and a profile's own addresses, CN from them.
    ctx = ca_context(owner, "127.0.0.1:4433", ssh_host="198.51.100.7")
    assert sans(sign_csr(ctx, {}, [IP(ipaddress.ip_address("198.51.100.7"))])) == {"IP:198.51.100.7"}
    cert = sign_csr(ca_context(owner, "127.0.0.1:4433"), {"include_vm_name": False, "addresses": ["2001:db8::10"]},
                    [IP(ipaddress.ip_address("2001:db8::10"))])
    assert cert.subject.rfc4514_string() == "CN=2001:db8::10" and sans(cert) == {"IP:2001:db8::10"}


def test_profile_addresses_are_single_hosts(owner: Owner) -> None:
    from imprint.backends.x509.owner import settings
    from imprint.owner.errors import UsageError

    ctx = ca_context(owner)
    for value, message in (("10.0.0.0/8", "is not an IP address (one host: no /mask)"),
                           ("0.0.0.0", "0.0.0.0 is not a single host's address"), ("web1", "is not an IP address")):
        with pytest.raises(UsageError, match=re.escape(message)):
            settings(ctx, {"addresses": [value]})
    with pytest.raises(UsageError, match="names: 'bad name' is not a DNS name"):
        settings(ctx, {"names": ["bad name"]})


def apply_x509(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    result = run_backend(Distro(root), "x509", config)
    json.dumps(result)
    return result


def self_signed(key_pem: bytes | None = None, name: str = "vm") -> tuple[str, bytes]:
    key = serialization.load_pem_private_key(key_pem, None) if key_pem else ec.generate_private_key(ec.SECP256R1())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.utcnow()
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def test_round_one_makes_a_key_once_and_reports_a_csr(tmp_path: Path) -> None:
    config = {"dns_names": ["vm.example"], "include_addresses": False, "key_type": "ed25519"}
    first = apply_x509(tmp_path, config)
    assert first["ok"] and first["changed"] and first["data"]["key_generated"] is True, first
    csr = x509.load_pem_x509_csr(first["data"]["csr"].encode())
    assert csr.is_signature_valid
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["vm.example"]
    assert first["data"]["certificate"] is None
    key = (tmp_path / KEY).read_bytes()
    second = apply_x509(tmp_path, {**config, "key_type": "ec-p256"})
    assert second["ok"] and second["changed"] is False and second["data"]["key_generated"] is False
    assert (tmp_path / KEY).read_bytes() == key  # kept
    assert second["warnings"] == [f"/{KEY} is a ed25519 key, not ec-p256; it is kept (remove it to make a new one)"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda key: {"certificate": "not a certificate"}, "x509.certificate must be one PEM certificate"),
    (lambda key: {"certificate": self_signed()[0]}, "x509.certificate certifies another key than "
                                                     "/etc/ssl/private/imprint.key"),
    (lambda key: {"certificate": self_signed(key)[0], "chain": [self_signed(None, "other-ca")[0]]},
     "x509.chain[0] is not the certificate's issuer"),
    (lambda key: {"chain": [self_signed()[0]]}, "x509.chain needs x509.certificate"),
    (lambda key: {"key_type": "dsa"}, "x509.key_type 'dsa' is not one of"),
    (lambda key: {"dns_names": ["bad name"]}, "x509.dns_names[0] 'bad name' is not a DNS name"),
    (lambda key: {"dns_names": ["vm\n"]}, "x509.dns_names[0] 'vm\\n' is not a DNS name"),
    (lambda key: {"interfaces": ["eth0\x1b"]}, "x509.interfaces: 'eth0\\x1b' is not an interface name"),
    (lambda key: {"cert_path": "relative.pem"}, "x509.cert_path 'relative.pem' is not an absolute file path"),
])
def test_bad_inputs_are_named_and_nothing_is_written(tmp_path: Path, make: Any, message: str) -> None:
    assert apply_x509(tmp_path, {"dns_names": ["vm"], "include_addresses": False})["ok"]
    before = snapshot(tmp_path)
    result = apply_x509(tmp_path, {"dns_names": ["vm"], "include_addresses": False,
                                   **make((tmp_path / KEY).read_bytes())})
    assert result["ok"] is False and message in result["summary"], result["summary"]
    assert snapshot(tmp_path) == before


def test_a_key_file_that_is_not_a_key_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "etc/ssl/private").mkdir(parents=True)
    (tmp_path / KEY).write_text("not a key")
    result = apply_x509(tmp_path, {"dns_names": ["vm"], "include_addresses": False})
    assert not result["ok"] and "/etc/ssl/private/imprint.key is not an unencrypted PEM private key" in \
        result["summary"]
    assert (tmp_path / KEY).read_text() == "not a key"


def test_install_idempotence_and_a_crash_between_write_and_rename(tmp_path: Path) -> None:
    assert apply_x509(tmp_path, {"dns_names": ["vm"], "include_addresses": False})["ok"]
    key = (tmp_path / KEY).read_bytes()
    old, _ = self_signed(key, "vm")
    config = {"dns_names": ["vm"], "include_addresses": False, "certificate": old, "fullchain_path": ""}
    first = apply_x509(tmp_path, config)
    assert first["ok"] and first["changed"], first
    assert (tmp_path / CERT).read_text() == old
    assert (tmp_path / "etc/ssl/certs/imprint-chain.pem").read_text() == ""
    assert not (tmp_path / "etc/ssl/certs/imprint-fullchain.pem").exists()
    before = snapshot(tmp_path)
    assert apply_x509(tmp_path, config)["changed"] is False and snapshot(tmp_path) == before
    new, _ = self_signed(key, "vm")
    crash_between_write_and_rename(tmp_path, "imprint.pem", "x509", {**config, "certificate": new})
    assert (tmp_path / CERT).read_text() == old  # the old certificate, whole
    assert apply_x509(tmp_path, {**config, "certificate": new})["changed"]
    assert (tmp_path / CERT).read_text() == new
    assert sorted(p.name for p in (tmp_path / CERT).parent.iterdir()) == ["imprint-chain.pem", "imprint.pem"]


def test_ca_init_imports_a_ca_and_refuses_a_leaf(owner: Owner, tmp_path: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem"), "-subj", "/CN=site CA",
                    "-days", "30", "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "leaf.key"), "-out", str(tmp_path / "leaf.pem"), "-subj", "/CN=leaf",
                    "-days", "30", "-addext", "basicConstraints=critical,CA:FALSE"], check=True, capture_output=True)
    assert "is not a CA certificate" in owner.run("ca", "init", "--x509", "--cert", str(tmp_path / "leaf.pem"),
                                                  "--key", str(tmp_path / "leaf.key"), check=2).stderr
    assert "does not carry the key" in owner.run("ca", "init", "--x509", "--cert", str(tmp_path / "ca.pem"),
                                                 "--key", str(tmp_path / "leaf.key"), check=2).stderr
    assert "add --x509" in owner.run("ca", "init", "--cert", str(tmp_path / "ca.pem"), check=2).stderr
    imported = owner.json("ca", "init", "--x509", "--cert", str(tmp_path / "ca.pem"), "--key", str(tmp_path / "ca.key"))
    assert imported["created"] is True
    assert (owner.home / "x509_ca.pem").read_bytes() == (tmp_path / "ca.pem").read_bytes()
    assert stat.S_IMODE((owner.home / "x509_ca.key").stat().st_mode) == 0o600
