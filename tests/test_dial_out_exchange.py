"""The exchange with the roles reversed (the VM dials the owner's listener), on the helpers of
tests/helpers/exchange.py: the genuine run, and the local API of the listener and the dialling
VM (``accept()``, ``initiate()``), whose misuse is a LocalProtocolError that changes nothing.
The attacks, in both directions, are in tests/test_adversary.py.
"""

from __future__ import annotations

import pytest
from imprint import crypto
from imprint.protocol.errors import AlertCode, LocalProtocolError, RemoteProtocolError
from imprint.protocol.exchange import (
    ExchangeComplete,
    OwnerAuthenticated,
    OwnerExchange,
    State,
    VmAuthenticated,
    VmDialled,
    VmExchange,
)
from imprint.protocol.messages import MAX_ADDRESS_BYTES, Alert, MessageType, OwnerHello, VmDial, encode_frame
from imprint.tokens import Mode, Token, TokenKind

from tests.helpers.exchange import (
    OWNER_ADDRESS,
    decoded,
    dial_out_drivers,
    owner_listening_session,
    owner_session,
    split_frames,
    vm_dialling_session,
    vm_session,
)
from tests.helpers.keys import NOSECRET, OWNER_CERT, OWNER_KEY, VM_CERT, VM_KEY, VM_TOKEN, K

MODES = (Mode.SHARED, Mode.NOSECRET)


def tokens_of(mode: Mode) -> tuple[Token, Token | None]:
    return (K, None) if mode is Mode.SHARED else (NOSECRET, VM_TOKEN)


@pytest.mark.parametrize("mode", MODES)
def test_the_genuine_dial_out_exchange_completes_through_the_driver(mode: Mode) -> None:
    owner, vm = owner_listening_session(), vm_dialling_session(mode)
    owner_driver, vm_driver = dial_out_drivers(owner, vm, mode)
    assert owner_driver.opening() == b""  # the listener waits for VmDial
    dial = vm_driver.opening()
    assert [type(m) for m in decoded(dial)] == [VmDial]
    step = owner_driver.feed(dial)
    assert step.events == [VmDialled(mode, tokens_of(mode)[0].token_id, VM_KEY.public.digest, VM_CERT,
                                     OWNER_ADDRESS)]
    assert [type(m) for m in decoded(step.to_send)] == [OwnerHello]  # the handler accepted
    flight = vm_driver.feed(step.to_send).to_send
    proof = owner_driver.feed(flight)
    assert proof.events == [VmAuthenticated(VM_KEY.public)]
    confirm = vm_driver.feed(proof.to_send)
    assert confirm.events == [OwnerAuthenticated(OWNER_KEY.public)]
    assert owner_driver.feed(confirm.to_send).events == [ExchangeComplete(VM_KEY.public)]
    assert owner.state is State.DONE and vm.state is State.DONE
    assert vm.peer_cert == OWNER_CERT and owner.peer_key == VM_KEY.public
    assert owner.dial is not None and owner.dial.vm_cert == VM_CERT


def listener_at_accept(mode: Mode) -> OwnerExchange:
    owner = owner_listening_session()
    (event,) = owner.receive_data(vm_dialling_session(mode).initiate())
    assert isinstance(event, VmDialled)
    assert owner.state is State.AWAIT_LOCAL_ACCEPT
    return owner


OTHER_K = Token(TokenKind.SHARED, bytes(range(32)))
OTHER_VM_TOKEN = Token(TokenKind.VM, crypto.sha256(b"another VM key"))


@pytest.mark.parametrize(("mode", "case"), [
    (Mode.SHARED, "another_k"), (Mode.SHARED, "the_nosecret_token"), (Mode.SHARED, "a_vm_token"),
    (Mode.NOSECRET, "the_shared_token"), (Mode.NOSECRET, "no_vm_token"), (Mode.NOSECRET, "another_vm_token"),
    (Mode.NOSECRET, "nosecret_token_of_another_key"),
])
def test_accept_with_what_vm_dial_did_not_name_is_local_misuse_that_changes_nothing(mode: Mode, case: str) -> None:
    owner = listener_at_accept(mode)
    args: tuple[Token, Token | None] = {
        "another_k": (OTHER_K, None),
        "the_nosecret_token": (NOSECRET, VM_TOKEN),
        "a_vm_token": (VM_TOKEN, None),
        "the_shared_token": (K, None),
        "no_vm_token": (NOSECRET, None),
        "another_vm_token": (NOSECRET, OTHER_VM_TOKEN),
        "nosecret_token_of_another_key": (Token(TokenKind.NOSECRET, crypto.sha256(b"x")), VM_TOKEN),
    }[case]
    with pytest.raises(LocalProtocolError) as info:
        owner.accept(*args)
    assert not isinstance(info.value, RemoteProtocolError) and info.value.code is AlertCode.INTERNAL
    assert owner.state is State.AWAIT_LOCAL_ACCEPT and owner.data_to_send() == b""
    owner.accept(*tokens_of(mode))  # the right answer still works
    assert [type(m) for m in decoded(owner.data_to_send())] == [OwnerHello]
    assert owner.state is State.AWAIT_VM_HELLO


@pytest.mark.parametrize("mode", MODES)
def test_local_calls_in_the_wrong_state_are_misuse(mode: Mode) -> None:
    listener = owner_listening_session()
    with pytest.raises(LocalProtocolError, match=r"accept\(\) in state await-vm-dial"):
        listener.accept(*tokens_of(mode))
    with pytest.raises(LocalProtocolError, match=r"initiate\(\) in state await-vm-dial"):
        listener.initiate()
    assert listener.state is State.AWAIT_VM_DIAL and listener.data_to_send() == b""
    dialling = owner_session(mode)
    with pytest.raises(LocalProtocolError, match=r"accept\(\) in state start"):
        dialling.accept(*tokens_of(mode))
    accepted = listener_at_accept(mode)
    accepted.accept(*tokens_of(mode))
    accepted.data_to_send()
    with pytest.raises(LocalProtocolError, match=r"accept\(\) in state await-vm-hello"):
        accepted.accept(*tokens_of(mode))
    assert accepted.data_to_send() == b""
    vm = vm_dialling_session(mode)
    vm.initiate()
    with pytest.raises(LocalProtocolError, match=r"initiate\(\) in state await-owner-hello"):
        vm.initiate()
    assert vm.state is State.AWAIT_OWNER_HELLO and vm.data_to_send() == b""
    with pytest.raises(LocalProtocolError, match=r"initiate\(\) in state await-owner-hello"):
        vm_session(mode).initiate()  # a dial-in VM never speaks first
    with pytest.raises(LocalProtocolError, match=r"confirm\(\) in state start"):
        vm_dialling_session(mode).confirm()


@pytest.mark.parametrize("mode", MODES)
def test_vm_dial_sent_to_a_dial_in_vm_is_unexpected(mode: Mode) -> None:
    vm = vm_session(mode)
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(vm_dialling_session(mode).initiate())
    assert info.value.code is AlertCode.UNEXPECTED_MESSAGE and vm.state is State.FAILED


@pytest.mark.parametrize("mode", MODES)
def test_owner_hello_before_vm_dial_is_unexpected(mode: Mode) -> None:
    listener = owner_listening_session()
    with pytest.raises(RemoteProtocolError) as info:
        listener.receive_data(owner_session(mode).initiate())
    assert info.value.code is AlertCode.UNEXPECTED_MESSAGE and listener.state is State.FAILED
    assert [(type(m), getattr(m, "code", None)) for m in decoded(listener.data_to_send())] == [
        (Alert, AlertCode.UNEXPECTED_MESSAGE)]


@pytest.mark.parametrize("mode", MODES)
def test_data_to_a_dialling_vm_before_it_dialled_is_unexpected(mode: Mode) -> None:
    vm = vm_dialling_session(mode)
    with pytest.raises(RemoteProtocolError) as info:
        vm.receive_data(owner_session(mode).initiate())
    assert info.value.code is AlertCode.UNEXPECTED_MESSAGE and vm.state is State.FAILED


@pytest.mark.parametrize("mode", MODES)
def test_vm_dial_and_the_next_message_in_one_read_is_unexpected(mode: Mode) -> None:
    """The listener must answer VmDial with accept() before anything else may arrive."""
    vm = vm_dialling_session(mode)
    dial = vm.initiate()
    listener = owner_listening_session()
    with pytest.raises(RemoteProtocolError) as info:
        listener.receive_data(dial + dial)
    assert info.value.code is AlertCode.UNEXPECTED_MESSAGE and listener.state is State.FAILED


@pytest.mark.parametrize("address", ["", "x" * (MAX_ADDRESS_BYTES + 1), "owner\n.example:1", "ówner.example:1",
                                     "a\x00:1"])
def test_the_dialling_vm_refuses_an_address_it_could_not_send(address: str) -> None:
    with pytest.raises(LocalProtocolError):
        vm_dialling_session(Mode.SHARED, address=address)


def test_constructors_of_the_dial_out_sessions_refuse_inconsistent_arguments() -> None:
    with pytest.raises(LocalProtocolError):  # the listener's certificate carries another key
        OwnerExchange.listening(owner_key=OWNER_KEY, owner_cert=VM_CERT)
    with pytest.raises(LocalProtocolError):  # the VM's certificate carries another key
        VmExchange.dialling(vm_key=VM_KEY, token=K, own_cert=OWNER_CERT, server_cert=OWNER_CERT,
                            owner_address=OWNER_ADDRESS)
    with pytest.raises(LocalProtocolError):  # the VM is given its own token
        VmExchange.dialling(vm_key=VM_KEY, token=VM_TOKEN, own_cert=VM_CERT, server_cert=OWNER_CERT,
                            owner_address=OWNER_ADDRESS)


@pytest.mark.parametrize("mode", MODES)
def test_vm_dial_names_what_the_vm_holds_and_saw(mode: Mode) -> None:
    (dial,) = decoded(vm_dialling_session(mode).initiate())
    assert dial == VmDial(mode=1 if mode is Mode.SHARED else 2, token_id=tokens_of(mode)[0].token_id,
                          vm_cert=VM_CERT, owner_address=OWNER_ADDRESS.encode(),
                          seen_server_cert_sha256=crypto.sha256(OWNER_CERT))
    assert split_frames(encode_frame(dial))[0][3] == MessageType.VM_DIAL


@pytest.mark.parametrize("mode", MODES)
def test_the_longest_owner_address_the_parser_accepts_fits_vm_dial(mode: Mode) -> None:
    """A 253-character name and a five-digit port (259 characters) is an address a boot channel
    may carry: the dialling VM must be able to send it, not fail on its own limit."""
    from imprint import owneraddr

    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    address = str(owneraddr.parse(f"{name}:65535"))
    assert len(address) == 259
    owner, vm = owner_listening_session(), vm_dialling_session(mode, address=address)
    owner_driver, vm_driver = dial_out_drivers(owner, vm, mode)
    data, side = vm_driver.opening(), "owner"
    while not (owner_driver.finished and vm_driver.finished):
        step = (owner_driver if side == "owner" else vm_driver).feed(data)
        assert step.error is None, step.error
        data, side = step.to_send, ("vm" if side == "owner" else "owner")
    assert owner.state is State.DONE and vm.state is State.DONE and owner.dial is not None
    assert owner.dial.owner_address == address
