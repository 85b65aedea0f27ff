"""Binding many VMs at once: the requests of ``imprint bind --from`` and ``Owner.bind_many``, and
the scheduler that runs them.

Input is a sequence of JSON objects, one VM each: JSON lines, or the (pretty-printed) records
``imprint-site boot`` prints, one after the other. A line names its VM (``name``), where its
agent listens (``address``, or a boot record's ``agent_address``) and, in no-secrets mode, the
VM token the site relayed back (``vm_token``). The whole input is checked before anything is
bound: a malformed line refuses the run (naming the line and the field) and binds nothing.

The scheduler binds with ``parallel`` workers. One VM's failure is that VM's outcome and never
stops the others; a VM already bound is reported as such and not bound again (so a run that
met unreachable VMs is retried by running it again). :meth:`FleetRun.stop` (Ctrl-C, SIGTERM)
starts no new bind and lets those under way end (each within its own deadline): every VM is then
bound or untouched, never half-bound, and the rest are reported ``not-started``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

from imprint.owner.errors import OwnerError, UsageError
from imprint.owner.names import split_address, valid_vm_name

MAX_INPUT = 64 << 20      # 64 MiB: 100,000 VMs of generous lines
MAX_REQUESTS = 100_000
MAX_TOKEN_TEXT = 256      # a VM token is 70-odd characters; the bind parses it strictly
MAX_PROBLEMS_SHOWN = 10
INTERRUPTED = 130

# Which failure a fleet's exit code reports when VMs failed in different ways: a failed
# authentication (a possible attack) outranks a backend's failure, which outranks bad input,
# which outranks an unreachable VM (the most likely to pass when the run is repeated).
SEVERITY = (0, 4, 2, 5, 3)

Outcome = Literal["bound", "already-bound", "failed", "not-started"]


@dataclass(frozen=True)
class FleetRequest:
    name: str
    address: str
    vm_token: str | None = None
    source: str = ""  # where it was read: "line 3" (for messages)


@dataclass(frozen=True)
class FleetResult:
    name: str
    address: str
    outcome: Outcome
    exit_code: int
    seconds: float
    error: str | None = None
    kind: str | None = None
    vm_fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"vm": self.name, "address": self.address, "outcome": self.outcome,
                                "exit_code": self.exit_code, "seconds": round(self.seconds, 4)}
        if self.vm_fingerprint is not None:
            data["vm_fingerprint"] = self.vm_fingerprint
        if self.error is not None:
            data["error"] = self.error
            data["kind"] = self.kind
        return data


@dataclass(frozen=True)
class FleetSummary:
    results: tuple[FleetResult, ...]
    seconds: float
    interrupted: bool

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED
        codes = [r.exit_code for r in self.results if r.outcome == "failed"]
        return max(codes, key=_severity, default=0)

    def to_json(self) -> dict[str, Any]:
        return {"summary": {"vms": len(self.results), "bound": self.count("bound"),
                            "already_bound": self.count("already-bound"), "failed": self.count("failed"),
                            "not_started": self.count("not-started"), "seconds": round(self.seconds, 3),
                            "interrupted": self.interrupted, "exit_code": self.exit_code}}


def _severity(code: int) -> int:
    return SEVERITY.index(code) if code in SEVERITY else len(SEVERITY)  # an unforeseen code: worst


# -- the input ---------------------------------------------------------------------------------


def read_requests(text: str, *, name: str | None = None, source: str = "--from") -> list[FleetRequest]:
    """The requests in ``text``; ``name`` names a record that carries none (``{n}`` in it is
    the record's 1-based number, required when several records carry no name)."""
    if len(text) > MAX_INPUT:
        raise UsageError(f"{source}: more than {MAX_INPUT >> 20} MiB of input")
    records = _json_values(text, source)
    unnamed = sum(1 for _, value in records if isinstance(value, dict) and "name" not in value)
    if name is not None and unnamed > 1 and "{n}" not in name:
        raise UsageError(f"{source}: {unnamed} records carry no name; --name needs {{n}} (their number) "
                         "to name each one")
    problems: list[str] = []
    requests: list[FleetRequest] = []
    seen: dict[str, str] = {}
    for number, (where, value) in enumerate(records, start=1):
        try:
            request = request_from(value, where, name.replace("{n}", str(number)) if name is not None else None)
        except UsageError as exc:
            problems.append(str(exc))
            continue
        if request.name in seen:
            problems.append(f"{where}: VM {request.name} is also on {seen[request.name]}")
            continue
        seen[request.name] = where
        requests.append(request)
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        shown = problems[:MAX_PROBLEMS_SHOWN] + ([f"... and {more} more"] if more > 0 else [])
        raise UsageError(f"{source}: nothing was bound; " + "; ".join(shown))
    if not requests:
        raise UsageError(f"{source}: no VM to bind (the input is empty)")
    return requests


def _json_values(text: str, source: str) -> list[tuple[str, Any]]:
    """Every JSON value in ``text``, each with the line it starts on."""
    decoder = json.JSONDecoder()
    values: list[tuple[str, Any]] = []
    position, line = 0, 1
    while True:
        start = position
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        line += text.count("\n", start, position)
        if position == len(text):
            return values
        if len(values) == MAX_REQUESTS:
            raise UsageError(f"{source}: more than {MAX_REQUESTS} records")
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}: line {exc.lineno}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise UsageError(f"{source}: line {line}: JSON nested too deeply") from None
        values.append((f"line {line}", value))
        line += text.count("\n", position, end)
        position = end


def request_from(value: Any, where: str, default_name: str | None = None) -> FleetRequest:
    """One record (``{"name", "address", "vm_token"?}``, or a boot record's ``agent_address``) as
    a request; UsageError naming ``where`` and the field."""
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: a record is a JSON object, not {type(value).__name__}")
    name = value.get("name", default_name)
    if name is None:
        raise UsageError(f"{where}: no name (give the record a \"name\", or --name)")
    if not isinstance(name, str):
        raise UsageError(f"{where}: name is not a string")
    _naming(where, valid_vm_name, name)
    address = value.get("address", value.get("agent_address"))
    if not isinstance(address, str):
        raise UsageError(f"{where}: VM {name}: address is missing or not a string (HOST:PORT)")
    _naming(f"{where}: VM {name}", split_address, address)
    vm_token = value.get("vm_token")
    if vm_token is not None and (not isinstance(vm_token, str) or len(vm_token) > MAX_TOKEN_TEXT
                                 or not vm_token.isascii() or not vm_token.isprintable()):
        raise UsageError(f"{where}: VM {name}: vm_token is not a VM token's text")
    return FleetRequest(name=name, address=address, vm_token=vm_token, source=where)


def _naming(where: str, check: Callable[[str], object], value: str) -> None:
    """``check(value)``, its UsageError prefixed with ``where``."""
    try:
        check(value)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def refuse_duplicates(requests: Sequence[FleetRequest]) -> None:
    seen: dict[str, str] = {}
    for request in requests:
        if request.name in seen:
            raise UsageError(f"{request.source}: VM {request.name} is also {seen[request.name]}")
        seen[request.name] = request.source


# -- the run -----------------------------------------------------------------------------------


BindOne = Callable[[FleetRequest], str]  # binds one VM, returns its key's fingerprint; raises OwnerError
IsBound = Callable[[str], bool]
OnResult = Callable[[FleetResult], None]


@dataclass
class FleetRun:
    """One run of the scheduler; :meth:`stop` may be called from a signal handler or any thread."""

    bind_one: BindOne
    is_bound: IsBound
    parallel: int
    on_result: OnResult = field(default=lambda result: None)
    stop_event: threading.Event | None = None  # set from outside: the same as stop()
    _stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise UsageError(f"--parallel {self.parallel}: at least 1")

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set() or (self.stop_event is not None and self.stop_event.is_set())

    def run(self, requests: Sequence[FleetRequest]) -> FleetSummary:
        started = time.monotonic()
        results: dict[str, FleetResult] = {}
        pending = iter(requests)
        running: dict[Future[FleetResult], FleetRequest] = {}
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="imprint-bind") as pool:
            while True:
                while not self.stopping and len(running) < self.parallel:
                    request = next(pending, None)
                    if request is None:
                        break
                    running[pool.submit(self._one, request)] = request
                if not running:
                    break
                done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    request = running.pop(future)
                    result = future.result()
                    results[request.name] = result
                    self.on_result(result)
        for request in requests:
            if request.name not in results:
                results[request.name] = FleetResult(request.name, request.address, "not-started",
                                                    INTERRUPTED, 0.0)
        ordered = tuple(results[r.name] for r in requests)
        return FleetSummary(ordered, time.monotonic() - started, interrupted=self.stopping)

    def _one(self, request: FleetRequest) -> FleetResult:
        started = time.monotonic()

        def result(outcome: Outcome, code: int, **extra: Any) -> FleetResult:
            return FleetResult(request.name, request.address, outcome, code, time.monotonic() - started, **extra)

        try:
            if self.is_bound(request.name):
                return result("already-bound", 0)
            return result("bound", 0, vm_fingerprint=self.bind_one(request))
        except OwnerError as exc:
            if self._bound_by_someone_else(request.name, exc):
                return result("already-bound", 0)
            return result("failed", exc.exit_code, error=str(exc), kind=type(exc).__name__)

    def _bound_by_someone_else(self, name: str, exc: OwnerError) -> bool:
        """A bind that lost a race with another process binding the same VM (the store refuses
        the second pin): the VM is bound, which is what was asked."""
        try:
            return self.is_bound(name)
        except OwnerError:
            return False


def default_parallel(cpus: int | None) -> int:
    """Binds wait on the network and the VM more than on this CPU: a few per core."""
    return max(4, min(64, 8 * (cpus or 1)))

