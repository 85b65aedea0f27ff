"""Loopback fakes: a listener on 127.0.0.1 whose connections one thread hands, in turn, to a
handler (a fake agent, a compromised VM, a proxy to a real agent).

A handler's OSError is the peer hanging up (what the tests check is the peer's side, so it is
not an error here) unless the server is made with ``hangup_is_error``; anything else it raises
is kept in ``errors`` and fails :meth:`close`. The
server stops at close (the listener is shut down from outside the thread), after
``connections`` connections, or when its handler returns False for "no more".
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType

IO_TIMEOUT = 10.0


class LoopbackServer:
    def __init__(self, handle: Callable[[socket.socket], object], *, connections: int | None = None,
                 io_timeout: float = IO_TIMEOUT, accept_timeout: float | None = None,
                 hangup_is_error: bool = False, name: str = "loopback-server") -> None:
        """``handle(conn)`` serves one connection (closed when it returns; it returns False to
        stop the server); ``io_timeout`` bounds every call on a connection, ``accept_timeout``
        the wait for the next one (None: until close)."""
        self._handle = handle
        self._limit = connections
        self.io_timeout = io_timeout
        self._accept_timeout = accept_timeout
        self._hangup_is_error = hangup_is_error
        self.connections = 0
        self.errors: list[BaseException] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True, name=name)

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(check=kind is None)

    def close(self, *, check: bool = True) -> None:
        """Stop accepting, wait for the thread; with ``check``, assert it stopped without errors."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(self.io_timeout + 5)
        if check:
            assert not self._thread.is_alive(), f"{self._thread.name} did not stop"
            assert not self.errors, self.errors

    def _serve(self) -> None:
        self._listener.settimeout(self._accept_timeout)
        while self._limit is None or self.connections < self._limit:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # shut down at close (or nobody came within accept_timeout)
            self.connections += 1
            with conn:
                conn.settimeout(self.io_timeout)
                try:
                    more = self._handle(conn)
                except OSError as exc:
                    if self._hangup_is_error:
                        self.errors.append(exc)
                    continue
                except Exception as exc:  # reported at close
                    self.errors.append(exc)
                    continue
            if more is False:
                return
