"""Protocol errors, local and remote kept apart (as in h11).

A RemoteProtocolError means the peer (or something in the link) sent what the protocol does not
accept: malformed, oversized, out of order, or failing authentication. A LocalProtocolError means
this side's code misused its own state machine; it is a bug, never something a peer can cause.
"""

from __future__ import annotations

from enum import IntEnum


class AlertCode(IntEnum):
    """Reasons carried in an Alert message. Values are wire constants."""

    MALFORMED = 1
    UNEXPECTED_MESSAGE = 2
    VERSION_UNSUPPORTED = 3
    MODE_MISMATCH = 4
    WRONG_TOKEN = 5
    AUTHENTICATION_FAILED = 6
    CHANNEL_BINDING_MISMATCH = 7
    KEY_MISMATCH = 8
    TOKEN_CONSUMED = 9
    INTERNAL = 10
    CLOSED = 11
    NOT_EXPECTED = 12


ALERT_TEXT: dict[AlertCode, str] = {
    AlertCode.MALFORMED: "a message was malformed",
    AlertCode.UNEXPECTED_MESSAGE: "a message arrived out of order",
    AlertCode.VERSION_UNSUPPORTED: "the protocol version is not supported",
    AlertCode.MODE_MISMATCH: "the two sides use different modes (shared secret vs no secrets)",
    AlertCode.WRONG_TOKEN: "the two sides hold different tokens",
    AlertCode.AUTHENTICATION_FAILED: "authentication failed (wrong token, or a man in the middle)",
    AlertCode.CHANNEL_BINDING_MISMATCH:
        "the TLS certificate seen by the owner is not the agent's (a man in the middle relays the connection)",
    AlertCode.KEY_MISMATCH: "a public key does not match its token or its TLS certificate",
    AlertCode.TOKEN_CONSUMED: "the token was already used for a bind and is consumed",
    AlertCode.INTERNAL: "the peer failed internally",
    AlertCode.CLOSED: "the connection closed before the exchange finished",
    AlertCode.NOT_EXPECTED: "the owner expects no VM with this token and key (yet): the VM retries later",
}


class ProtocolError(Exception):
    def __init__(self, code: AlertCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class RemoteProtocolError(ProtocolError):
    """The peer or the link broke the protocol. ``from_peer`` is True when the peer said so in
    an Alert, False when this side detected it."""

    def __init__(self, code: AlertCode, detail: str, *, from_peer: bool = False) -> None:
        super().__init__(code, detail)
        self.from_peer = from_peer


class LocalProtocolError(ProtocolError):
    def __init__(self, detail: str) -> None:
        super().__init__(AlertCode.INTERNAL, detail)
