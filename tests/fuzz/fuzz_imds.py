"""The metadata-service client's reading of an answer (imprint.channels.imds), fed without a
network: the input's first byte picks the request answered (IMDSv2 session, EC2 tag, OpenStack
meta_data.json), the rest is the raw HTTP answer as it would arrive on the socket.

Only ChannelBroken may leave, and what the caller retries on (the connection dropped mid-answer:
ConnectionError, IncompleteRead).
"""

from __future__ import annotations

import http.client
import io

from imprint.channels import ChannelBroken, imds

FLAGS = ["-max_len=8192"]
# The answer is parsed by http.client (status line, headers through email's parser, chunks): what
# a hostile service controls, so its parsing is part of what is fuzzed.
INSTRUMENT = ["http", "email"]
REQUESTS = (
    ("PUT", imds.SESSION_PATH, imds.MAX_TOKEN_BODY),
    ("GET", imds.TAG_PATH, imds.MAX_TOKEN_BODY),
    ("GET", imds.OPENSTACK_PATH, imds.MAX_JSON_BODY),
)


class _Answer:
    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self._raw))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    which = data[0] % len(REQUESTS)
    method, path, limit = REQUESTS[which]
    url = "http://169.254.169.254" + path
    try:
        answer = imds.receive(_Answer(data[1:]), method, url, limit)
        assert len(answer.body) <= limit
        if which == 0:
            session = imds.session_from(answer)
            assert session is None or (session.isprintable() and session.isascii())
        elif which == 1:
            imds.tag_from(answer, session="s" if data[0] & 0x80 else None)
        else:
            imds.openstack_from(answer)
    except (ChannelBroken, ConnectionError, http.client.IncompleteRead):
        pass
