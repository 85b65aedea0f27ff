"""The owner as a library: everything `imprint` (owner/cli.py) does, for programs.

    from imprint.owner import Owner, Unreachable

    with Owner("/srv/imprint") as owner:
        owner.init()
        token = owner.new_token("web1", "nosecret")   # hand it to the site with the VM
        ...                                            # the site relays the VM token back
        owner.bind("web1", "10.0.0.5:7443", vm_token=vm_token)
        owner.apply("web1", {"ssh": {"users": [{"name": "alice", "authorized_keys": [key]}]}})
        summary = owner.bind_many([{"name": "web2", "address": "10.0.0.6:7443"}], parallel=16)

``Owner(home)`` opens the owner home the CLI uses (the same directory and store): a program and
the CLI may work on one home at the same time. Results are frozen dataclasses. A failure is one
of the exceptions :mod:`imprint.owner` exports, one class per exit code of the CLI:
:class:`UsageError` (2: bad input, an unknown VM), :class:`AuthenticationFailed` (3: a man in
the middle, a wrong or reused token), :class:`Unreachable` (4), :class:`BackendFailed` (5: a
profile reached the VM and a backend failed there; ``.report`` says which), and their base
:class:`OwnerError` (1: the home or its database cannot be used). Nothing else escapes.

An Owner may be used from several threads at once (``bind_many`` does): each thread gets its
own connection to the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from imprint import tokens
from imprint.owner import fleet
from imprint.owner.errors import ApplyFailed, AuthenticationFailed, OwnerError, UsageError
from imprint.owner.fleet import FleetRequest, FleetResult, FleetSummary
from imprint.owner.home import OwnerHome, default_home
from imprint.owner.names import split_address, valid_vm_name
from imprint.owner.store import AuditRow, PinRow, Store

if TYPE_CHECKING:  # at run time loaded where used: `import imprint.owner` stays light for the CLI
    from imprint.owner.apply import ApplyContext, ApplyReport

BackendFailed = ApplyFailed  # exit 5; the CLI's and the library's name for one class
AuditEntry = AuditRow
Profile = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Identity:
    home: Path
    owner_fingerprint: str
    created: bool
    encrypted: bool = False      # owner.key is encrypted with a passphrase
    encrypted_now: bool = False  # init(passphrase=...) encrypted an existing unencrypted key in place


@dataclass(frozen=True)
class IssuedToken:
    vm: str
    mode: tokens.Mode
    token_id: str
    text: str  # K in shared mode: give it to the site over a confidential channel only


@dataclass(frozen=True)
class Binding:
    vm: str
    address: str
    mode: tokens.Mode
    vm_fingerprint: str
    owner_fingerprint: str
    proved: tuple[str, ...]
    status: Mapping[str, Any]  # what the VM answered over the pinned channel (VM-supplied text)
    applied: ApplyReport | None = None  # bind(profile=...): what the backends did


@dataclass(frozen=True)
class VmStatus:
    vm: str
    address: str
    state: str
    mode: str
    vm_fingerprint: str
    owner_fingerprint: str
    raw: Mapping[str, Any]  # every field the agent sent (VM-supplied: render it before showing it)


@dataclass(frozen=True)
class VmRecord:
    vm: str
    state: str                # "bound", "pending", "unbound", or "cloned"/"rolled-back" (docs/protocol.md §4.7)
    mode: tokens.Mode | None
    token_state: str | None   # the newest token's: "issued", "consumed" or "superseded"
    address: str | None
    vm_fingerprint: str | None


class Owner:
    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = OwnerHome(Path(home).expanduser() if home is not None else default_home())
        self._shared: Store | None = None  # one connection for every thread (Store says why)
        self._lock = threading.Lock()

    # -- lifetime
    def close(self) -> None:
        with self._lock:
            store, self._shared = self._shared, None
        if store is not None:
            with contextlib.suppress(sqlite3.Error):
                store.close()

    def __enter__(self) -> Owner:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _store(self) -> Store:
        with self._lock:
            if self._shared is None:
                with self._errors():
                    self._shared = self.home.store()
            return self._shared

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """What the standard library raises, as the exception the CLI's exit code names."""
        try:
            yield
        except tokens.TokenError as exc:
            raise UsageError(str(exc)) from None
        except sqlite3.Error as exc:
            raise OwnerError(f"the owner database {self.home.db_file} cannot be used: {exc}") from None
        except OSError as exc:
            from imprint import lastresort

            raise OwnerError(lastresort.describe(exc)) from None

    # -- identity and tokens
    def init(self, passphrase: str | bytes | None = None) -> Identity:
        """Create the owner identity once; later calls report the existing one. With
        ``passphrase``, owner.key is encrypted with it (docs/protocol.md §8.3): a new key, or an
        existing unencrypted one in place; an encrypted one is checked against it."""
        secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
        with self._errors():
            key, created = self.home.init(secret)
            now = secret is not None and not created and self.home.protect(secret)
            encrypted = self.home.encrypted
        return Identity(self.home.dir, key.public.fingerprint, created, encrypted, now)

    def unlock(self, passphrase: str | bytes) -> None:
        """Decrypt an encrypted owner.key with ``passphrase`` for this process (else the key is
        decrypted when first needed, with the passphrase from IMPRINT_PASSPHRASE_FILE, the
        systemd credential or the terminal). UsageError if it is wrong."""
        with self._errors():
            self.home.unlock(passphrase.encode() if isinstance(passphrase, str) else passphrase)

    def new_token(self, name: str, mode: tokens.Mode | str) -> str:
        """A token for VM ``name`` (created if new; any earlier unused token is superseded):
        its text, for the site. In shared mode it is K: secret and single-use."""
        return self.issue_token(name, mode).text

    def issue_token(self, name: str, mode: tokens.Mode | str) -> IssuedToken:
        """:meth:`new_token` with its id and mode."""
        valid_vm_name(name)
        mode = _mode(mode)
        with self._errors():
            self.home.load_key()  # the owner identity comes first, in both modes
            store = self._store()
            pin = store.pin(name)
            if pin is not None and pin.state == "bound":
                raise UsageError(f"{name} is already bound to VM key {pin.vm_fingerprint}; a VM binds once")
            token = self.home.new_token(mode)
            text = token.encode()
            store.issue_token(name, mode, token.token_id.hex(), text)
        return IssuedToken(name, mode, token.token_id.hex(), text)

    # -- binding
    def bind(self, name: str, address: str, vm_token: str | None = None, *,
             profile: str | os.PathLike[str] | Profile | None = None,
             options: Mapping[str, Any] | None = None) -> Binding:
        """Run the exchange with the agent at ``address`` and pin its key. With ``profile``,
        the whole profile is checked first (a bad one spends no token) and applied right after;
        a backend that fails there raises :class:`BackendFailed` whose ``binding`` is this bind."""
        from imprint.owner.bind import bind

        valid_vm_name(name)  # the address is checked by the bind (a bad one is audited there)
        store = self._store()
        plan = None
        with self._errors():
            if profile is not None:
                from imprint.owner import apply as applying  # only then: it loads every backend's declaration

                if not store.vm_exists(name):
                    raise UsageError(f"unknown VM '{name}': make its token first with "
                                     f"`imprint token new {name} --mode ...`")
                parsed = _profile(profile)
                ctx = applying.ApplyContext(home=self.home, store=store, vm=name, address=address,
                                            options=dict(options or {}))
                plan = (ctx, parsed, applying.prepare(ctx, parsed))
            result = bind(self.home, store, name, address, vm_token)
        binding = Binding(name, result.address, result.mode, result.vm_fingerprint, result.owner_fingerprint,
                          tuple(result.proved), dict(result.status))
        if plan is None:
            return binding
        ctx, parsed, first = plan
        try:
            report = self._apply(ctx, parsed, first)
        except OwnerError as exc:
            exc.binding = binding  # the VM is bound: the caller must know it though the apply failed
            raise
        return dataclasses.replace(binding, applied=report)

    def give_vm_token(self, name: str, vm_token: str, *, wait: float = 15.0) -> VmRecord:
        """No-secrets mode, for a VM that dials the owner's listener (`imprint serve`): keep the
        VM token the site relayed, so the listener binds the VM when it dials (at once, if it
        is waiting there). Waits up to ``wait`` seconds for that bind when a listener runs;
        returns the VM's record (state "bound" if it bound meanwhile)."""
        from imprint.owner import viaserve

        valid_vm_name(name)
        with self._errors():
            try:
                parsed = tokens.parse(vm_token, expect=tokens.TokenKind.VM)
            except tokens.TokenError as exc:
                raise UsageError(f"--vm-token: {exc}") from None
            store = self._store()
            if not store.vm_exists(name):
                raise UsageError(f"unknown VM '{name}': make its token first with `imprint token new {name} "
                                 "--mode nosecret`")
            row = store.current_token(name)
            pin = store.pin(name)
            if pin is not None and pin.state == "bound":
                raise UsageError(f"{name} is already bound to VM key {pin.vm_fingerprint}; a VM binds once")
            if row is None or row.mode is not tokens.Mode.NOSECRET or row.state != "issued":
                raise UsageError(f"{name} has no unused no-secrets token: make one with `imprint token new {name} "
                                 "--mode nosecret`")
            store.give_dial_vm_token(name, parsed.encode(), parsed.payload.hex())
        listening = viaserve.vm_token_given(self.home.dir)
        deadline = time.monotonic() + (wait if listening else 0.0)
        while True:
            record = next(r for r in self.vms() if r.vm == name)
            if record.state == "bound" or time.monotonic() >= deadline:
                return record
            threading.Event().wait(0.1)  # the listener binds in its own process: its record is the signal

    def bind_many(self, requests: Iterable[FleetRequest | Mapping[str, Any]], *, parallel: int | None = None,
                  on_progress: Callable[[FleetResult], None] | None = None,
                  stop: threading.Event | None = None) -> FleetSummary:
        """Bind every VM of ``requests`` (``{"name", "address", "vm_token"?}`` or FleetRequest),
        ``parallel`` at a time. One VM's failure is its result, not an exception; a VM already
        bound is reported ``already-bound`` and not bound again. ``on_progress`` gets each result
        as it comes, in the calling thread (the binds run in worker threads); setting ``stop``
        starts no new bind, lets those under way end, and reports the rest ``not-started``."""
        checked = [r if isinstance(r, FleetRequest) else fleet.request_from(r, f"request {n}")
                   for n, r in enumerate(requests, start=1)]
        fleet.refuse_duplicates(checked)
        run = fleet.FleetRun(self._bind_one, self._is_bound,
                             parallel=parallel or fleet.default_parallel(os.cpu_count()),
                             on_result=on_progress or (lambda result: None), stop_event=stop)
        store = self._store()
        with self._errors(), store.deferred_checkpoints():  # every bind's wiped token checkpointed at once, at the end
            return run.run(checked)

    def _bind_one(self, request: FleetRequest) -> str:
        return self.bind(request.name, request.address, request.vm_token).vm_fingerprint

    def _is_bound(self, name: str) -> bool:
        with self._errors():
            pin = self._store().pin(name)
        return pin is not None and pin.state == "bound"

    # -- a bound VM
    def status(self, name: str, *, address: str | None = None) -> VmStatus:
        """Ask the VM over the pinned channel; both keys it reports must be the pinned ones
        (else :class:`AuthenticationFailed`). ``address``: where it is now, if it moved."""
        from imprint.owner.client import PinnedClient

        store, pin, where = self._reach(name, address)
        with self._errors():
            client = PinnedClient(self.home, name, pin.vm_cert, where, store)
            try:
                status = client.get("/v1/status")
            except OwnerError as exc:
                store.audit(name, "status", where, type(exc).__name__, str(exc))
                raise
            finally:
                client.close()
            delegation = store.backend_data(name, "delegation")  # this home reaches the VM as a delegate
            owner_fp = str(delegation["owner"]) if delegation else self.home.load_key().public.fingerprint
            if status.get("vm_fingerprint") != pin.vm_fingerprint or status.get("owner_fingerprint") != owner_fp:
                store.audit(name, "status", where, "AuthenticationFailed", "the agent reports other keys than pinned")
                raise AuthenticationFailed(
                    f"the agent at {where} reports VM key {status.get('vm_fingerprint')} and owner key "
                    f"{status.get('owner_fingerprint')}; pinned are {pin.vm_fingerprint} and {owner_fp}")
            if address is not None and address != pin.address:
                store.update_address(name, address)
        return VmStatus(name, client.address, str(status.get("state")), str(status.get("mode")), pin.vm_fingerprint,
                        owner_fp, dict(status))

    def apply(self, name: str, profile: str | os.PathLike[str] | Profile, *, address: str | None = None,
              options: Mapping[str, Any] | None = None) -> ApplyReport:
        """Apply ``profile`` (a TOML file's path, or the mapping it would parse to) over the
        pinned channel. ``options``: what backends' command-line options would give (e.g.
        ssh's ``{"ssh_host": ..., "ssh_port": ...}``). Raises :class:`BackendFailed` (with
        ``.report``) when a backend failed in the VM; the others ran."""
        from imprint.owner import apply as applying

        store, _, where = self._reach(name, address)
        with self._errors():
            ctx = applying.ApplyContext(home=self.home, store=store, vm=name, address=where,
                                        options=dict(options or {}))
            parsed = _profile(profile)
            first = applying.prepare(ctx, parsed)
        return self._apply(ctx, parsed, first)

    def _apply(self, ctx: ApplyContext, profile: dict[str, dict[str, Any]],
               first: dict[str, dict[str, Any]]) -> ApplyReport:
        from imprint.owner.apply import apply_profile
        from imprint.owner.client import PinnedClient

        with self._errors():
            pin = self.bound_pin(ctx.vm)
            client = PinnedClient(self.home, ctx.vm, pin.vm_cert, ctx.address, ctx.store)
            try:
                report = apply_profile(ctx, client, profile, first)
            finally:
                client.close()
        if not report.ok:
            failed = ", ".join(name for name, outcome in report.results.items() if not outcome.ok)
            error = BackendFailed(f"applying the profile to {ctx.vm}: backend {failed} failed in the VM")
            error.report = report
            raise error
        return report

    # -- letting a VM go, or taking one over (owner/handover.py)
    def release(self, name: str, *, wipe: bool = False) -> None:
        """The VM forgets this owner (with ``wipe`` its own key too) and waits for a new token;
        this owner's pin goes, the audit log keeps the history."""
        from imprint.owner import handover
        from imprint.owner.client import PinnedClient

        store, pin, where = self._reach(name, None)
        with self._errors():
            client = PinnedClient(self.home, name, pin.vm_cert, where, store)
            answer = client.post("/v1/release", {"wipe": wipe})
            handover.check_answer(answer, "released", True, name)
            store.drop_pin(name, "release", client.address, f"released VM key {pin.vm_fingerprint}"
                           + (" (the VM wiped its key)" if wipe else ""))

    def transfer(self, name: str, new_owner_cert: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 owner_addresses: list[str] | None = None) -> str:
        """Hand the VM to the owner whose certificate is ``new_owner_cert`` (their owner.crt): the
        VM pins it instead of this owner, in one step over the pinned channel. Writes the handover
        file ``out`` for the new owner's :meth:`import_handover`; returns the new owner's fingerprint."""
        from imprint.owner import handover
        from imprint.owner.client import PinnedClient

        store, pin, where = self._reach(name, None)
        out_path = Path(out)
        with self._errors():
            pem, fingerprint = handover.new_owner_cert(Path(new_owner_cert))
            if fingerprint == self.home.load_key().public.fingerprint:
                raise UsageError("--to names this owner's own certificate")
            if out_path.exists():
                raise UsageError(f"{out_path} exists: the handover file is written to a new file only")
            body: dict[str, Any] = {"owner_cert": pem}
            if owner_addresses:
                body["owner_addresses"] = list(owner_addresses)
            client = PinnedClient(self.home, name, pin.vm_cert, where, store)
            answer = client.post("/v1/transfer", body)
            handover.check_answer(answer, "owner_fingerprint", fingerprint, name)
            handover.Handover(name, pin.vm_cert.pem, pin.address, pin.mode, fingerprint).write(out_path)
            store.drop_pin(name, "transfer", client.address, f"transferred VM key {pin.vm_fingerprint} to owner "
                           f"{fingerprint}")
        return fingerprint

    def grant(self, name: str, to: str, role: str, out: str | os.PathLike[str]) -> str:
        """Let the principal whose certificate is the file ``to`` reach VM ``name`` with its own
        key, as ``role`` (read: status; operator: also apply and ssh; admin: also grant and
        revoke). Writes the grant file ``out`` for their `imprint import`; returns their fingerprint."""
        from imprint.owner import handover
        from imprint.owner.client import PinnedClient

        if role not in ("read", "operator", "admin"):
            raise UsageError(f"role {role[:20]!r}: expected read, operator or admin")
        store, pin, where = self._reach(name, None)
        out_path = Path(out)
        with self._errors():
            pem, fingerprint = handover.principal_cert(to)
            if pem is None:
                raise UsageError("--to: a grant needs the delegate's certificate (their owner.crt), "
                                 "not only a fingerprint")
            if out_path.exists():
                raise UsageError(f"{out_path} exists: the grant file is written to a new file only")
            client = PinnedClient(self.home, name, pin.vm_cert, where, store)
            answer = client.post("/v1/grant", {"cert": pem, "role": role})
            handover.check_answer(answer, "fingerprint", fingerprint, name)
            vm_owner = self._store().backend_data(name, "delegation") or {}
            granted_by = str(vm_owner.get("owner") or self.home.load_key().public.fingerprint)
            handover.Handover(name, pin.vm_cert.pem, pin.address, pin.mode, fingerprint, role, granted_by
                              ).write(out_path)
            store.audit(name, "grant", client.address, role, f"delegate {fingerprint}")
        return fingerprint

    def revoke(self, name: str, principal: str) -> str:
        """Take a grant back (``principal``: the delegate's certificate file or fingerprint):
        the VM refuses that key in the TLS handshake from now on."""
        from imprint.owner import handover
        from imprint.owner.client import PinnedClient

        store, pin, where = self._reach(name, None)
        with self._errors():
            _, fingerprint = handover.principal_cert(principal)
            client = PinnedClient(self.home, name, pin.vm_cert, where, store)
            answer = client.post("/v1/revoke", {"fingerprint": fingerprint})
            handover.check_answer(answer, "fingerprint", fingerprint, name)
            store.audit(name, "revoke", client.address, "revoked", f"delegate {fingerprint}")
        return fingerprint

    def import_handover(self, path: str | os.PathLike[str]) -> VmRecord:
        """Take over a VM another owner transferred to this one (its handover file), or take up
        a grant to reach one as a delegate (its grant file)."""
        from imprint import tls
        from imprint.owner import handover

        with self._errors():
            given = handover.read_handover(Path(path))
            key = self.home.load_key()
            if given.owner_fingerprint != key.public.fingerprint:
                raise UsageError(f"the handover names owner {given.owner_fingerprint}, not this owner "
                                 f"({key.public.fingerprint})")
            cert = tls.PinnedCert.from_pem(given.vm_cert_pem)
            how = (f"transferred to this owner: VM key {cert.fingerprint}" if given.role is None
                   else f"granted to this owner as {given.role}: VM key {cert.fingerprint}")
            if not self._store().adopt_pin(given.vm, cert, cert.fingerprint, given.mode, given.address, how):
                raise UsageError(f"a VM named {given.vm} exists in this home already")
            if given.role is not None:  # a delegate: the VM's status names its owner, not this one
                self._store().set_backend_data(given.vm, "delegation", {"role": given.role, "owner": given.granted_by})
        return next(r for r in self.vms() if r.vm == given.vm)

    def resolve(self, name: str) -> str | None:
        """The owner decided about a VM flagged ``cloned`` or ``rolled-back`` (it destroyed the
        copy, or accepts the restored VM): the flag goes, and the next session's counter is
        taken as the VM's. Returns the flag that was cleared (None: there was none)."""
        valid_vm_name(name)
        with self._errors():
            bound_pin(self._store(), name)
            return self._store().resolve_clone(name, "the owner decided (imprint resolve)")

    def bound_pin(self, name: str) -> PinRow:
        """The pin of bound VM ``name`` (UsageError when unknown or not bound yet)."""
        with self._errors():
            return bound_pin(self._store(), name)

    def _reach(self, name: str, address: str | None) -> tuple[Store, PinRow, str]:
        """A bound VM's store, pin and address (``address`` if it moved, else where it was bound)."""
        valid_vm_name(name)
        if address is not None:
            split_address(address)
        pin = self.bound_pin(name)
        return self._store(), pin, address or pin.address

    # -- the record
    def vms(self) -> list[VmRecord]:
        store = self._store()
        records = []
        with self._errors():
            for name in store.vm_names():
                pin, token = store.pin(name), store.current_token(name)
                flag = store.clone_state(name) if pin else None  # "cloned"/"rolled-back" outranks "bound"
                records.append(VmRecord(
                    vm=name, state=flag or (pin.state if pin else "unbound"),
                    mode=pin.mode if pin else token.mode if token else None,
                    token_state=token.state if token else None,
                    address=pin.address if pin else None, vm_fingerprint=pin.vm_fingerprint if pin else None))
        return records

    def audit(self, name: str | None = None) -> list[AuditEntry]:
        """The append-only log, oldest first (of VM ``name`` only, if given)."""
        with self._errors():
            return self._store().audit_log(name)


def bound_pin(store: Store, name: str) -> PinRow:
    """The pin of bound VM ``name``; UsageError when it is unknown or not bound yet."""
    if not store.vm_exists(name):
        raise UsageError(f"unknown VM '{name}'")
    pin = store.pin(name)
    if pin is None or pin.state != "bound":
        raise UsageError(f"{name} is not bound yet: run `imprint bind {name} --address HOST:PORT`")
    return pin


def _mode(mode: tokens.Mode | str) -> tokens.Mode:
    if isinstance(mode, tokens.Mode):
        return mode
    try:
        return tokens.Mode(mode)
    except ValueError:
        raise UsageError(f"mode {str(mode)[:40]!r}: expected one of "
                         f"{', '.join(m.value for m in tokens.Mode)}") from None


def _profile(profile: str | os.PathLike[str] | Profile) -> dict[str, dict[str, Any]]:
    from imprint.owner import apply as applying

    if isinstance(profile, str | os.PathLike):
        return applying.load_profile(Path(profile))
    return applying.check_profile(profile, "the profile")
