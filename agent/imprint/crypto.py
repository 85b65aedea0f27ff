"""The one crypto facade: every key, signature, MAC and hash imprint uses goes through here.

Verification functions return nothing and raise on failure; there is no flag to turn a check
off. Only APIs present in cryptography 38 (Debian 12) are used, because the agent runs on the
distribution's own python3-cryptography inside images.

Every function that parses bytes (a peer's key or certificate, a key file) raises CryptoError and
nothing else for bytes it cannot accept: which exception the library raises for hostile input is
not part of its API and changes between releases (38 says ValueError for an SPKI with an unknown
algorithm OID, 50 says UnsupportedAlgorithm), so each parser turns ANY exception of the library
into CryptoError (``_refusing``) instead of listing the ones known today.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import NameOID

SECRET_BYTES = 32
NONCE_BYTES = 32
DIGEST_BYTES = 32
MAC_BYTES = 32
SIGNATURE_BYTES = 64
# Ed25519 SubjectPublicKeyInfo: 12 bytes of DER header + 32 bytes of key.
SPKI_BYTES = 44
# The header of the one DER encoding of an Ed25519 SPKI (RFC 8410): SEQUENCE { SEQUENCE { OID
# 1.3.101.112 }, BIT STRING (0 unused bits) }. A key is parsed and encoded by this header and
# the raw 32 bytes, not by OpenSSL's DER decoders: OpenSSL 3's provider decoders cost ~0.15 ms a
# key, several times a bind on each side. The header is the canonical form, so a key that does
# not start with it exactly goes through the library's parser, whose error then names why.
_ED25519_SPKI_HEADER = bytes.fromhex("302a300506032b6570032100")


class CryptoError(Exception):
    """A key, certificate or signature is not acceptable."""


@contextlib.contextmanager
def _refusing(what: str) -> Iterator[None]:
    """Inside: any exception (the library's, whatever its type) means ``what``, as a CryptoError.

    The library's exception stays chained as ``__cause__`` for a debug log; its type name is in
    the message, its text is not (it can quote the peer's bytes)."""
    try:
        yield
    except CryptoError:
        raise
    except Exception as exc:
        raise CryptoError(f"{what} ({type(exc).__name__})") from exc


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def fingerprint(spki_der: bytes) -> str:
    """Human-facing fingerprint of a public key: safe to log, like OpenSSH's SHA256:... form."""
    return "SHA256:" + base64.b64encode(sha256(spki_der)).decode().rstrip("=")


def hkdf(secret: bytes, *, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"imprint/1", info=info).derive(secret)


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def verify_mac(key: bytes, data: bytes, tag: bytes) -> None:
    if not hmac.compare_digest(mac(key, data), tag):
        raise CryptoError("MAC does not verify")


def digests_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


AEAD_KEY_BYTES = 32   # AES-256-GCM
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16


def scrypt(passphrase: bytes, *, salt: bytes, n: int, r: int, p: int, length: int = AEAD_KEY_BYTES) -> bytes:
    """A key from a passphrase (RFC 7914). The caller bounds n, r and p (memory is 128 * n * r bytes)."""
    with _refusing("scrypt parameters are not acceptable"):
        return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(passphrase)


def aead_seal(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: ciphertext and its 16-byte tag, which covers ``associated_data`` too."""
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_open(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """The plaintext of :func:`aead_seal`'s output; CryptoError if it, the nonce or the
    associated data is not what was sealed with this key."""
    with _refusing("ciphertext does not decrypt"):
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
        except InvalidTag:
            raise CryptoError("ciphertext does not decrypt") from None


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key, held as its canonical SubjectPublicKeyInfo DER."""

    spki: bytes

    @classmethod
    def from_spki(cls, spki: bytes) -> PublicKey:
        if _is_ed25519_spki(spki):
            with _refusing("public key is not a valid Ed25519 key"):
                _ed25519_key(spki)
            return cls(bytes(spki))
        with _refusing("public key is not valid SubjectPublicKeyInfo DER"):
            key = serialization.load_der_public_key(spki)
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise CryptoError("public key is not Ed25519, the only key type of protocol version 1")
            canonical = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if canonical != spki:
            raise CryptoError("public key DER is not in canonical form")
        return cls(spki)

    @property
    def digest(self) -> bytes:
        return sha256(self.spki)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.spki)

    def verify(self, signature: bytes, data: bytes) -> None:
        # The signature is the peer's bytes: whatever the library makes of them, a failure is a
        # signature that does not verify.
        with _refusing("signature does not verify"):
            if not _is_ed25519_spki(self.spki):
                raise CryptoError("public key is not Ed25519")
            key = _ed25519_key(self.spki)
            try:
                key.verify(signature, data)
            except InvalidSignature:
                raise CryptoError("signature does not verify") from None


class PrivateKey:
    """An Ed25519 private key. Its repr never shows key material."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey(_spki_of(key.public_key()))

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> PrivateKey:
        with _refusing("private key file is not an unencrypted PEM key"):
            key = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise CryptoError("private key is not Ed25519")
            return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_der(cls, der: bytes) -> PrivateKey:
        """An unencrypted PKCS#8 DER Ed25519 key (what :meth:`to_der` makes)."""
        with _refusing("private key is not an unencrypted PKCS#8 DER key"):
            key = serialization.load_der_private_key(der, password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise CryptoError("private key is not Ed25519")
            return cls(key)

    def to_der(self) -> bytes:
        """Unencrypted PKCS#8 DER (48 bytes for Ed25519; RFC 8410: the 32-byte seed last)."""
        return self._key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def self_signed_certificate(self, common_name: str) -> bytes:
        """A self-signed certificate (PEM) carrying this key, for TLS. Identity is the key, not
        the name or dates: peers pin the key, so the certificate never expires in practice."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(int.from_bytes(sha256(self.public.spki)[:16], "big") >> 1)
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._key, None)
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return f"PrivateKey({self.public.fingerprint})"


def certificate_spki(cert: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of a certificate given as DER or PEM."""
    with _refusing("certificate is not valid X.509"):
        loaded = x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(cert)
        return _spki_of(loaded.public_key())


def certificate_subject(cert: bytes) -> bytes:
    """The DER of a (DER or PEM) certificate's subject name."""
    with _refusing("certificate is not valid X.509"):
        loaded = x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(cert)
        return loaded.subject.public_bytes()


def self_signed_certificate_spki(der: bytes) -> bytes:
    """SPKI of a canonical DER certificate that is self-signed by its own Ed25519 key.

    Any failure inside the parser (cryptography raises ValueError, InvalidVersion,
    UnsupportedAlgorithm and others for hostile input) is a CryptoError: the caller turns it
    into a remote protocol error."""
    with _refusing("certificate is not valid DER X.509"):
        cert = x509.load_der_x509_certificate(der)
        canonical = cert.public_bytes(serialization.Encoding.DER)
        key = cert.public_key()
        signature, tbs = cert.signature, cert.tbs_certificate_bytes
        outer_algorithm = cert.signature_algorithm_oid
    if canonical != der:
        raise CryptoError("certificate DER is not canonical")
    # The signature covers the TBS part only: the outer algorithm and the signature BIT STRING's
    # unused-bits byte must be checked here, or a certificate that differs from the signed one
    # in those bytes would pass as the same key's (and could become a pin).
    if outer_algorithm != x509.oid.SignatureAlgorithmOID.ED25519:
        raise CryptoError("certificate's signature algorithm is not Ed25519")
    if not der.endswith(b"\x03\x41\x00" + signature) or len(signature) != 64:
        raise CryptoError("certificate's signature is not one 64-byte Ed25519 signature BIT STRING")
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CryptoError("certificate key is not Ed25519")
    with _refusing("certificate is not self-signed by its own key"):
        try:
            key.verify(signature, tbs)
        except InvalidSignature:
            raise CryptoError("certificate is not self-signed by its own key") from None
        return _spki_of(key)


def _is_ed25519_spki(spki: bytes) -> bool:
    return len(spki) == SPKI_BYTES and spki.startswith(_ED25519_SPKI_HEADER)


def _ed25519_key(spki: bytes) -> ed25519.Ed25519PublicKey:
    """The library's key for a canonical Ed25519 SPKI (see _is_ed25519_spki), from its raw bytes."""
    return ed25519.Ed25519PublicKey.from_public_bytes(spki[len(_ED25519_SPKI_HEADER):])


def _spki_of(key: object) -> bytes:
    """The SPKI DER of a public key the library holds: an Ed25519 key's from its raw bytes."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return _ED25519_SPKI_HEADER + key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    encoded: bytes = key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return encoded


def certificate_der(pem: bytes) -> bytes:
    with _refusing("certificate is not valid PEM X.509"):
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    """The end of ``cert``'s validity, naive UTC, on every cryptography the range declares:
    from 42 on the naive property is deprecated for ``not_valid_after_utc``, which 38 lacks."""
    aware: datetime.datetime | None = getattr(cert, "not_valid_after_utc", None)
    return aware.replace(tzinfo=None) if aware is not None else cert.not_valid_after
