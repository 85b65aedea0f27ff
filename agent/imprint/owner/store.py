"""The owner's record: one SQLite database in the imprint home (0700; files 0600).

Tables: vms, tokens (K lives here until its bind, then it is wiped), pins (the VM certificate the
owner pins, pending until the VM confirms), backend_data (what a backend's owner half keeps per
VM, one JSON object per VM and backend: ssh's host and port for `imprint ssh`), and audit: an
append-only log of every bind attempt and its outcome, enforced by triggers that refuse UPDATE
and DELETE. A home made before backend_data had ssh_targets; opening it moves those rows.

K leaves the file, not only the row: secure_delete zeroes the bytes a wipe frees, and a WAL
checkpoint after a wipe copies the wiped pages over the old ones and truncates the -wal file,
where the page images that still held K would otherwise stay until some later checkpoint. A
single bind or token checkpoints at once; a fleet (``deferred_checkpoints``) once at its end.

Concurrency (many binds in one process, several processes on one home): every write is one
``BEGIN IMMEDIATE`` transaction, serialised in a process by the Store's lock and between
processes by SQLite's lock with a busy timeout; a bind first
takes the VM's row in ``claims`` (:meth:`Store.claim`), so two binds of one VM never run at
once, and a pin is written only by the claim's holder, never over a bound pin. A claim is a
lock, not a record: it is committed without an fsync of its own (``synchronous = NORMAL``:
a power loss may forget it, with the process that held it) and a dead holder's claim is taken
over. Every other commit is durable (``synchronous = FULL``) when it returns.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from imprint.faults import crashpoint
from imprint.fsatomic import pid_alive
from imprint.safetext import ascii_number
from imprint.tls import PinnedCert
from imprint.tokens import Mode

T = TypeVar("T")
P = ParamSpec("P")

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    vm          TEXT NOT NULL REFERENCES vms(name),
    mode        TEXT NOT NULL CHECK (mode IN ('shared', 'nosecret')),
    token_id    TEXT NOT NULL,
    token_text  TEXT,              -- NULL once consumed or superseded when it carried K
    state       TEXT NOT NULL CHECK (state IN ('issued', 'consumed', 'superseded')),
    created_at  REAL NOT NULL,
    closed_at   REAL
);
CREATE TABLE IF NOT EXISTS pins (
    vm              TEXT PRIMARY KEY REFERENCES vms(name),
    vm_cert_pem     TEXT NOT NULL,
    vm_fingerprint  TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'bound')),
    mode            TEXT NOT NULL,
    address         TEXT NOT NULL,
    pinned_at       REAL NOT NULL,
    session_counter  INTEGER NOT NULL DEFAULT 0,  -- the VM's session counter this owner confirmed
    session_proposed INTEGER NOT NULL DEFAULT 0,  -- the highest this owner proposed
    clone_state      TEXT CHECK (clone_state IN ('rolled-back', 'cloned'))  -- NULL: none seen
);
CREATE TABLE IF NOT EXISTS audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    vm       TEXT NOT NULL,
    action   TEXT NOT NULL,
    address  TEXT,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS backend_data (
    vm          TEXT NOT NULL REFERENCES vms(name),
    backend     TEXT NOT NULL,
    data        TEXT NOT NULL,     -- a JSON object
    updated_at  REAL NOT NULL,
    PRIMARY KEY (vm, backend)
);
CREATE TABLE IF NOT EXISTS claims (
    vm      TEXT PRIMARY KEY,  -- no foreign key: a bind of an unknown VM claims, then is refused
    holder  TEXT NOT NULL,     -- pid:start-time:thread of the bind under way
    since   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dial_vm_tokens (
    vm          TEXT PRIMARY KEY REFERENCES vms(name),
    vm_token    TEXT NOT NULL,     -- the VM token the site relayed, for a bind when the VM dials in
    payload     TEXT NOT NULL,     -- its payload (hex): how the listener finds the VM that dialled
    given_at    REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@dataclass(frozen=True)
class TokenRow:
    id: int
    vm: str
    mode: Mode
    token_id: str
    token_text: str | None
    state: str
    created_at: float


@dataclass(frozen=True)
class PinRow:
    vm: str
    vm_cert: PinnedCert  # kept as PEM in the table
    vm_fingerprint: str
    state: str
    mode: Mode
    address: str
    pinned_at: float


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: float
    vm: str
    action: str
    address: str | None
    outcome: str
    detail: str


CLAIM_WAIT = 60.0   # the longest a bind waits for another bind of the same VM (theirs is bounded)
CLAIM_POLL = 0.05


class ClaimHeld(Exception):
    """Another bind of the VM is under way and did not end within the wait."""


def _locked(method: Callable[P, T]) -> Callable[P, T]:
    """``method`` under its Store's lock (see Store)."""
    @functools.wraps(method)
    def locked(*args: P.args, **kwargs: P.kwargs) -> T:
        with args[0]._lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)
    return locked


class Store:
    """The record, for every thread of a process: one connection, each method (and each
    transaction, whole) under a lock that every Store of this database in the process shares.
    A fleet's threads share one Store: one connection reads what the last commit wrote without
    reloading pages another connection changed, and writers queue on the lock, woken the moment
    the one before commits (on SQLite's lock alone they would poll its busy handler, which sleeps
    up to 100 ms between tries). Other processes on the home meet at SQLite's lock, with the
    busy timeout."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._lock = _lock_of(path)
        self._deferring = 0  # binds under way that checkpoint at their (or their fleet's) end
        self._wiped = False  # a wipe is committed but not checkpointed yet (see flush_wipes)
        with self._lock:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
            self._db.execute("PRAGMA foreign_keys = ON")
            # K is wiped by overwriting its row; secure_delete zeroes the freed bytes in the file too.
            self._db.execute("PRAGMA secure_delete = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._heal()

    @contextmanager
    def deferred_checkpoints(self) -> Iterator[None]:
        """Wipes inside are checkpointed once, when the last such block of this Store ends (a
        bind's; a fleet's around all of its binds)."""
        with self._lock:
            self._deferring += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferring -= 1
                if self._deferring == 0:
                    self.flush_wipes()

    def _migrate(self) -> None:
        self._migrate_session_columns()
        self._migrate_ssh_targets()

    def _migrate_session_columns(self) -> None:
        """A pins table from before clone detection gains its three columns (each ALTER is atomic)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(pins)")}
        for column, decl in (("session_counter", "INTEGER NOT NULL DEFAULT 0"),
                             ("session_proposed", "INTEGER NOT NULL DEFAULT 0"),
                             ("clone_state", "TEXT CHECK (clone_state IN ('rolled-back', 'cloned'))")):
            if column not in have:
                self._db.execute(f"ALTER TABLE pins ADD COLUMN {column} {decl}")

    def _migrate_ssh_targets(self) -> None:
        """ssh_targets (vm, host, port, updated_at), from before backend_data, becomes ssh's rows
        there, in one transaction: a crash leaves the old table or the new rows, never neither."""
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ssh_targets'"
                            ).fetchone() is None:
            return
        with self.transaction() as db:
            for vm, host, port, updated_at in db.execute("SELECT vm, host, port, updated_at FROM ssh_targets"
                                                         ).fetchall():
                db.execute("INSERT OR IGNORE INTO backend_data (vm, backend, data, updated_at) VALUES (?, 'ssh', ?, ?)",
                           (vm, json.dumps({"host": host, "port": port}), updated_at))
            db.execute("DROP TABLE ssh_targets")

    def _heal(self) -> None:
        """A bound VM's tokens are spent, whatever an earlier version left: before the pin's
        confirmation consumed them, a bind recovered from a lost VmConfirm left K in clear here."""
        stale = self._db.execute(
            "SELECT 1 FROM tokens WHERE state = 'issued' "
            "AND vm IN (SELECT vm FROM pins WHERE state = 'bound') LIMIT 1").fetchone()
        if stale is None:
            return  # the usual case: no write, no lock taken on open
        with self.transaction() as db:
            db.execute("UPDATE tokens SET state = 'consumed', token_text = NULL, closed_at = ? "
                       "WHERE state = 'issued' AND vm IN (SELECT vm FROM pins WHERE state = 'bound')",
                       (time.time(),))
        self._checkpoint()

    def _checkpoint(self) -> None:
        """After a wipe: move every page into the database file and empty the -wal (see the
        module's comment), now or, inside ``deferred_checkpoints``, at the end of the outermost one."""
        self._wiped = True
        if not self._deferring:
            self.flush_wipes()

    @_locked
    def flush_wipes(self) -> None:
        """The checkpoint a wipe asked for, if any. Another process reading at this moment holds
        the -wal; its own close or the next wipe empties it then."""
        if self._wiped:
            self.checkpoint()

    @_locked
    def checkpoint(self) -> None:
        """Every page into the database file, the -wal emptied: for the wipes of any connection
        (a fleet's threads defer theirs to one of these at its end)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self._wiped = False

    @_locked
    def close(self) -> None:
        try:
            self.flush_wipes()
        finally:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            crashpoint("store.commit.before")
            self._db.execute("COMMIT")
            crashpoint("store.commit.after")

    # -- VMs and tokens
    @_locked
    def vm_exists(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone() is not None

    @_locked
    def vm_names(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT name FROM vms ORDER BY name")]

    @_locked
    def issue_token(self, vm: str, mode: Mode, token_id: str, token_text: str) -> None:
        """A new token for ``vm``, superseding (and wiping) any issued one; audited with it."""
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO vms (name, created_at) VALUES (?, ?)", (vm, now))
            db.execute(
                "UPDATE tokens SET state = 'superseded', token_text = NULL, closed_at = ? "
                "WHERE vm = ? AND state = 'issued'",
                (now, vm),
            )
            db.execute(
                "INSERT INTO tokens (vm, mode, token_id, token_text, state, created_at) "
                "VALUES (?, ?, ?, ?, 'issued', ?)",
                (vm, mode.value, token_id, token_text, now),
            )
            _insert_audit(db, vm, "token", None, "issued", f"{mode.value} token id {token_id}")
        self._checkpoint()  # a superseded K was wiped

    @_locked
    def current_token(self, vm: str) -> TokenRow | None:
        row = self._db.execute(
            "SELECT id, vm, mode, token_id, token_text, state, created_at FROM tokens "
            "WHERE vm = ? ORDER BY id DESC LIMIT 1",
            (vm,),
        ).fetchone()
        if row is None:
            return None
        id_, vm_, mode, token_id, token_text, state, created_at = row
        return TokenRow(id_, vm_, Mode(mode), token_id, token_text, state, created_at)

    # -- pins
    @_locked
    def pin(self, vm: str) -> PinRow | None:
        row = self._db.execute(
            "SELECT vm, vm_cert_pem, vm_fingerprint, state, mode, address, pinned_at FROM pins WHERE vm = ?",
            (vm,),
        ).fetchone()
        if row is None:
            return None
        vm_, cert_pem, fingerprint, state, mode, address, pinned_at = row
        try:
            cert = PinnedCert.from_pem(cert_pem)
        except (ssl.SSLError, TypeError) as exc:  # a record damaged or written by something else
            raise sqlite3.DatabaseError(f"the pin of {vm} is not a PEM certificate ({exc})") from None
        return PinRow(vm_, cert, fingerprint, state, Mode(mode), address, pinned_at)

    @_locked
    def pin_pending(self, vm: str, cert: PinnedCert, fingerprint: str, mode: Mode, address: str) -> bool:
        """The key the VM just proved, pending its confirmation; False (nothing written) when the
        VM is bound already: a pin, once bound, is never replaced."""
        with self.transaction() as db:
            written = db.execute(
                "INSERT INTO pins (vm, vm_cert_pem, vm_fingerprint, state, mode, address, pinned_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (vm) DO UPDATE SET "
                "vm_cert_pem = excluded.vm_cert_pem, vm_fingerprint = excluded.vm_fingerprint, state = 'pending', "
                "mode = excluded.mode, address = excluded.address, pinned_at = excluded.pinned_at "
                "WHERE pins.state = 'pending'",
                (vm, cert.pem, fingerprint, mode.value, address, time.time()),
            ).rowcount
        return written == 1

    # -- one bind of a VM at a time
    @contextmanager
    def claim(self, vm: str, *, wait: float = CLAIM_WAIT) -> Iterator[None]:
        """Hold ``vm``'s claim for the block: waits (up to ``wait`` s, then ClaimHeld) while
        another live bind holds it, takes over a dead holder's."""
        me = _holder()
        deadline = time.monotonic() + wait
        while True:
            other = self._try_claim(vm, me)
            if other is None:
                break
            if time.monotonic() >= deadline:
                raise ClaimHeld(f"another bind of {vm} is under way (process {other.split(':')[0]}) "
                                f"and did not end within {wait:.0f} s")
            time.sleep(CLAIM_POLL)  # the holder's bind is bounded by its deadlines; SQLite has no wait-for-row
        try:
            yield
        finally:
            self._with_lock_only(lambda db: db.execute("DELETE FROM claims WHERE vm = ? AND holder = ?", (vm, me)))

    def _try_claim(self, vm: str, me: str) -> str | None:
        """None when ``me`` holds the claim now; else the live holder."""
        def take(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT holder FROM claims WHERE vm = ?", (vm,)).fetchone()
            if row is not None and row[0] != me and _holder_alive(row[0]):
                return str(row[0])
            db.execute("INSERT OR REPLACE INTO claims (vm, holder, since) VALUES (?, ?, ?)", (vm, me, time.time()))
            return None

        return self._with_lock_only(take)

    @_locked
    def _with_lock_only(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in one transaction committed without an fsync: for claims only (a lock that a
        power loss may forget, with its holder)."""
        self._db.execute("PRAGMA synchronous = NORMAL")
        try:
            with self.transaction() as db:
                return work(db)
        finally:
            self._db.execute("PRAGMA synchronous = FULL")

    @_locked
    def consume_token(self, vm: str) -> None:
        """The VM confirmed the exchange: its token (with K, if any) is used up."""
        with self.transaction() as db:
            _consume_tokens(db, vm)
        self._checkpoint()

    @_locked
    def confirm_pin(self, vm: str, address: str | None = None, *, audit_detail: str | None = None,
                    cert: PinnedCert | None = None) -> bool:
        """The pinned channel answered (at ``address``, if given) with the exchanged
        keys: the pin is final, and every token issued for the VM is spent with it, in the same
        transaction. A VM binds once, and the pinned channel proves this one did: a bind recovered
        after a lost VmConfirm never saw the confirmation that otherwise consumes the token, and
        K must not outlive the bind."""
        with self.transaction() as db:
            confirmed = db.execute(
                "UPDATE pins SET state = 'bound', pinned_at = ?, address = COALESCE(?, address) "
                "WHERE vm = ? AND (? IS NULL OR vm_cert_pem = ?)",
                (time.time(), address, vm, cert.pem if cert else None, cert.pem if cert else None)).rowcount
            if confirmed != 1:
                return False  # not the pin this bind wrote: nothing changes
            _consume_tokens(db, vm)
            if audit_detail is not None:  # in the same transaction: a kill -9 cannot lose the "bound" entry
                _insert_audit(db, vm, "bind", address, "bound", audit_detail)
        self._checkpoint()
        return True

    # -- binds of VMs that dial the owner's listener
    @_locked
    def issued_token_by_id(self, token_id: str, mode: Mode) -> TokenRow | None:
        """The newest issued token of ``mode`` with ``token_id`` (hex): in shared mode it names
        one VM's K; a no-secrets id is the owner key's and names no VM (see dial_vm_token)."""
        row = self._db.execute(
            "SELECT id, vm, mode, token_id, token_text, state, created_at FROM tokens "
            "WHERE token_id = ? AND mode = ? AND state = 'issued' ORDER BY id DESC LIMIT 1",
            (token_id, mode.value)).fetchone()
        if row is None:
            return None
        id_, vm_, mode_, token_id_, token_text, state, created_at = row
        return TokenRow(id_, vm_, Mode(mode_), token_id_, token_text, state, created_at)

    @_locked
    def give_dial_vm_token(self, vm: str, vm_token: str, payload_hex: str) -> None:
        """The VM token the site relayed for ``vm``, kept until the VM dials the listener."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO dial_vm_tokens (vm, vm_token, payload, given_at) VALUES (?, ?, ?, ?)",
                       (vm, vm_token, payload_hex, time.time()))
            _insert_audit(db, vm, "vm-token", None, "given", f"VM token {payload_hex[:16]} for a bind when it dials")

    @_locked
    def dial_vm_token(self, payload_hex: str) -> tuple[str, str] | None:
        """(VM name, VM token text) given for the VM key whose hash is ``payload_hex``."""
        row = self._db.execute("SELECT vm, vm_token FROM dial_vm_tokens WHERE payload = ? ORDER BY given_at DESC "
                               "LIMIT 1", (payload_hex,)).fetchone()
        return None if row is None else (row[0], row[1])

    @_locked
    def pins(self) -> list[PinRow]:
        """Every pin, pending or bound."""
        names = [row[0] for row in self._db.execute("SELECT vm FROM pins ORDER BY vm")]
        return [pin for pin in (self.pin(name) for name in names) if pin is not None]  # the lock is re-entrant

    # -- clone and rollback detection (docs/protocol.md §4.7)
    @_locked
    def propose_session(self, vm: str) -> tuple[int, int]:
        """(confirmed, proposed) for the next pinned session of ``vm``: the proposal is above
        every earlier one, written before it is sent, so two owner processes never propose the
        same counter and a lost answer is never below what the VM may have."""
        with self.transaction() as db:
            row = db.execute("SELECT session_counter, session_proposed FROM pins WHERE vm = ?", (vm,)).fetchone()
            if row is None:
                raise sqlite3.DatabaseError(f"{vm} has no pin")
            confirmed, proposed = int(row[0]), max(int(row[0]), int(row[1])) + 1
            db.execute("UPDATE pins SET session_proposed = ? WHERE vm = ?", (proposed, vm))
        return confirmed, proposed

    @_locked
    def confirm_session(self, vm: str, counter: int) -> None:
        self._db.execute("UPDATE pins SET session_counter = MAX(session_counter, ?) WHERE vm = ?", (counter, vm))

    @_locked
    def clone_state(self, vm: str) -> str | None:
        row = self._db.execute("SELECT clone_state FROM pins WHERE vm = ?", (vm,)).fetchone()
        return None if row is None else row[0]

    @_locked
    def flag_clone(self, vm: str, state: str, address: str | None, detail: str) -> None:
        """Record that ``vm``'s key answers from a copy (or an old snapshot); audited with it."""
        with self.transaction() as db:
            db.execute("UPDATE pins SET clone_state = ? WHERE vm = ?", (state, vm))
            _insert_audit(db, vm, "session", address, state, detail)

    @_locked
    def resolve_clone(self, vm: str, detail: str) -> str | None:
        """The owner decided: the flag goes and the next session's counter is taken as the
        VM's (a copy still alive is flagged again by its first session after that one)."""
        with self.transaction() as db:
            row = db.execute("SELECT clone_state, session_proposed FROM pins WHERE vm = ?", (vm,)).fetchone()
            if row is None or row[0] is None:
                return None
            db.execute("UPDATE pins SET clone_state = NULL, session_counter = 0 WHERE vm = ?", (vm,))
            _insert_audit(db, vm, "resolve", None, "resolved", f"was {row[0]}: {detail}")
        return str(row[0])

    # -- the owner lets a VM go (release, transfer) or takes one over (import)
    @_locked
    def drop_pin(self, vm: str, action: str, address: str | None, detail: str) -> None:
        """The VM no longer trusts this owner: its pin goes (the audit log keeps the history;
        a new token binds it again)."""
        with self.transaction() as db:
            db.execute("DELETE FROM pins WHERE vm = ?", (vm,))
            db.execute("DELETE FROM dial_vm_tokens WHERE vm = ?", (vm,))
            _insert_audit(db, vm, action, address, "done", detail)

    @_locked
    def adopt_pin(self, vm: str, cert: PinnedCert, fingerprint: str, mode: Mode, address: str, detail: str) -> bool:
        """A VM transferred to this owner: bound at once with the pin the old owner handed
        over; False (nothing written) when ``vm`` already names a VM here."""
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (vm,)).fetchone() is not None:
                return False
            db.execute("INSERT INTO vms (name, created_at) VALUES (?, ?)", (vm, now))
            db.execute("INSERT INTO pins (vm, vm_cert_pem, vm_fingerprint, state, mode, address, pinned_at) "
                       "VALUES (?, ?, ?, 'bound', ?, ?, ?)", (vm, cert.pem, fingerprint, mode.value, address, now))
            _insert_audit(db, vm, "import", address, "bound", detail)
        return True

    @_locked
    def update_address(self, vm: str, address: str) -> None:
        self._db.execute("UPDATE pins SET address = ? WHERE vm = ?", (address, vm))

    # -- what a backend's owner half keeps per VM
    @_locked
    def set_backend_data(self, vm: str, backend: str, data: dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO backend_data (vm, backend, data, updated_at) VALUES (?, ?, ?, ?)",
                         (vm, backend, json.dumps(data, sort_keys=True), time.time()))

    @_locked
    def backend_data(self, vm: str, backend: str) -> dict[str, Any] | None:
        """What ``backend`` kept for ``vm``; None if nothing (or not an object: not ours)."""
        row = self._db.execute("SELECT data FROM backend_data WHERE vm = ? AND backend = ?", (vm, backend)).fetchone()
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    # -- audit
    @_locked
    def audit(self, vm: str, action: str, address: str | None, outcome: str, detail: str) -> None:
        _insert_audit(self._db, vm, action, address, outcome, detail)

    @_locked
    def audit_log(self, vm: str | None = None) -> list[AuditRow]:
        query = "SELECT id, at, vm, action, address, outcome, detail FROM audit"
        rows = (self._db.execute(query + " WHERE vm = ? ORDER BY id", (vm,)) if vm
                else self._db.execute(query + " ORDER BY id"))
        return [AuditRow(*row) for row in rows]


_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_of(path: Path) -> threading.RLock:
    """The one lock of this process for the database at ``path`` (re-entrant: a method calls
    others, and a thread that began a write through a second Store of the home while in one
    meets SQLite's busy timeout, as without this lock, instead of waiting on itself)."""
    key = os.path.realpath(path)
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.RLock())


def _holder() -> str:
    """This bind's name in ``claims``: the process (with its start time, so a reused pid is
    not taken for it) and the thread."""
    return f"{os.getpid()}:{_start_time(os.getpid())}:{threading.get_ident()}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return "?"


def _holder_alive(holder: str) -> bool:
    pid_text, _, rest = holder.partition(":")
    started, _, thread = rest.partition(":")
    if not ascii_number(pid_text):
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return started == _start_time(pid) and any(str(t.ident) == thread for t in threading.enumerate())
    return pid_alive(pid) and started == _start_time(pid)


def _consume_tokens(db: sqlite3.Connection, vm: str) -> None:
    db.execute(
        "UPDATE tokens SET state = 'consumed', token_text = NULL, closed_at = ? WHERE vm = ? AND state = 'issued'",
        (time.time(), vm),
    )


def _insert_audit(db: sqlite3.Connection, vm: str, action: str, address: str | None, outcome: str,
                  detail: str) -> None:
    db.execute("INSERT INTO audit (at, vm, action, address, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
               (time.time(), vm, action, address, outcome, detail))
