"""The metadata disk's header and reply area (imprint.metadisk), as the agent and the site read them.

Only MetadiskError may leave. An accepted header's reply area lies after the header block and
within MAX_REPLY_END (so nobody allocates or writes gigabytes on its word), and a reply written
into it reads back as written.
"""

from __future__ import annotations

from imprint import metadisk


def test_one_input(data: bytes) -> None:
    try:
        header = metadisk.decode_header(data)
    except metadisk.MetadiskError:
        return
    assert metadisk.REPLY_OFFSET <= header.reply_offset
    assert header.reply_offset + header.reply_size <= metadisk.MAX_REPLY_END
    assert len(header.token) <= metadisk.MAX_TOKEN
    area = data[header.reply_offset : header.reply_offset + header.reply_size]
    try:
        metadisk.decode_reply(area)
    except metadisk.MetadiskError:
        pass
    line = "IMPRINT-VM-TOKEN imprint1v-fuzz\n"
    written = metadisk.encode_reply(line, header.reply_size)
    assert len(written) == header.reply_size
    assert metadisk.decode_reply(written) == line
