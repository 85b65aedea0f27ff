"""What an error message may not contain: the secret, in any form a careless message would carry."""

from __future__ import annotations


def echoed_forms(secret: str | bytes) -> list[str]:
    """The text of ``secret`` as a message could quote it. A str is itself. Bytes are every
    decoding a message could have made of them (UTF-8 with undecodable bytes replaced or
    escaped, Latin-1), and its repr (b'...'); ``str(b"...")`` alone would be only the repr, so
    an assertion on it could not fail for a body that was decoded and echoed."""
    if isinstance(secret, str):
        return [secret] if secret else []
    if not secret:
        return []
    forms = {secret.decode("utf-8", "replace"), secret.decode("utf-8", "backslashreplace"),
             secret.decode("latin-1"), repr(secret)}
    return sorted(forms)


def assert_not_echoed(secret: str | bytes, message: str) -> None:
    """No form of a non-empty ``secret`` appears in ``message`` (an empty one cannot be echoed)."""
    for form in echoed_forms(secret):
        assert form not in message, f"{form!r} echoed in: {message}"
