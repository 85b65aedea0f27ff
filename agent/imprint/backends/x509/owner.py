"""The owner's half of the x509 backend: the owner's X.509 CA, the signing policy, and renewal.

Profile table (see imprint.owner.apply)::

    [x509]
    names = ["www.example.org"]      # DNS SANs besides the VM name
    include_vm_name = true           # the VM name as a DNS SAN (and CN)
    include_addresses = true         # the VM's addresses (pyroute2, in the VM) as IP SANs, as far as
                                     # the owner vouches for them (below)
    interfaces = ["eth0"]            # only these interfaces' addresses (default: all)
    addresses = ["192.0.2.10"]       # the VM's addresses the owner vouches for, besides the one it
                                     # reaches the agent at
    allowed_networks = ["10.0.0.0/8", "2001:db8::/32"]   # and any address in these networks
    validity_days = 90
    renew_before_days = 30           # default: a third of validity_days
    key_type = "ec-p256"             # ec-p384, rsa-2048, rsa-3072, rsa-4096, ed25519
    key_path = "/etc/ssl/private/imprint.key"
    cert_path = "/etc/ssl/certs/imprint.pem"
    chain_path = "/etc/ssl/certs/imprint-chain.pem"          # "" : none
    fullchain_path = "/etc/ssl/certs/imprint-fullchain.pem"  # "" : none
    reload_command = ["systemctl", "reload", "nginx.service"]
    ca_cert = "/path/ca.pem"         # default: the owner's CA (`imprint ca init --x509`)
    ca_key = "/path/ca.key"
    ca_chain = "/path/intermediates.pem"   # more certificates for the chain, after ca_cert

Which IP addresses the CA signs (the SAN policy). A VM reports its addresses itself, and a
certificate for an address is the owner's word that the VM *is* that address: so the VM's word
is not enough. The CA signs an IP SAN only if the owner knows it as the VM's: the address the
owner reaches the agent at (``--address``, and ``--ssh-host``) when it is an IP literal, the
profile's ``addresses``, or an address inside one of the profile's ``allowed_networks``. With
none of these there is nothing to sign but DNS names. Whatever the policy, an IP SAN in network
form (address and mask, 8 or 32 bytes: what name constraints use) or an address that is no
single host's (unspecified, multicast, broadcast) is never signed; loopback and link-local
addresses only when the profile names them. The policy goes to the agent with round one, so an
honest VM asks only for what will be signed (and reports what it left out).

Rounds: the first makes the key in the VM if there is none and brings back a CSR with the
installed certificate. The owner checks the CSR: its signature, its key type, and its SANs —
the DNS names must be exactly ones the profile asked for, each IP one the policy allows,
nothing else. A CSR that fails any of that is refused (the backend fails; nothing is installed).
The certificate's subject and SANs are written from the owner's own values (the profile's
spelling of each name, the address as parsed), never copied from the CSR: its CN is the first
DNS name of the profile the CSR asks for, or else its first address.
The installed certificate is kept if it is this CA's (signature checked), certifies the CSR's
key, carries exactly the CSR's SANs, and has more than the renewal window left; otherwise the
owner signs a new one. The second round sends the certificate (new or kept) with the chain, so
missing chain files are rewritten; with nothing new the agent changes nothing. The owner never
copies an extension from the CSR: it writes its own (basicConstraints CA:FALSE, keyUsage,
extendedKeyUsage serverAuth+clientAuth, SAN, key identifiers).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imprint import crypto
from imprint.backends.x509.schema import DNS_RE, MAX_PEM
from imprint.boundedio import read_file
from imprint.fsatomic import ensure_private_dir, write_atomic
from imprint.owner.apply import ApplyContext, Review
from imprint.owner.errors import OwnerError, UsageError
from imprint.owner.home import OwnerHome

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    CaKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

SECTION_KEYS = ("names", "include_vm_name", "include_addresses", "interfaces", "addresses", "allowed_networks",
                "validity_days",
                "renew_before_days", "key_type", "key_path", "cert_path", "chain_path", "fullchain_path",
                "reload_command", "ca_cert", "ca_key", "ca_chain")
PASSED = ("key_type", "key_path", "cert_path", "chain_path", "fullchain_path", "interfaces")
CA_YEARS = 10
SKEW = datetime.timedelta(minutes=5)


def _read(path: Path, limit: int = MAX_PEM) -> bytes:
    """One of the owner's CA files, bounded (a profile may name any path: /dev/zero, a FIFO)."""
    data = read_file(path, limit, follow_links=True)
    if data is None:
        raise UsageError(f"{path} does not exist")
    return data


def ca_files(home: OwnerHome) -> tuple[Path, Path]:
    """The owner's X.509 CA: (certificate, key)."""
    return home.backend_file("x509_ca.pem"), home.backend_file("x509_ca.key")


# -- the CA
def ca_init(home: OwnerHome, cert_from: Path | None = None, key_from: Path | None = None) -> tuple[Path, str, bool]:
    """Create (or import) the owner's X.509 CA once: (certificate path, SHA-256 fingerprint, created)."""
    from cryptography.hazmat.primitives import hashes, serialization

    cert_path, key_path = ca_files(home)
    if cert_path.exists() and key_path.exists():
        if cert_from is not None:
            raise UsageError(f"an X.509 CA already exists in {home.dir}; refusing to replace it")
        cert, _ = load_ca(cert_path, key_path)
        return cert_path, cert.fingerprint(hashes.SHA256()).hex(), False
    home.load_key()  # the owner identity comes first
    if (cert_from is None) != (key_from is None):
        raise UsageError("--cert and --key go together")
    if cert_from is not None and key_from is not None:
        cert, key = load_ca(cert_from, key_from)
    else:
        cert, key = _new_ca(home)
    ensure_private_dir(home.dir)
    # The certificate first: a CA key is never present without it.
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, sync_dir=False)
    write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    return cert_path, cert.fingerprint(hashes.SHA256()).hex(), True


def _new_ca(home: OwnerHome) -> tuple[x509.Certificate, CaKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    owner = home.load_key().public.fingerprint
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imprint owner CA"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"owner {owner}"[:64])])
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - SKEW)
            .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, CaKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path))
        key = load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:  # InputError (a ValueError) included: it names the file
        raise UsageError(f"cannot load the CA from {cert_path} and {key_path}: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise UsageError(f"{key_path}: only RSA, EC and Ed25519 CA keys are supported")
    if not _same_key(cert.public_key(), key.public_key()):
        raise UsageError(f"{cert_path} does not carry the key in {key_path}")
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise UsageError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE)")
    return cert, key


# -- profile -> rounds
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Settings:
    dns_names: list[str]
    include_addresses: bool
    addresses: list[Address]   # host addresses the owner knows as the VM's (its own --address, the profile's)
    networks: list[Network]    # allowed_networks
    validity: datetime.timedelta
    renew_before: datetime.timedelta
    passed: dict[str, Any]
    reload_command: list[str] | None
    ca_cert: Path
    ca_key: Path
    ca_chain: Path | None


def settings(ctx: ApplyContext, section: dict[str, Any]) -> Settings:
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(SECTION_KEYS)}")

    def strings(key: str) -> list[str] | None:
        value = section.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise UsageError(f"{key} must be an array of strings")
        return value

    def flag(key: str) -> bool:
        value = section.get(key, True)
        if not isinstance(value, bool):
            raise UsageError(f"{key} must be true or false")
        return value

    def days(key: str, default: float) -> float:
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 36500:
            raise UsageError(f"{key} must be a positive number of days")
        return float(value)

    names = [n.lower() for n in strings("names") or []]
    for name in names:
        if not DNS_RE.match(name):
            raise UsageError(f"names: {name[:80]!r} is not a DNS name")
    if flag("include_vm_name"):
        names.insert(0, ctx.vm.lower())
    addresses = known_addresses(ctx)
    for text in strings("addresses") or []:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise UsageError(f"addresses: {text[:80]!r} is not an IP address (one host: no /mask)") from None
        if not _single_host(address):
            raise UsageError(f"addresses: {address} is not a single host's address")
        if address not in addresses:
            addresses.append(address)
    networks: list[Network] = []
    for text in strings("allowed_networks") or []:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise UsageError(f"allowed_networks: {exc}") from None
    validity = days("validity_days", 90)
    renew = days("renew_before_days", validity / 3)
    if renew >= validity:
        raise UsageError("renew_before_days must be less than validity_days")
    passed: dict[str, Any] = {}
    for key in PASSED:
        if key in section:
            if key == "interfaces":
                passed[key] = strings(key)
            elif not isinstance(section[key], str):
                raise UsageError(f"{key} must be a string")
            else:
                passed[key] = section[key]
    home_cert, home_key = ca_files(ctx.home)
    ca_cert, ca_key = section.get("ca_cert"), section.get("ca_key")
    if (ca_cert is None) != (ca_key is None):
        raise UsageError("ca_cert and ca_key go together")
    if ca_cert is not None and (not isinstance(ca_cert, str) or not isinstance(ca_key, str)):
        raise UsageError("ca_cert and ca_key must be paths")
    cert_path = Path(os.path.expanduser(ca_cert)) if ca_cert else home_cert
    key_path = Path(os.path.expanduser(ca_key)) if ca_key else home_key
    if ca_cert is None and not home_cert.exists():
        raise UsageError(f"no X.509 CA in {ctx.home.dir}: run `imprint ca init --x509` (or set ca_cert and ca_key)")
    chain = section.get("ca_chain")
    if chain is not None and not isinstance(chain, str):
        raise UsageError("ca_chain must be a path")
    reload_command = strings("reload_command")
    return Settings(dns_names=list(dict.fromkeys(names)), include_addresses=flag("include_addresses"),
                    addresses=addresses, networks=networks, validity=datetime.timedelta(days=validity),
                    renew_before=datetime.timedelta(days=renew), passed=passed, reload_command=reload_command,
                    ca_cert=cert_path, ca_key=key_path, ca_chain=Path(os.path.expanduser(chain)) if chain else None)


def _chain(s: Settings, ca: x509.Certificate) -> list[x509.Certificate]:
    from cryptography import x509

    chain = [ca]
    if s.ca_chain is not None:
        try:
            # One PEM block at a time: cryptography 38 has no load_pem_x509_certificates.
            text = _read(s.ca_chain, 8 * MAX_PEM).decode()
            blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
            if not blocks:
                raise ValueError("no PEM certificate in it")
            chain += [x509.load_pem_x509_certificate(b.encode()) for b in blocks]
        except (OSError, ValueError) as exc:
            raise UsageError(f"ca_chain {s.ca_chain}: {exc}") from None
    return chain


def prepare(ctx: ApplyContext, section: dict[str, Any]) -> dict[str, Any]:
    s = settings(ctx, section)
    ca, _ = load_ca(s.ca_cert, s.ca_key)
    _chain(s, ca)
    if not s.dns_names and not s.include_addresses:
        raise UsageError("no names: include_vm_name, names and include_addresses are all off")
    return {**s.passed, "dns_names": s.dns_names, "include_addresses": s.include_addresses,
            "allowed_addresses": policy_text(s)}


def review(ctx: ApplyContext, section: dict[str, Any], result: dict[str, Any], round: int) -> Review:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    s = settings(ctx, section)
    ca, ca_key = load_ca(s.ca_cert, s.ca_key)
    chain = _chain(s, ca)
    data = result.get("data") or {}
    out = Review()
    if round > 1:
        if data.get("certificate") is None:
            raise OwnerError("the agent reports no installed certificate after installing it")
        leaf = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
        out.data.update(serial=f"{leaf.serial_number:x}", not_after=_iso(crypto.not_valid_after(leaf)))
        return out
    csr = _load_csr(data.get("csr"))
    sans = check_csr(s, csr)
    current = _current(data.get("certificate"))
    reason = renewal_reason(s, ca, csr, sans, current)
    if reason is None:
        assert current is not None
        cert = current
        until = crypto.not_valid_after(cert)
        out.notes.append(f"the installed certificate (serial {cert.serial_number:x}) is current until "
                         f"{_iso(until)}; renewal from {_iso(until - s.renew_before)}")
    else:
        cert = sign(s, ca, ca_key, csr, sans)
        out.notes.append(f"signed a certificate ({reason}) for {', '.join(_describe(sans))}, serial "
                         f"{cert.serial_number:x}, valid until {_iso(crypto.not_valid_after(cert))}")
    out.follow_up = {**s.passed, "dns_names": s.dns_names, "include_addresses": s.include_addresses,
                     "allowed_addresses": policy_text(s),
                     "certificate": cert.public_bytes(Encoding.PEM).decode(),
                     "chain": [c.public_bytes(Encoding.PEM).decode() for c in chain]}
    if s.reload_command is not None:
        out.follow_up["reload_command"] = s.reload_command
    return out


def _load_csr(pem: Any) -> x509.CertificateSigningRequest:
    from cryptography import x509

    if not isinstance(pem, str):
        raise OwnerError("the agent sent no CSR")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise OwnerError(f"the CA refuses the CSR: it does not parse ({exc})") from None
    if not csr.is_signature_valid:
        raise OwnerError("the CA refuses the CSR: its signature does not verify")
    return csr


def _current(pem: Any) -> x509.Certificate | None:
    from cryptography import x509

    if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
        return None
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None


def check_csr(s: Settings, csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    """The CSR's SANs if the policy accepts them; an OwnerError naming the first that it refuses."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise OwnerError(f"the CA refuses the CSR: an RSA key of {key.key_size} bits (at least 2048)")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise OwnerError(f"the CA refuses the CSR: curve {key.curve.name}")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise OwnerError(f"the CA refuses the CSR: a {type(key).__name__} key")
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise OwnerError("the CA refuses the CSR: it has no subjectAltName") from None
    if not sans:
        raise OwnerError("the CA refuses the CSR: an empty subjectAltName")
    vetted: list[x509.GeneralName] = []
    for san in sans:
        if isinstance(san, x509.DNSName):
            value = san.value
            if not value.isascii() or value.lower() not in s.dns_names:
                raise OwnerError(f"the CA refuses the CSR: DNS name {value[:80]!r} is not one the profile asks for "
                                 f"({', '.join(s.dns_names) or 'none'})")
            name: x509.GeneralName = x509.DNSName(value.lower())  # the profile's spelling, not the CSR's
        elif isinstance(san, x509.IPAddress):
            address = san.value
            if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise OwnerError(f"the CA refuses the CSR: IP SAN {address} is in network form; only single host "
                                 "addresses are signed")
            if not _single_host(address):
                raise OwnerError(f"the CA refuses the CSR: IP address {address} is not a single host's address")
            if not s.include_addresses:
                raise OwnerError(f"the CA refuses the CSR: IP address {address} (include_addresses = false)")
            if not allowed(s, address):
                raise OwnerError(f"the CA refuses the CSR: IP address {address} is not one the owner knows as this "
                                 f"VM's ({describe_policy(s)}); name it in addresses or allowed_networks")
            name = x509.IPAddress(ipaddress.ip_address(address.packed))
        else:
            raise OwnerError(f"the CA refuses the CSR: a {type(san).__name__} SAN")
        if name not in vetted:
            vetted.append(name)
    return vetted


# -- the address policy
def known_addresses(ctx: ApplyContext) -> list[Address]:
    """The VM's addresses as the owner knows them without the VM's word: the hosts it reaches the
    agent and sshd at, when they are IP literals and routable (a loopback or link-local address
    there means a port forward or a local link, not the VM's own address)."""
    found: list[Address] = []
    for host in (ctx.address.rpartition(":")[0].strip("[]"), str(ctx.options.get("ssh_host", ""))):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            continue  # a DNS name: the owner's resolver, not knowledge of the VM
        if _single_host(address) and not (address.is_loopback or address.is_link_local) and address not in found:
            found.append(address)
    return found


def _single_host(address: Address) -> bool:
    return not (address.is_unspecified or address.is_multicast
                or (isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address("255.255.255.255")))


def allowed(s: Settings, address: Address) -> bool:
    return address in s.addresses or any(address.version == net.version and address in net for net in s.networks)


def policy_text(s: Settings) -> list[str]:
    """The policy as the agent gets it: CIDR strings (a host as /32 or /128)."""
    return [str(ipaddress.ip_network(a)) for a in s.addresses] + [str(n) for n in s.networks]


def describe_policy(s: Settings) -> str:
    return ", ".join([str(a) for a in s.addresses] + [str(n) for n in s.networks]) or "none"


def renewal_reason(s: Settings, ca: x509.Certificate, csr: x509.CertificateSigningRequest,
                   sans: list[x509.GeneralName], current: x509.Certificate | None) -> str | None:
    """Why a new certificate is needed, or None if the installed one stays."""
    if current is None:
        return "none installed"
    if current.issuer != ca.subject or not signed_by(current, ca):
        return "the installed one is not from this CA"
    if not _same_key(current.public_key(), csr.public_key()):
        return "the installed one certifies another key"
    if set(_describe(_sans_of(current))) != set(_describe(sans)):
        return "the names or addresses changed"
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    if crypto.not_valid_after(current) - now <= s.renew_before:
        return f"renewal: it expires {_iso(crypto.not_valid_after(current))}"
    return None


def sign(s: Settings, ca: x509.Certificate, ca_key: CaKey, csr: x509.CertificateSigningRequest,
         sans: list[x509.GeneralName]) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    not_after = min(now + s.validity, crypto.not_valid_after(ca))  # never beyond the CA's own validity
    # sans are check_csr's: built from the profile's values. The CN is one of them, DNS first.
    dns = [n.value for n in sans if isinstance(n, x509.DNSName)]
    cn = dns[0] if dns else str(sans[0].value)
    pub = csr.public_key()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca.subject).public_key(pub)
               .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
               .not_valid_before(now - SKEW).not_valid_after(not_after)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=isinstance(pub, rsa.RSAPublicKey),
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    algorithm = None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(ca_key, algorithm)


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Does ``ca``'s key verify ``cert``'s signature (cryptography 38 has no verify_directly_issued_by)?"""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    key = ca.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey) and cert.signature_hash_algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and cert.signature_hash_algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _same_key(a: Any, b: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(a.public_bytes(*fmt) == b.public_bytes(*fmt))


def _sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    from cryptography import x509

    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _describe(sans: list[x509.GeneralName]) -> list[str]:
    from cryptography import x509

    return [f"DNS:{n.value.lower()}" if isinstance(n, x509.DNSName) else f"IP:{n.value}" for n in sans]


def _iso(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
