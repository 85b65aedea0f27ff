"""The owner's state machine (OwnerExchange) fed arbitrary bytes in each state it can be in, in
both directions: dial-in (the constructor, START .. DONE) and dial-out (``listening``,
AWAIT_VM_DIAL .. DONE).

Only RemoteProtocolError may leave receive_data, and a refusing side is FAILED with exactly one
Alert to send. A listening owner answers VmDialled as the listener does (_exchange.listener_accept:
accept with the fixed tokens of the bind it names, else abort), so the fuzzer's own VmDial leads
on to the later states; an abort leaves exactly its Alert to send. Beyond the sans-IO rule: the
fuzzer holds no private key, so a VmAuthenticated or ExchangeComplete naming any key but the
genuine VM's would be a forged proof, and dial-out that key must be the one VmDial's certificate
carries.
"""

from __future__ import annotations

from imprint.protocol.errors import AlertCode, RemoteProtocolError
from imprint.protocol.exchange import ExchangeComplete, State, VmAuthenticated, VmDialled
from imprint.protocol.messages import Alert, OwnerHello

from tests.fuzz import _exchange as ex


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, point, size, close, stream = ex.parse_selector(data, ex.OWNER_STATES)
    owner = ex.owner_at(mode, point)
    try:
        for chunk in [*ex.chunks(stream, size), *([b""] if close else [])]:
            for event in owner.receive_data(chunk):
                if isinstance(event, VmDialled):
                    assert point.direction is ex.OUT and owner.dial == event, point
                    if not ex.listener_accept(owner, event):
                        (alert,) = ex.decoded(owner.data_to_send())
                        assert isinstance(alert, Alert) and alert.code == int(AlertCode.NOT_EXPECTED), alert
                        assert owner.state is State.FAILED
                        return
                    (hello,) = ex.decoded(owner.data_to_send())
                    assert isinstance(hello, OwnerHello) and owner.state is State.AWAIT_VM_HELLO, hello
                    continue
                assert isinstance(event, VmAuthenticated | ExchangeComplete), event
                key = event.vm_key if isinstance(event, VmAuthenticated) else event.peer_key
                assert key == ex.VM_KEY.public, "a VM key the fuzzer cannot sign with"
                if point.direction is ex.OUT:
                    assert owner.dial is not None and key.digest == owner.dial.vm_key_sha256
            ex.decoded(owner.data_to_send())
    except RemoteProtocolError as exc:
        ex.check_refusal(owner, exc)
