"""The owner's bind driver: one TLS connection for the exchange, the pin and a status call."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from imprint import crypto, timeouts, tls, tokens
from imprint.owner.client import PinnedClient, ask_on
from imprint.owner.errors import AuthenticationFailed, OwnerError, Unreachable, UsageError
from imprint.owner.home import OwnerHome
from imprint.owner.names import split_address
from imprint.owner.store import ClaimHeld, PinRow, Store
from imprint.owner.tlsfailures import Refused, classify, owner_error
from imprint.protocol import (
    AlertCode,
    Event,
    ExchangeComplete,
    OwnerExchange,
    RemoteProtocolError,
    VmAuthenticated,
)
from imprint.protocol.driver import ExchangeDriver

CONNECT_TIMEOUT = timeouts.seconds("IMPRINT_OWNER_CONNECT_SECONDS", 10.0)
EXCHANGE_DEADLINE = 20.0


@dataclass
class BindResult:
    vm: str
    address: str
    mode: tokens.Mode
    vm_fingerprint: str
    owner_fingerprint: str
    status: dict[str, Any]
    proved: list[str] = field(default_factory=list)


def bind(home: OwnerHome, store: Store, vm: str, address: str, vm_token_text: str | None) -> BindResult:
    """Bind ``vm`` at ``address``; every attempt, good or bad, goes to the audit log. Holds the
    VM's claim throughout (another bind of it, in this process or another, waits for this one);
    the wiped token's pages are checkpointed once, at the end (or at the fleet's end)."""
    with store.deferred_checkpoints():
        try:
            with store.claim(vm):
                return _bind(home, store, vm, address, vm_token_text)  # audited "bound" by confirm_pin
        except ClaimHeld as exc:
            error: OwnerError = Unreachable(f"{exc}; rerun `imprint bind {vm}` once it has ended")
            store.audit(vm, "bind", address, type(error).__name__, str(error))
            raise error from None
        except OwnerError as exc:
            if store.vm_exists(vm):
                store.audit(vm, "bind", address, type(exc).__name__, str(exc))
            raise


def _bound_detail(result: BindResult) -> str:
    return f"VM key {result.vm_fingerprint}, {result.mode.value} mode"


def _bind(home: OwnerHome, store: Store, vm: str, address: str, vm_token_text: str | None) -> BindResult:
    owner_key = home.load_key()
    if not store.vm_exists(vm):
        raise UsageError(f"unknown VM '{vm}': make its token first with `imprint token new {vm} --mode ...`")
    split_address(address)
    pin = store.pin(vm)
    if pin is not None and pin.state == "bound":
        raise UsageError(f"{vm} is already bound to VM key {pin.vm_fingerprint}; use `imprint status {vm}`")
    earlier: OwnerError | None = None
    if pin is not None and pin.state == "pending":
        # An earlier attempt saw the VM prove itself but never verified the pinned channel
        # (a lost confirmation, or the pinned channel failed): the pinned channel decides.
        try:
            status = _pinned_status(home, vm, address, pin.vm_cert)
        except OwnerError as exc:
            earlier = exc
        else:
            result = _result(vm, address, pin.mode, pin.vm_cert, owner_key, status,
                             ["recovered: the key pinned by an earlier exchange answered over mutual TLS"])
            # Also spends the token: the VM consumed it when it pinned us.
            _confirm(store, vm, address, result, pin.vm_cert)
            return result

    row = store.current_token(vm)
    if row is None or row.state != "issued" or row.token_text is None:
        if pin is not None and earlier is not None:
            # The token went to an exchange the VM confirmed; only the pinned channel is missing.
            raise type(earlier)(f"{vm}: the VM confirmed an earlier exchange (VM key {pin.vm_fingerprint}, pending), "
                                f"but the pinned channel failed: {earlier}; rerun `imprint bind {vm} --address "
                                "HOST:PORT` once the VM is reachable")
        raise UsageError(f"{vm} has no unused token: make one with `imprint token new {vm} --mode ...`")
    token = tokens.parse(row.token_text)
    vm_token: tokens.Token | None = None
    if token.mode is tokens.Mode.NOSECRET:
        if not vm_token_text:
            raise UsageError(f"{vm} uses no-secrets mode: pass the VM token the site relayed, --vm-token imprint1v-...")
        try:
            vm_token = tokens.parse(vm_token_text, expect=tokens.TokenKind.VM)
        except tokens.TokenError as exc:
            raise UsageError(f"--vm-token: {exc}") from None
    elif vm_token_text:
        raise UsageError(f"{vm} uses shared-secret mode: --vm-token does not apply")

    attempt = _Attempt(home, store, vm, address, owner_key, token, vm_token,
                       pin if earlier is not None else None, earlier)
    vm_cert, answer = _exchange(attempt)
    try:
        if isinstance(answer, OwnerError):
            raise type(answer)(f"{answer}; the VM confirmed the exchange and its key {attempt.pending_fingerprint} "
                               f"is a pending pin: rerun `imprint bind {vm} --address {address}` to verify the "
                               "pinned channel")
        attempt.proved.append("the VM answered as its pinned owner's control channel, on the connection the "
                              "exchange ran in, with the two keys just exchanged")
        result = _result(vm, address, token.mode, vm_cert, owner_key, answer, attempt.proved)
    except OwnerError:
        # The VM consumed the token: K is worthless now and leaves the owner's record too.
        store.consume_token(vm)
        raise
    _confirm(store, vm, address, result, vm_cert)  # spends the token in the same transaction
    return result


def _confirm(store: Store, vm: str, address: str, result: BindResult, cert: tls.PinnedCert) -> None:
    """The pin this bind wrote becomes bound; under the claim nothing else writes it, so a
    different pin here is a record changed behind the owner's back, refused."""
    if not store.confirm_pin(vm, address, audit_detail=_bound_detail(result), cert=cert):
        raise AuthenticationFailed(f"{vm}: the owner's record holds another pending key than the one this bind "
                                   f"verified ({result.vm_fingerprint}); nothing was confirmed")


@dataclass
class _Attempt:
    """One exchange: what it runs with, and what it has left on this side, so that every
    failure message tells the truth about it: once the VM proved its key, a pending pin exists
    and a rerun of bind recovers. ``proved`` collects what the bind proved, for its result."""

    home: OwnerHome
    store: Store
    vm: str
    address: str
    owner_key: crypto.PrivateKey
    token: tokens.Token
    vm_token: tokens.Token | None  # the VM token the site relayed (no-secrets mode)
    earlier_pin: PinRow | None  # a pending pin from an earlier attempt whose pinned channel failed
    earlier_failure: OwnerError | None
    pending_fingerprint: str | None = None  # set when this exchange recorded its pending pin
    proved: list[str] = field(default_factory=list)

    def outcome(self) -> str:
        if self.pending_fingerprint is not None:
            return (f"the VM proved its key {self.pending_fingerprint} and this side recorded it as a pending pin, "
                    "but the exchange did not finish, so whether the VM pinned this owner is not known here: "
                    f"rerun `imprint bind {self.vm} --address {self.address}` to recover (it asks the VM over the "
                    "pinned channel, and exchanges again only if the VM did not pin this owner)")
        return "nothing was pinned by this side"

    def already_bound(self) -> str:
        head = f"the agent at {self.address} is already bound to an owner and accepts only that owner's certificate"
        if self.earlier_pin is not None:
            return (f"{head}. An earlier attempt left a pending pin for VM key {self.earlier_pin.vm_fingerprint}, "
                    f"but the pinned channel to it failed ({self.earlier_failure}): if this is that VM and it "
                    "pinned this owner, rerun bind once the pinned channel works; otherwise the token is consumed "
                    "(or this is not your VM)")
        return f"{head}: this token is consumed (or this is not your VM). Nothing was pinned by this side."


def _exchange(attempt: _Attempt) -> tuple[tls.PinnedCert, dict[str, Any] | OwnerError]:
    """Connect, run the exchange, record the pending pin; once the VM confirmed, its certificate
    and its answer to ``GET /v1/status`` on the same connection (or why there is none)."""
    address, vm, token, vm_token = attempt.address, attempt.vm, attempt.token, attempt.vm_token
    host, port = split_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise owner_error(exc, address, "connecting") from None
    try:
        try:
            sock = tls.owner_bind_context().wrap_socket(raw)
        except (ssl.SSLError, OSError) as exc:
            raise owner_error(exc, address, "TLS 1.3 handshake") from None
        with sock:
            seen = tls.peer_certificate(sock)
            session = OwnerExchange(owner_key=attempt.owner_key, owner_cert=attempt.home.cert_der(), token=token,
                                    seen_server_cert=seen, vm_token=vm_token)
            seen_spki = session.seen_spki
            if not seen_spki:
                try:
                    crypto.certificate_spki(seen)
                except crypto.CryptoError as exc:
                    raise AuthenticationFailed(f"the TLS certificate at {address} is unusable: {exc}") from None
                raise AuthenticationFailed(f"the TLS certificate at {address} is unusable")
            if vm_token is not None and not crypto.digests_equal(crypto.sha256(seen_spki), vm_token.payload):
                raise AuthenticationFailed(
                    f"the TLS key at {address} ({crypto.fingerprint(seen_spki)}) does not match the VM token: "
                    "a man in the middle, another VM at this address, or the wrong VM token; nothing was pinned"
                )
            vm_cert = tls.PinnedCert.with_spki(seen, seen_spki)

            def handle(event: Event) -> None:
                if isinstance(event, VmAuthenticated):
                    if not attempt.store.pin_pending(vm, vm_cert, event.vm_key.fingerprint, token.mode, address):
                        raise UsageError(f"{vm} was bound by another bind while this one ran; nothing was "
                                         "pinned by this one")
                    attempt.pending_fingerprint = event.vm_key.fingerprint
                    attempt.proved.append(_vm_proof_text(token.mode, event.vm_key))
                elif isinstance(event, ExchangeComplete):
                    attempt.proved.append("the VM verified this owner's key and signature, pinned it, "
                                          "and consumed the token")

            ExchangeDriver(session, handle).run(sock, time.monotonic() + EXCHANGE_DEADLINE)
            try:
                answer: dict[str, Any] | OwnerError = ask_on(sock, "GET", "/v1/status", address)
            except OwnerError as exc:
                answer = exc
            return vm_cert, answer
    except RemoteProtocolError as exc:
        if exc.code is AlertCode.CLOSED and not exc.from_peer:
            raise Unreachable(f"the connection to {address} closed mid-exchange without a reason; "
                              f"{attempt.outcome()}") from None
        raise AuthenticationFailed(_explain(exc, address, attempt)) from None
    except TimeoutError:
        raise Unreachable(f"the agent at {address} did not answer within {EXCHANGE_DEADLINE:.0f} s; "
                          f"{attempt.outcome()}") from None
    except OSError as exc:  # ssl.SSLError included
        failure = classify(exc)
        if failure.refused is Refused.OURS and "certificate required" in failure.reason:
            raise AuthenticationFailed(attempt.already_bound()) from None
        error = owner_error(exc, address, "the exchange")
        raise type(error)(f"{error}; {attempt.outcome()}") from None
    finally:
        with contextlib.suppress(OSError):
            raw.close()


def _vm_proof_text(mode: tokens.Mode, key: crypto.PublicKey) -> str:
    if mode is tokens.Mode.SHARED:
        return (f"the VM knows K (its MAC over the transcript verifies) and holds key {key.fingerprint}, "
                "the key of the TLS certificate this connection showed")
    return (f"the VM key {key.fingerprint} hashes to the VM token relayed by the site, is the key of the TLS "
            "certificate this connection showed, and signed the transcript")


def _explain(exc: RemoteProtocolError, address: str, attempt: _Attempt) -> str:
    if exc.from_peer:
        head = f"the agent at {address} refused the exchange ({exc.code.name}): {exc.detail}"
    else:
        head = f"the peer at {address} failed authentication ({exc.code.name}): {exc.detail}"
    if exc.code in (AlertCode.AUTHENTICATION_FAILED, AlertCode.CHANNEL_BINDING_MISMATCH, AlertCode.KEY_MISMATCH):
        hint = f"possible man in the middle, or the wrong token; {attempt.outcome()}"
    elif exc.code is AlertCode.WRONG_TOKEN:
        hint = "the VM was booted with a different token; give the site the current one"
    elif exc.code is AlertCode.TOKEN_CONSUMED:
        hint = "the token is consumed; the VM is bound"
    else:
        hint = f"the exchange did not complete; {attempt.outcome()}"
    return f"{head} — {hint}"


def _pinned_status(home: OwnerHome, vm: str, address: str, vm_cert: tls.PinnedCert) -> dict[str, Any]:
    client = PinnedClient(home, vm, vm_cert, address)  # no session counters: the pin is not bound yet
    try:
        return client.get("/v1/status")
    finally:
        client.close()


def _result(vm: str, address: str, mode: tokens.Mode, vm_cert: tls.PinnedCert, owner_key: crypto.PrivateKey,
            status: dict[str, Any], proved: list[str]) -> BindResult:
    vm_fp = vm_cert.fingerprint
    if status.get("vm_fingerprint") != vm_fp or status.get("owner_fingerprint") != owner_key.public.fingerprint:
        raise AuthenticationFailed(
            f"the pinned channel to {address} reports VM {status.get('vm_fingerprint')} / owner "
            f"{status.get('owner_fingerprint')}, not the keys just exchanged"
        )
    return BindResult(vm=vm, address=address, mode=mode, vm_fingerprint=vm_fp,
                      owner_fingerprint=owner_key.public.fingerprint, status=status, proved=proved)
