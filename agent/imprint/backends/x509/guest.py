"""The x509 backend: a private key born in the VM (it never leaves it), a CSR with the VM's names
and addresses for the owner's CA, and the signed certificate and chain installed next to it.

Config (the owner's half, ``imprint.backends.x509.owner``, builds it)::

    key_path:          guest path, default /etc/ssl/private/imprint.key (0600 root)
    cert_path:         default /etc/ssl/certs/imprint.pem (the leaf, 0644)
    chain_path:        default /etc/ssl/certs/imprint-chain.pem (the CA certificates); "" : none
    fullchain_path:    default /etc/ssl/certs/imprint-fullchain.pem (leaf + chain); "" : none
    key_type:          ec-p256 (default), ec-p384, rsa-2048, rsa-3072, rsa-4096, ed25519
    dns_names:         [name, ...] DNS SANs of the CSR (the owner sends the VM name and its own)
    include_addresses: true: the VM's global-scope addresses as IP SANs, enumerated with pyroute2
    interfaces:        [ifname, ...] only these interfaces' addresses (default: all)
    allowed_addresses: [CIDR, ...] the owner's CA signs only addresses inside these (its SAN
                       policy, imprint.backends.x509.owner): the CSR names no other, and the ones left
                       out are reported as a warning. Absent: every enumerated address.
    certificate:       PEM: install it (round two); without it the backend only reports
    chain:             [PEM, ...] the issuing CA first
    reload_command:    [argv] run when the certificate, chain or key changed

Without ``certificate`` (round one) the backend makes the key if there is none (generated here,
written 0600 before anything else uses it), and reports a fresh CSR for it (``data.csr``) with
the installed certificate and chain, if any, so the owner can decide whether to sign. With
``certificate`` it checks that the certificate certifies *this* key and that the chain's first
certificate is its issuer, then writes certificate, chain and full chain (each atomically;
unchanged files are not touched) and runs the reload command if any of them changed.

A key that exists is kept (also when ``key_type`` names another type: a warning says so);
renewal re-signs the same key. Results (``data``): ``csr``, ``certificate``, ``chain``,
``addresses``, ``dns_names``, ``key_generated``, ``reloaded``, ``paths``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imprint import crypto
from imprint.backends import BackendContext, BackendError, BackendResult
from imprint.backends.x509.schema import MAX_PEM
from imprint.guest.distro import BackendFiles

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    # The key types this backend makes and signs CSRs with (cryptography 38 names no such union).
    Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

IFNAME_RE = re.compile(r"^[!-~]{1,15}\Z")  # printable ASCII, no space (the kernel refuses '/' and space)
MAX_CHAIN_PEM = 9 * MAX_PEM  # the chain files: up to 8 CA certificates (and the leaf)


@dataclass
class _Config:
    key_path: str
    cert_path: str
    chain_path: str
    fullchain_path: str
    key_type: str
    dns_names: list[str]
    include_addresses: bool
    interfaces: list[str] | None
    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None
    certificate: str | None
    chain: list[str]
    reload_command: list[str] | None


def apply(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    cfg = _parse(config, ctx.paths.files)
    leaf, chain = _parse_certificates(cfg)
    key_file = ctx.path(cfg.key_path)
    key_pem = ctx.read_file(key_file, limit=MAX_PEM)
    key = _load_key(key_pem, cfg.key_path) if key_pem is not None else None
    if leaf is not None:
        # Round two: everything is checked before the first write.
        if key is None:
            raise BackendError(f"x509.certificate was sent but the private key {cfg.key_path} is gone; "
                               "apply again to make a new key and CSR")
        if not _same_public_key(leaf.public_key(), key.public_key()):
            raise BackendError(f"x509.certificate certifies another key than {cfg.key_path}")
        if chain and leaf.issuer != chain[0].subject:
            raise BackendError("x509.chain[0] is not the certificate's issuer")
        return _install(ctx, cfg, leaf, chain)

    # Round one: the key (made here if missing) and a CSR for it.
    addresses = enumerate_addresses(cfg.interfaces) if cfg.include_addresses else []
    if cfg.allowed is not None:
        left_out = [a for a in addresses if not _inside(a, cfg.allowed)]
        addresses = [a for a in addresses if a not in left_out]
        if left_out:
            ctx.warn(f"not in the CSR: {', '.join(left_out)} (the owner's CA signs only addresses it knows as "
                     f"this VM's: {', '.join(map(str, cfg.allowed)) or 'none'})")
    if not cfg.dns_names and not addresses:
        raise BackendError("x509: no DNS name and no address for the certificate")
    generated = False
    if key is None:
        key = _generate(cfg.key_type)
        ctx.ensure_dir(key_file.parent, mode=0o700, uid=0, gid=0, fix_existing=False, parents=True)
        ctx.write_file(key_file, _key_pem(key), mode=0o600, uid=0, gid=0)
        ctx.note_change(f"generated a {cfg.key_type} key in {cfg.key_path}")
        generated = True
    else:
        ctx.write_file(key_file, key_pem or b"", mode=0o600, uid=0, gid=0)  # fixes a loose mode or owner
        if _key_type(key) != cfg.key_type:
            ctx.warn(f"{cfg.key_path} is a {_key_type(key)} key, not {cfg.key_type}; it is kept (remove it to "
                     "make a new one)")
    csr = build_csr(key, cfg.dns_names, addresses)
    installed = ctx.read_file(ctx.path(cfg.cert_path), limit=MAX_PEM)
    installed_chain = ctx.read_file(ctx.path(cfg.chain_path), limit=MAX_CHAIN_PEM) if cfg.chain_path else None
    from cryptography.hazmat.primitives.serialization import Encoding

    return ctx.result(
        f"CSR for {', '.join([*cfg.dns_names, *addresses])} ({'new' if generated else 'existing'} "
        f"{_key_type(key)} key)",
        csr=csr.public_bytes(Encoding.PEM).decode(), dns_names=cfg.dns_names, addresses=addresses,
        certificate=installed.decode(errors="replace") if installed else None,
        chain=installed_chain.decode(errors="replace") if installed_chain else None,
        key_generated=generated, paths=_paths(cfg))


def _paths(cfg: _Config) -> dict[str, str]:
    return {"key": cfg.key_path, "certificate": cfg.cert_path, "chain": cfg.chain_path,
            "fullchain": cfg.fullchain_path}


def _install(ctx: BackendContext, cfg: _Config, leaf: x509.Certificate, chain: list[x509.Certificate],
             ) -> BackendResult:
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf_pem = leaf.public_bytes(Encoding.PEM)
    chain_pem = b"".join(c.public_bytes(Encoding.PEM) for c in chain)
    changed = False
    # The leaf first: a reader that takes the chain from the full chain file sees a consistent pair
    # once the full chain is written; each file on its own is always whole.
    for guest, data in ((cfg.cert_path, leaf_pem), (cfg.chain_path, chain_pem),
                        (cfg.fullchain_path, leaf_pem + chain_pem)):
        if not guest:
            continue
        path = ctx.path(guest)
        ctx.ensure_dir(path.parent, mode=0o755, uid=0, gid=0, fix_existing=False, parents=True)
        changed |= ctx.write_file(path, data, mode=0o644, uid=0, gid=0)
    reloaded = _reload(ctx, cfg.reload_command) if changed else False
    names = ", ".join(f"{type(n).__name__.removesuffix('Name').removesuffix('Address')}:{n.value}"
                      for n in _sans(leaf))
    return ctx.result(
        f"certificate serial {leaf.serial_number:x} for {names}, valid until "
        f"{crypto.not_valid_after(leaf).strftime('%Y-%m-%dT%H:%M:%SZ')}, "
        f"{'installed' if changed else 'already installed'}"
        + (", reloaded" if reloaded else ""),
        certificate=leaf_pem.decode(), chain=chain_pem.decode(), reloaded=reloaded, paths=_paths(cfg))


def _reload(ctx: BackendContext, command: list[str] | None) -> bool:
    if not command:
        return False
    proc = ctx.run(command, check=False, timeout=60)
    if proc.returncode != 0:
        # The files are right and stay; the service keeps its old certificate until it reloads.
        ctx.warn(f"reload command {' '.join(command)} failed (exit {proc.returncode}): {proc.stderr.strip()[:300]}")
        return False
    return True


# -- validation
def _parse(config: dict[str, Any], files: BackendFiles) -> _Config:
    """What imprint.backends.x509.schema (checked by the framework) cannot say; the paths'
    defaults are the distribution's (imprint.guest.distro)."""
    paths = {}
    for key, default in (("key_path", files.tls_key), ("cert_path", files.tls_cert), ("chain_path", files.tls_chain),
                         ("fullchain_path", files.tls_fullchain)):
        value: str = default if config.get(key) is None else config[key]
        if value and (not value.startswith("/") or ".." in value.split("/") or value.endswith("/")):
            raise BackendError(f"x509.{key} {value!r} is not an absolute file path")
        if not value and key in ("key_path", "cert_path"):
            raise BackendError(f"x509.{key} must not be empty")
        paths[key] = value
    if len({p for p in paths.values() if p}) != len([p for p in paths.values() if p]):
        raise BackendError("x509: key_path, cert_path, chain_path and fullchain_path must differ")
    key_type: str = config.get("key_type") or "ec-p256"
    dns_names: list[str] = config.get("dns_names") or []
    interfaces: list[str] | None = config.get("interfaces")
    for name in interfaces or []:
        if not IFNAME_RE.match(name):
            raise BackendError(f"x509.interfaces: {name[:80]!r} is not an interface name")
    allowed = None
    if (texts := config.get("allowed_addresses")) is not None:
        try:
            allowed = [ipaddress.ip_network(t, strict=True) for t in texts]
        except ValueError as exc:
            raise BackendError(f"x509.allowed_addresses: {exc}") from None
    certificate: str | None = config.get("certificate")
    chain: list[str] = config.get("chain") or []
    if chain and certificate is None:
        raise BackendError("x509.chain needs x509.certificate")
    return _Config(key_type=key_type, dns_names=list(dict.fromkeys(n.lower() for n in dns_names)),
                   include_addresses=config.get("include_addresses") is not False,
                   interfaces=interfaces, allowed=allowed, certificate=certificate, chain=chain,
                   reload_command=config.get("reload_command"), **paths)


def _parse_certificates(cfg: _Config) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    if cfg.certificate is None:
        return None, []
    leaf = _load_certificate(cfg.certificate, "x509.certificate")
    chain = [_load_certificate(pem, f"x509.chain[{i}]") for i, pem in enumerate(cfg.chain)]
    return leaf, chain


def _load_certificate(pem: str, where: str) -> x509.Certificate:
    from cryptography import x509

    if len(pem) > MAX_PEM or pem.count("-----BEGIN CERTIFICATE-----") != 1:
        raise BackendError(f"{where} must be one PEM certificate")
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise BackendError(f"{where} is not a certificate: {exc}") from None


def _load_key(pem: bytes, where: str) -> Key:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BackendError(f"{where} is not an unencrypted PEM private key ({exc}); refusing to replace it") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise BackendError(f"{where} is a {type(key).__name__}; only RSA, EC and Ed25519 keys are supported")
    return key


# -- keys and CSRs
def _generate(key_type: str) -> Key:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    return ec.generate_private_key(ec.SECP256R1() if key_type == "ec-p256" else ec.SECP384R1())


def _key_type(key: Key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, f"ec-{key.curve.name}")
    return "ed25519"


def _key_pem(key: Key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _same_public_key(a: Any, b: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(a.public_bytes(*fmt) == b.public_bytes(*fmt))


def build_csr(key: Key, dns_names: list[str], addresses: list[str],
              ) -> x509.CertificateSigningRequest:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or addresses)[0])])
    builder = (x509.CertificateSigningRequestBuilder().subject_name(subject)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def _sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[Any]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


# -- addresses
def _inside(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip.version == net.version and ip in net for net in networks)


def enumerate_addresses(interfaces: list[str] | None = None) -> list[str]:
    """The VM's global-scope addresses (IPv4 then IPv6), from the kernel over netlink (pyroute2,
    imported here so an agent that never runs this backend never loads it). Loopback and
    link-local addresses are host or link scope and are left out: a certificate for them means
    nothing to a client elsewhere."""
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise BackendError("pyroute2 is not installed in the VM (Debian: python3-pyroute2)") from None
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr():
            if msg["scope"] != 0:  # RT_SCOPE_UNIVERSE only
                continue
            if interfaces is not None and names.get(msg["index"]) not in interfaces:
                continue
            # IFA_LOCAL is the interface's own IPv4 address (IFA_ADDRESS is the peer on a
            # point-to-point link); IPv6 has only IFA_ADDRESS.
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if text:
                address = ipaddress.ip_address(text)
                if not (address.is_loopback or address.is_link_local or address in found):
                    found.append(address)
    return [str(a) for a in sorted(found, key=lambda a: (a.version, a))]
