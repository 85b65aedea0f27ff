"""The owner's state machine (OwnerExchange) fed arbitrary bytes in each state it can be in.

Only RemoteProtocolError may leave receive_data, and a refusing side is FAILED with exactly one
Alert to send. Beyond the sans-IO rule: the fuzzer holds no private key, so a VmAuthenticated or
ExchangeComplete naming any key but the genuine VM's would be a forged proof.
"""

from __future__ import annotations

from imprint.protocol.errors import RemoteProtocolError
from imprint.protocol.exchange import ExchangeComplete, VmAuthenticated

from tests.fuzz import _exchange as ex


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, state, size, close, stream = ex.parse_selector(data, ex.OWNER_STATES)
    owner = ex.owner_at(mode, state)
    try:
        for chunk in [*ex.chunks(stream, size), *([b""] if close else [])]:
            for event in owner.receive_data(chunk):
                assert isinstance(event, VmAuthenticated | ExchangeComplete), event
                key = event.vm_key if isinstance(event, VmAuthenticated) else event.peer_key
                assert key == ex.VM_KEY.public, "a VM key the fuzzer cannot sign with"
            ex.decoded(owner.data_to_send())
    except RemoteProtocolError as exc:
        ex.check_refusal(owner, exc)
