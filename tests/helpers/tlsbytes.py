"""Real TLS bytes for the tests that speak to the agent below TLS (floods, drips, truncations)."""

from __future__ import annotations

import contextlib
import ssl

from imprint import tls


def client_hello() -> bytes:
    """The first flight of a genuine TLS 1.3 client, as the owner's bind sends it: one
    ClientHello handshake record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = tls.owner_bind_context().wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.do_handshake()
        raise AssertionError("a TLS client's handshake completed with no server")
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100, "not a TLS handshake record"
    return hello
