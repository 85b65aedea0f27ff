"""What a failed connection to an agent means: not authenticated (exit 3) or unreachable (exit 4).

The one classification for the bind driver and the pinned client (both ssl sockets).
Only a verification failure is an authentication failure: our check of the agent's certificate
failed (not the pinned VM certificate, or not its fingerprint), or the agent refused ours with
a TLS alert. Everything else (refused, reset, closed, timed out, a peer that does not speak
TLS 1.3) is the transport: a flood, a crash, a firewall or the wrong port look like that. Calling
those "possible man in the middle" would teach the owner to shrug at exit 3, which must keep
meaning that a key other than the pinned one answered.
"""

from __future__ import annotations

import enum
import http.client
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from imprint.owner.errors import AuthenticationFailed, OwnerError, Unreachable
from imprint.tls import PinMismatch


class Refused(enum.Enum):
    NOTHING = "nothing"  # the transport failed before or after any certificate was judged
    THEIRS = "theirs"  # this side refused the agent's certificate: not the pinned VM key
    OURS = "ours"  # the agent refused this owner's certificate (or that none was sent)


@dataclass(frozen=True)
class Failure:
    refused: Refused
    reason: str  # a few words that name the cause

    @property
    def authentication(self) -> bool:
        return self.refused is not Refused.NOTHING


# The TLS alerts (OpenSSL's reason names end with these) with which a peer refuses the
# certificate it was shown, or the proof of its key.
_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                       "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED",
                       "ACCESS_DENIED", "DECRYPT_ERROR")
_CLOSED = ("UNEXPECTED_EOF_WHILE_READING", "EOF occurred in violation of protocol")


def classify(exc: BaseException) -> Failure:
    """The meaning of ``exc``, raised by ssl or socket (or wrapping theirs)."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = getattr(e, "verify_message", None) or "verification failed"
            return Failure(Refused.THEIRS, f"its certificate is not the pinned one ({detail})")
        if isinstance(e, PinMismatch):
            return Failure(Refused.THEIRS, str(e))
    for e in chain:
        reason = _ssl_reason(e)
        if reason and "ALERT" in reason and reason.endswith(_CERTIFICATE_ALERTS):
            return Failure(Refused.OURS, f"TLS alert {_words(reason.split('ALERT_', 1)[-1])}")
    return Failure(Refused.NOTHING, _transport_reason(chain))


def owner_error(exc: BaseException, address: str, doing: str) -> OwnerError:
    """The error to report for ``exc`` while ``doing`` something with the agent at ``address``
    (``doing`` starts the message: "TLS 1.3 handshake", "GET /v1/status over the pinned channel")."""
    failure = classify(exc)
    if failure.refused is Refused.THEIRS:
        return AuthenticationFailed(
            f"{doing}: the agent at {address} did not prove the pinned VM key ({failure.reason}): "
            "possible man in the middle, or another VM at this address")
    if failure.refused is Refused.OURS:
        return AuthenticationFailed(
            f"{doing}: the agent at {address} refused this owner's key ({failure.reason}): it is bound to "
            "another owner, or this is not your VM (possible man in the middle)")
    return Unreachable(f"{doing}: cannot reach the agent at {address}: {failure.reason}; check the address, "
                       "the port forward and that the VM has booted")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, a ``reason`` attribute and exceptions among
    the arguments, outermost first."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
        todo += [i for i in inner if isinstance(i, BaseException)]


def _transport_reason(chain: list[BaseException]) -> str:
    for e in reversed(chain):  # the innermost is the most specific
        text = _known_reason(e)
        if text:
            return text
    first = str(chain[0]).splitlines()[0] if str(chain[0]) else type(chain[0]).__name__
    return first[:200]


def _known_reason(e: BaseException) -> str | None:
    if isinstance(e, ssl.SSLError):
        reason = _ssl_reason(e)
        if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError) or reason in _CLOSED or _CLOSED[1] in str(e):
            return "the connection closed during TLS"
        if "ALERT_" in reason:
            return f"the peer ended TLS with the alert {_words(reason.split('ALERT_', 1)[1])}"
        if reason:  # what the peer sent is not TLS 1.3 as this side speaks it
            return f"the peer does not speak TLS 1.3 ({_words(reason)}): is an imprint agent listening?"
        return None
    if isinstance(e, http.client.RemoteDisconnected):  # before ConnectionResetError: a subclass
        return "the connection closed before the agent answered"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return "connection reset"
    if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host: {e.strerror}"
    if isinstance(e, OSError) and e.strerror:
        return str(e.strerror).lower()
    return None


def _words(reason: str) -> str:
    return reason.lower().replace("_", " ")


def _ssl_reason(e: BaseException) -> str:
    """OpenSSL's reason name (set by the ssl module on the errors it raises), or ""."""
    reason = getattr(e, "reason", None) if isinstance(e, ssl.SSLError) else None
    return reason if isinstance(reason, str) else ""
