"""Fixed identities for the exchange's tests: keys, certificates and tokens from fixed seeds.

The same bytes on every run, so a frame recorded once (the fuzz corpus under tests/fuzz, a
parametrised bit position) still verifies when it is replayed. The seeds' domain b"imprint fuzz"
is the one the committed fuzz corpus was made with: changing it invalidates that corpus.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import ed25519
from imprint import crypto
from imprint.tokens import Token, TokenKind

DOMAIN = "imprint fuzz"


def fixed_key(label: str, *, domain: str = DOMAIN) -> crypto.PrivateKey:
    """The Ed25519 key whose seed is SHA-256(domain NUL label)."""
    seed = hashlib.sha256(domain.encode() + b"\0" + label.encode()).digest()
    return crypto.PrivateKey(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def cert_der(key: crypto.PrivateKey, name: str) -> bytes:
    return crypto.certificate_der(key.self_signed_certificate(name))


OWNER_KEY, VM_KEY = fixed_key("owner"), fixed_key("vm")
OWNER_CERT = cert_der(OWNER_KEY, "owner")
VM_CERT = cert_der(VM_KEY, "vm")
K = Token(TokenKind.SHARED, hashlib.sha256(DOMAIN.encode() + b" K").digest())
NOSECRET = Token(TokenKind.NOSECRET, OWNER_KEY.public.digest)  # the owner's no-secrets token
VM_TOKEN = Token(TokenKind.VM, VM_KEY.public.digest)  # the VM token the site relays back
