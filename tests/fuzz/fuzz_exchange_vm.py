"""The VM's state machine (VmExchange) fed arbitrary bytes in each state it can be in, in both
directions: dial-in (the constructor, AWAIT_OWNER_HELLO .. DONE) and dial-out (``dialling``,
START .. DONE).

Only RemoteProtocolError may leave receive_data, and a refusing side is FAILED with exactly one
Alert to send. Beyond the sans-IO rule: the fuzzer holds no private key, so an OwnerAuthenticated
or ExchangeComplete naming any key but the genuine owner's would be a forged proof.
"""

from __future__ import annotations

from imprint.protocol.errors import RemoteProtocolError
from imprint.protocol.exchange import OwnerAuthenticated

from tests.fuzz import _exchange as ex


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, point, size, close, stream = ex.parse_selector(data, ex.VM_STATES)
    vm = ex.vm_at(mode, point)
    try:
        for chunk in [*ex.chunks(stream, size), *([b""] if close else [])]:
            for event in vm.receive_data(chunk):
                assert isinstance(event, OwnerAuthenticated), event
                assert event.owner_key == ex.OWNER_KEY.public, "an owner key the fuzzer cannot sign with"
                done = vm.confirm()  # what the agent does once the pin is stored
                assert done.peer_key == ex.OWNER_KEY.public
            ex.decoded(vm.data_to_send())
    except RemoteProtocolError as exc:
        ex.check_refusal(vm, exc)
