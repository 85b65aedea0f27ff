"""The harness's own assertions can fail: a helper that cannot fail would pass any test using it."""

from __future__ import annotations

import pytest

from tests.helpers.text import assert_not_echoed


@pytest.mark.parametrize(("secret", "message"), [
    ("imprint1s-abc", "bad token imprint1s-abc"),
    (b"\xff\xfeimprint", "not ASCII text: \ufffd\ufffdimprint"),  # decoded with errors="replace"
    (b"\xff\xfeimprint", "not ASCII text: \\xff\\xfeimprint"),  # escaped
    (b"\xff\xfeimprint", "not ASCII text: \xff\xfeimprint"),  # decoded as Latin-1
    (b"\xff\xfeimprint", "not ASCII text: b'\\xff\\xfeimprint'"),  # its repr
    (b"a" * 50, "5000 bytes: " + "a" * 60),
])
def test_an_echoed_secret_is_caught_in_every_form(secret: str | bytes, message: str) -> None:
    with pytest.raises(AssertionError, match="echoed"):
        assert_not_echoed(secret, message)


def test_a_message_without_the_secret_passes() -> None:
    assert_not_echoed(b"\xff\xfeimprint", "http://127.0.0.1/latest/meta-data/tags/instance/imprint-token: not ASCII")
    assert_not_echoed("", "an empty body cannot be echoed")
