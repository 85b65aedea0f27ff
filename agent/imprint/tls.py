"""TLS 1.3 contexts for both sides. Identity is the pinned key, never a name or a CA.

Binding happens in a connection where only the VM is TLS-authenticated (CPython's ssl cannot
accept a client certificate that is not known in advance); the owner proves its key inside the
exchange, which is bound to the VM certificate it saw. Every later connection is full mutual
TLS with CERT_REQUIRED against exactly one pinned peer certificate, and the peer's key is
compared with the pin once more after the handshake.

A pinned certificate has one form, PinnedCert (its DER bytes), on both sides: the owner's pin
of a VM (owner/store.py, owner/bind.py, owner/client.py) and the agent's pin of its owner
(guest/server.py). Every other form (PEM for a context's trust anchor, the key's digest, the
fingerprint) derives from it, and the checks of a peer against it are its methods: verify (the
key, the agent's check of its owner) and verify_exact (the very certificate, the owner's check
of a VM).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import ssl
from dataclasses import dataclass
from functools import cached_property


class PinMismatch(ssl.SSLError):
    """The peer completed TLS with a key other than the pinned one."""


@dataclass(frozen=True)
class PinnedCert:
    """The certificate pinned for a peer, as DER. Built without parsing X.509 (ssl's PEM
    armour only), so that a bound agent reaches READY without loading the crypto library;
    the key's digest is taken when a peer is first checked against it."""

    der: bytes

    @classmethod
    def with_spki(cls, der: bytes, spki: bytes) -> PinnedCert:
        """The pin of ``der`` whose key the caller has already taken out (``spki``, the result of
        crypto.certificate_spki on these bytes): not parsed a second time."""
        pin = cls(der)
        pin.__dict__["spki"] = spki  # what the cached_property below would compute
        return pin

    @classmethod
    def from_pem(cls, pem: str | bytes) -> PinnedCert:
        try:
            text = pem.decode("ascii") if isinstance(pem, bytes) else pem
            return cls(ssl.PEM_cert_to_DER_cert(text))
        except ValueError as exc:  # an SSLError, as loading it into a context would raise
            raise ssl.SSLError(f"not a PEM certificate: {exc}") from None

    @property
    def pem(self) -> str:
        return ssl.DER_cert_to_PEM_cert(self.der)

    @property
    def der_sha256(self) -> str:
        """The certificate's SHA-256, hex."""
        return hashlib.sha256(self.der).hexdigest()

    @cached_property
    def spki(self) -> bytes:
        from imprint import crypto  # lazy: see the class's comment

        return crypto.certificate_spki(self.der)

    @property
    def fingerprint(self) -> str:
        """The pinned key's fingerprint (SHA256:...), as logs and the CLI show keys."""
        from imprint import crypto

        return crypto.fingerprint(self.spki)

    def trust(self, ctx: ssl.SSLContext) -> None:
        """Make the pin ``ctx``'s one trust anchor (with CERT_REQUIRED, the handshake's check)."""
        ctx.load_verify_locations(cadata=self.pem)

    def verify(self, sock: ssl.SSLSocket) -> bytes:
        """Fail closed unless the peer's certificate carries exactly the pinned key; returns its SPKI."""
        from imprint import crypto

        spki = crypto.certificate_spki(peer_certificate(sock))
        if not crypto.digests_equal(crypto.sha256(spki), crypto.sha256(self.spki)):
            raise PinMismatch(f"peer key {crypto.fingerprint(spki)} is not the pinned key")
        return spki

    def verify_exact(self, sock: ssl.SSLSocket) -> None:
        """Fail closed unless the peer's certificate is the pinned certificate's very bytes:
        stricter than ``verify``, for the owner's side (a VM's certificate never changes)."""
        shown = hashlib.sha256(peer_certificate(sock)).digest()
        if not hmac.compare_digest(shown, hashlib.sha256(self.der).digest()):
            raise PinMismatch("the certificate shown is not the pinned certificate's bytes")


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # No resumption: every connection proves the pinned key afresh. OP_NO_TICKET alone does not
    # stop TLS 1.3 servers from sending tickets, so the count is zeroed too.
    ctx.options |= ssl.OP_NO_TICKET
    if purpose == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0  # type: ignore[attr-defined]  # missing from typeshed; Python >= 3.8 has it
    return ctx


def agent_bind_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def agent_pinned_context(cert_file: str, key_file: str, owner: PinnedCert) -> ssl.SSLContext:
    ctx = agent_unpinned_context(cert_file, key_file)
    owner.trust(ctx)
    return ctx


def agent_unpinned_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The pinned server context before its pin: CERT_REQUIRED with no trust anchor, so it
    accepts no client at all until ``PinnedCert.trust`` gives it the one. The agent builds it
    ahead of its bind (loading the key and chain is most of the cost) and pins it at the bind."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@functools.cache
def owner_bind_context() -> ssl.SSLContext:
    """Accepts any server certificate: the exchange, not TLS, authenticates the VM here.

    One per process, shared by every bind (an SSLContext is safe to wrap sockets with from many
    threads, and this one holds nothing of any bind: no certificate, no session cache): building
    it costs about 0.4 ms, a tenth of a bind's owner CPU. Callers must not change it."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def owner_pinned_context(cert_file: str, key_file: str, vm: PinnedCert | None = None) -> ssl.SSLContext:
    """Client context with the owner's certificate; trusts only the pinned VM certificate."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the VM's identity is its key; addresses change
    ctx.verify_mode = ssl.CERT_REQUIRED
    if vm is not None:
        vm.trust(ctx)
    load_owner_identity(ctx, cert_file, key_file)
    return ctx


def load_owner_identity(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """The one way the owner's certificate and key (owner.crt, owner.key) reach ssl.

    An unencrypted owner.key is loaded from its path, as it always was. An encrypted one
    (owner/keyfile.py) is decrypted in memory (once per process, by OwnerHome) and handed to
    OpenSSL through an anonymous memory file (memfd_create) by its /proc/self/fd path, closed
    as soon as it is loaded: no decrypted byte is written to any file system. Not ssl's
    ``password=`` with an OpenSSL-encrypted PEM instead: the encrypted PKCS#8 that cryptography 38
    writes (BestAvailableEncryption) is PBKDF2 at OpenSSL's default 2048 rounds, not memory-hard,
    with no way there to ask for scrypt; and OpenSSL would run its KDF again for every context,
    i.e. every pinned request, where this decrypts once per process."""
    from imprint.fsatomic import write_all
    from imprint.owner.home import key_pem_for_tls  # lazy: the agent never loads the owner's code

    pem = key_pem_for_tls(key_file)
    if pem is None:
        ctx.load_cert_chain(cert_file, key_file)
        return
    fd = os.memfd_create("imprint-owner-key", os.MFD_CLOEXEC)
    try:
        write_all(fd, pem)
        ctx.load_cert_chain(cert_file, f"/proc/self/fd/{fd}", password=_no_password)
    finally:
        os.close(fd)


def _no_password() -> bytes:
    # The decrypted key is unencrypted PEM: OpenSSL never asks. If it did, it must not prompt.
    raise ssl.SSLError("the owner key in memory is not the unencrypted PEM it should be")


# ---- the VM dials its owner (docs/protocol.md §4.6): the roles of TLS reversed


@functools.cache
def agent_dial_bind_context() -> ssl.SSLContext:
    """The dialling VM's bind connection: accepts any listener certificate, presents none. The
    exchange authenticates the listener (in no-secrets mode its key must hash to the owner token
    before the VM sends anything), and binds itself to the certificate seen here."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def agent_dial_pinned_context(cert_file: str, key_file: str, owner: PinnedCert) -> ssl.SSLContext:
    """A bound VM dialling its owner: presents the VM certificate, trusts only the pinned owner's."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the owner's identity is its key; the address is only where to dial
    ctx.verify_mode = ssl.CERT_REQUIRED
    owner.trust(ctx)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def owner_listener_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The owner's listener: presents the owner certificate. A client certificate is optional
    (a VM that binds shows none: it proves its key in the exchange), but one that is shown must
    chain to a trust anchor, and the only anchors are the pinned VMs' own certificates, added
    with ``PinnedCert.trust`` as VMs are bound: an unknown certificate fails the handshake."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    load_owner_identity(ctx, cert_file, key_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def peer_certificate(sock: ssl.SSLSocket) -> bytes:
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("peer presented no certificate")
    return der
