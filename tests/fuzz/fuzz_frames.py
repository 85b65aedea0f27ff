"""The frame reassembler and the message decoder (FrameBuffer, decode_body) on arbitrary bytes.

The first byte chooses the chunk size the stream arrives in; the rest is the stream, and is also
decoded whole as one message body. Only RemoteProtocolError may leave, and whatever decodes is
canonical: it re-encodes to exactly the bytes it came from.
"""

from __future__ import annotations

from imprint.protocol.errors import AlertCode, RemoteProtocolError
from imprint.protocol.messages import MAX_BODY, FrameBuffer, decode_body, encode_body

_BODY_REFUSALS = (AlertCode.MALFORMED, AlertCode.VERSION_UNSUPPORTED)


def _decode(body: bytes) -> None:
    try:
        message = decode_body(body)
    except RemoteProtocolError as exc:
        assert exc.code in _BODY_REFUSALS and not exc.from_peer, exc.code
        return
    assert encode_body(message) == body, "a second encoding of one message"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, stream = data[0] + 1, data[1:]
    _decode(stream)
    buffer = FrameBuffer()
    try:
        for start in range(0, len(stream), size):
            buffer.feed(stream[start : start + size])
            while (body := buffer.next_body()) is not None:
                assert len(body) <= MAX_BODY
                _decode(body)
    except RemoteProtocolError as exc:
        assert exc.code is AlertCode.MALFORMED, exc.code
        return
    assert buffer.pending < 2 + MAX_BODY
