"""TLS 1.3 contexts for both sides. Identity is the pinned key, never a name or a CA.

Binding happens in a connection where only the VM is TLS-authenticated (CPython's ssl cannot
accept a client certificate that is not known in advance); the owner proves its key inside the
exchange, which is bound to the VM certificate it saw. Every later connection is full mutual
TLS with CERT_REQUIRED against exactly one pinned peer certificate, and the peer's key is
compared with the pin once more after the handshake.
"""

from __future__ import annotations

import ssl


class PinMismatch(ssl.SSLError):
    """The peer completed TLS with a key other than the pinned one."""


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


def agent_pinned_context(cert_file: str, key_file: str, owner_cert_pem: str) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=owner_cert_pem)
    return ctx


def owner_bind_context() -> ssl.SSLContext:
    """Accepts any server certificate: the exchange, not TLS, authenticates the VM here."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def owner_pinned_context(cert_file: str, key_file: str, vm_cert_pem: str | None = None) -> ssl.SSLContext:
    """Client context with the owner's certificate; trusts only the pinned VM certificate."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the VM's identity is its key; addresses change
    ctx.verify_mode = ssl.CERT_REQUIRED
    if vm_cert_pem is not None:
        ctx.load_verify_locations(cadata=vm_cert_pem)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def peer_certificate(sock: ssl.SSLSocket) -> bytes:
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("peer presented no certificate")
    return der


def require_peer_key(sock: ssl.SSLSocket, pinned_spki_sha256: bytes) -> bytes:
    """Fail closed unless the peer's certificate carries exactly the pinned key; returns its SPKI."""
    from imprint import crypto  # lazy: a bound agent reaches READY without loading x509

    spki = crypto.certificate_spki(peer_certificate(sock))
    if not crypto.digests_equal(crypto.sha256(spki), pinned_spki_sha256):
        raise PinMismatch(f"peer key {crypto.fingerprint(spki)} is not the pinned key")
    return spki
