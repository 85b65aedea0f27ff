"""The agent's open connections: two bounded pools, and one deadline per connection that a
reaper enforces from outside the connection's thread.

Why this shape: anyone who can reach the port can open connections; only the owner can
authenticate. Per-recv timeouts let a client that sends a byte a second keep a connection for
as long as it likes, and a fixed number of slots held that way locked the owner out. So:

* Each connection has one deadline for its current phase, a point in time (not a per-recv
  timeout): a trickle cannot move it. The reaper shuts the socket down when it passes; the
  blocked recv or send in the connection's thread returns, and that thread closes the socket.
* Unauthenticated connections share one bounded pool. A newcomer to a full pool is never
  refused (refusing is what let slow clients keep the owner out): it evicts the oldest
  connection of the address that holds the most. A flood from other addresses then spends its
  own connections and never the owner's; a flood from the owner's own address (behind a NAT)
  still cannot keep a newcomer out, which lives until as many connections arrived after it as
  the pool holds: longer than a handshake unless the flood reconnects faster than that.
* A connection that proved the pinned owner key (or, while binding, the token) moves to the
  owner pool, which unauthenticated connections never enter. It is the owner's to fill: a
  newcomer there evicts the owner's oldest idle connection (one waiting for a request), never
  one whose request is running.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import threading
import time

from imprint.guest import log as agent_log

log = agent_log.get("imprint.agent")


class Connection:
    """One accepted connection: its socket, where it came from, and its current deadline."""

    def __init__(self, table: ConnectionTable, sock: ssl.SSLSocket, addr: tuple[str, int],
                 seconds: float, why: str) -> None:
        self._table = table
        self.sock = sock
        self.host = addr[0]
        self.peer = f"{addr[0]}:{addr[1]}"
        self.accepted = time.monotonic()
        self.deadline = self.accepted + seconds
        self.why = why  # what the deadline bounds, for the log: "the TLS handshake (10 s)"
        self.idle = False
        self.routine = False  # reaching this deadline is the normal end (a lingering close)
        # Why the agent cut it short, for the log ("" when the deadline was routine); None while
        # it runs its course.
        self.cut: str | None = None

    def limit(self, seconds: float | None, why: str, *, idle: bool = False) -> None:
        """From now, the connection may last ``seconds`` more (None: no limit, while the agent
        itself works on a request of the pinned owner)."""
        self.limit_at(math.inf if seconds is None else time.monotonic() + seconds, why, idle=idle)

    def limit_at(self, deadline: float, why: str, *, idle: bool = False, routine: bool = False) -> None:
        self._table.set_deadline(self, deadline, why, idle, routine)


class ConnectionTable:
    def __init__(self, *, preauth_max: int, owner_max: int) -> None:
        self.preauth_max = preauth_max
        self.owner_max = owner_max
        self._cond = threading.Condition()
        self._preauth: list[Connection] = []  # in accept order: the oldest first
        self._owner: list[Connection] = []
        self._closed = False

    def admit(self, sock: ssl.SSLSocket, addr: tuple[str, int], seconds: float, why: str) -> Connection:
        """A new unauthenticated connection; evicts one if the pool is full (never refuses)."""
        conn = Connection(self, sock, addr, seconds, why)
        with self._cond:
            if len(self._preauth) >= self.preauth_max:
                self._cut(self._eviction_victim(),
                          f"evicted for a newer connection ({self.preauth_max} unauthenticated connections open)")
            self._preauth.append(conn)
            self._cond.notify()
        return conn

    def promote(self, conn: Connection) -> bool:
        """``conn`` proved the pinned owner key: move it to the owner pool. False when it was
        cut meanwhile or the owner pool is full of connections whose requests are running."""
        with self._cond:
            if conn not in self._preauth:
                return False
            if len(self._owner) >= self.owner_max:
                idle = next((c for c in self._owner if c.idle), None)
                if idle is None:
                    return False
                self._cut(idle, f"evicted for a newer owner connection ({self.owner_max} open)")
            self._preauth.remove(conn)
            self._owner.append(conn)
            return True

    def leave(self, conn: Connection) -> None:
        """The connection's thread is done with it. Called before the socket is closed: from here
        on nothing else touches the socket (its descriptor may be reused once closed)."""
        with self._cond:
            self._remove(conn)

    def counts(self) -> tuple[int, int]:
        with self._cond:
            return len(self._preauth), len(self._owner)

    def set_deadline(self, conn: Connection, deadline: float, why: str, idle: bool, routine: bool) -> None:
        with self._cond:
            conn.deadline, conn.why, conn.idle, conn.routine = deadline, why, idle, routine
            self._cond.notify()

    def reap_forever(self) -> None:
        """Cut every connection whose deadline passed; sleep until the next one is due."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for conn in [c for c in (*self._preauth, *self._owner) if c.deadline <= now]:
                    self._cut(conn, "" if conn.routine else f"{conn.why} did not finish in time")
                due = min((c.deadline for c in (*self._preauth, *self._owner)), default=math.inf)
                self._cond.wait(None if due == math.inf else max(due - now, 0.0))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # -- under the lock
    def _eviction_victim(self) -> Connection:
        held: dict[str, int] = {}
        for conn in self._preauth:
            held[conn.host] = held.get(conn.host, 0) + 1
        most = max(held.values())
        return next(c for c in self._preauth if held[c.host] == most)

    def _remove(self, conn: Connection) -> bool:
        for pool in (self._preauth, self._owner):
            if conn in pool:
                pool.remove(conn)
                return True
        return False

    def _cut(self, conn: Connection, why: str) -> None:
        """Shut the socket down (not close: the connection's thread owns the descriptor); its
        blocked recv or send returns at once, and it leaves the pools now, making room. Logged
        first, so the line is there by the time the peer sees the connection end."""
        if not self._remove(conn):
            return
        conn.cut = why
        if why:
            log.info("connection from %s closed: %s", conn.peer, why)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
