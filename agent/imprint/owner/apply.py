"""Applying a profile to a bound VM over the pinned channel: the owner's half of the backends.

A profile is a TOML file; each top-level table names a backend (``imprint.backends`` in the VM)
and configures it::

    [ssh]
    users = [{name = "alice", authorized_keys = ["ssh-ed25519 AAAA... alice@x"], sudo = false}]
    host_certificate = true     # sign the VM's host keys with the owner's SSH CA
    trusted_user_ca = false     # trust the owner's SSH CA for user certificates

Each table names a backend found through the entry-point group ``imprint.backends`` (the same
:class:`imprint.backends.plugin.Backend` the agent loads); this module names none. A backend
with an owner half turns its table into the config the agent gets (``prepare``, which runs
before anything reaches the VM, so ``bind --profile`` refuses a bad profile before it spends the
token) and reviews each answer (``review``), which may ask for another round, up to the rounds
the backend declares: ssh's first round brings the VM's host keys back, the owner writes them
to its known_hosts and signs them, and the second round installs the certificates. Every config
is checked against the backend's schema before it is sent. A table that names no backend
installed here goes to the agent as it is (the VM may have one the owner has not).
Every round is one ``POST /v1/apply``; a round carries only the backends that asked for it.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from imprint import backends
from imprint.backends.plugin import Backend, OwnerHalf
from imprint.boundedio import InputError, read_file
from imprint.owner.client import PinnedClient
from imprint.owner.errors import OwnerError, Unreachable, UsageError
from imprint.owner.home import OwnerHome
from imprint.owner.store import Store

MAX_ROUNDS = 3  # the most any backend may declare (a bound on one apply's requests)
MAX_PROFILE = 4 << 20  # a profile may inline a cloud-config document (1 MiB) and certificates
APPLY_TIMEOUT = 300.0  # a backend may generate keys or create users; the agent runs them in turn


@dataclass
class ApplyContext:
    home: OwnerHome
    store: Store
    vm: str
    address: str   # the agent's HOST:PORT
    # What the backends' command-line options gave (imprint.backends.plugin.OwnerCli.apply_options),
    # e.g. ssh's {"ssh_host": ..., "ssh_port": ...}.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Review:
    follow_up: dict[str, Any] | None = None  # the config of one more round, if any
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """One backend's result over all rounds, with what the owner did for it."""

    ok: bool = True
    changed: bool = False
    summaries: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    owner: list[str] = field(default_factory=list)
    owner_data: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0

    @property
    def summary(self) -> str:
        """The last round's summary says where things ended; a failure's reason is kept."""
        return self.summaries[-1] if self.summaries else ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "changed": self.changed, "summary": self.summary, "summaries": self.summaries,
                "data": self.data,
                "changes": self.changes, "warnings": self.warnings, "owner": self.owner,
                "owner_data": self.owner_data, "rounds": self.rounds}


@dataclass
class ApplyReport:
    vm: str
    address: str
    results: dict[str, Outcome]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.results.values())

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "address": self.address, "ok": self.ok,
                "results": {name: o.to_json() for name, o in self.results.items()}}

    def lines(self) -> list[str]:
        out = [f"applied the profile to {self.vm} at {self.address} over the pinned channel"]
        for name, o in self.results.items():
            state = ("ok, changed" if o.changed else "ok, unchanged") if o.ok else "FAILED"
            out.append(f"  {name}: {state} — {o.summary or '-'}")
            out += [f"      owner: {note}" for note in o.owner]
            out += [f"      warning: {w}" for w in o.warnings]
        return out

    def audit_detail(self) -> str:
        parts = [f"{name} {'ok' if o.ok else 'failed'}{' (changed)' if o.changed else ''}"
                 + ("" if o.ok else f": {o.summary[:300]}") for name, o in self.results.items()]
        return "; ".join(parts)


def load_profile(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = read_file(path, MAX_PROFILE, follow_links=True)  # a FIFO or /dev/zero: refused, not read forever
        if data is None:
            raise UsageError(f"profile {path} does not exist")
        profile = tomllib.loads(data.decode())
    except InputError as exc:
        raise UsageError(f"profile: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"profile {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"profile {path} is not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively; a profile is a few flat tables.
        raise UsageError(f"profile {path} nests arrays or tables too deeply") from None
    return check_profile(profile, f"profile {path}")


def check_profile(profile: object, what: str = "the profile") -> dict[str, dict[str, Any]]:
    """``profile`` (a file's parsed TOML, or a program's mapping: imprint.owner.Owner.apply) as
    plain JSON data, each top-level key a backend's table; UsageError naming what is wrong."""
    if not isinstance(profile, Mapping):
        raise UsageError(f"{what} is a mapping of backend names to tables, not a {type(profile).__name__}")
    if not profile:
        raise UsageError(f"{what} names no backend (expected tables such as [ssh])")
    for name, section in profile.items():
        if not isinstance(name, str):
            raise UsageError(f"{what}: a backend's name is a string, not {type(name).__name__}")
        if not isinstance(section, Mapping):
            raise UsageError(f"{what}: '{name}' must be a table ([{name}]), not a {type(section).__name__}")
    try:
        # What the agent gets is JSON: anything else (a date, a set, bytes) is refused here, and
        # the copy shares nothing with the caller's objects.
        text = json.dumps(profile, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} holds a value JSON cannot carry: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what} nests arrays or tables too deeply") from None
    if len(text) > MAX_PROFILE:
        raise UsageError(f"{what} is larger than {MAX_PROFILE >> 20} MiB")
    return cast(dict[str, dict[str, Any]], json.loads(text))


def _backend(name: str) -> Backend | None:
    try:
        return backends.find(name)
    except backends.BackendError as exc:
        raise UsageError(str(exc)) from None


def _owner_half(backend: Backend | None) -> OwnerHalf | None:
    return backend.owner() if backend is not None and backend.owner is not None else None


def _checked(backend: Backend | None, config: dict[str, Any]) -> dict[str, Any]:
    """The config as the agent will check it: refused here first, before it is sent."""
    if backend is not None:
        try:
            backends.check_config(backend, config)
        except backends.BackendError as exc:
            raise UsageError(str(exc)) from None
    return config


def prepare(ctx: ApplyContext, profile: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first round's configs; a UsageError for anything wrong in the profile."""
    configs: dict[str, dict[str, Any]] = {}
    for name, section in profile.items():
        try:
            backend = _backend(name)
            side = _owner_half(backend)
            configs[name] = _checked(backend, side.prepare(ctx, section) if side else dict(section))
        except UsageError as exc:
            raise UsageError(f"profile [{name}]: {exc}") from None
    return configs


def run(ctx: ApplyContext, client: PinnedClient, profile: dict[str, dict[str, Any]],
        first: dict[str, dict[str, Any]]) -> ApplyReport:
    """Send the rounds; an agent that cannot be reached raises, a failing backend does not."""
    outcomes = {name: Outcome() for name in first}
    found = {name: _backend(name) for name in first}
    pending = first
    round_no = 0
    while pending:  # each backend stops at the rounds it declares
        round_no += 1
        reply = client.post("/v1/apply", {"backends": pending}, timeout=APPLY_TIMEOUT)
        results = reply.get("results")
        if not isinstance(results, dict):
            raise Unreachable(f"the agent at {ctx.address} answered /v1/apply without results")
        following: dict[str, dict[str, Any]] = {}
        for name in pending:
            outcome = outcomes[name]
            outcome.rounds = round_no
            result = results.get(name)
            if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
                outcome.ok = False
                outcome.summaries.append("the agent returned no result for this backend")
                continue
            _merge(outcome, result)
            if not result["ok"]:
                continue
            backend = found[name]
            side = _owner_half(backend)
            if side is None:
                continue
            rounds = min(backend.rounds, MAX_ROUNDS) if backend is not None else 1
            try:
                review = side.review(ctx, profile[name], result, round_no)
                follow_up = None if review.follow_up is None else _checked(backend, review.follow_up)
            except OwnerError as exc:
                outcome.ok = False
                outcome.summaries.append(f"owner side: {exc}")
                continue
            outcome.owner += review.notes
            outcome.owner_data.update(review.data)
            if follow_up is not None:
                if round_no >= rounds:
                    outcome.ok = False
                    outcome.summaries.append(f"still unfinished after {rounds} rounds")
                else:
                    following[name] = follow_up
        pending = following
    return ApplyReport(vm=ctx.vm, address=ctx.address, results=outcomes)


def _merge(outcome: Outcome, result: dict[str, Any]) -> None:
    outcome.ok = outcome.ok and bool(result["ok"])
    outcome.changed = outcome.changed or bool(result.get("changed"))
    summary = result.get("summary")
    if isinstance(summary, str) and summary:
        outcome.summaries.append(summary)
    if isinstance(result.get("data"), dict):
        outcome.data.update(result["data"])
    for key in ("changes", "warnings"):
        items = result.get(key)
        if isinstance(items, list):
            getattr(outcome, key).extend(str(item) for item in items)


def apply_profile(ctx: ApplyContext, client: PinnedClient, profile: dict[str, dict[str, Any]],
                  first: dict[str, dict[str, Any]] | None = None) -> ApplyReport:
    """Prepare (unless done already), run, and audit."""
    if first is None:
        first = prepare(ctx, profile)
    try:
        report = run(ctx, client, profile, first)
    except OwnerError as exc:
        ctx.store.audit(ctx.vm, "apply", ctx.address, type(exc).__name__, str(exc))
        raise
    ctx.store.audit(ctx.vm, "apply", ctx.address, "ok" if report.ok else "failed", report.audit_detail())
    return report
