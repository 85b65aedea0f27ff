"""The dialling agent's reconnection schedule (guest/dialer.py): full jitter over a window that
doubles per failed round up to a cap and starts again once a connection was up."""

from __future__ import annotations

import random

from imprint.guest.dialer import Backoff


def test_windows_double_to_the_cap_and_reset() -> None:
    seen: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        seen.append((low, high))
        return high

    backoff = Backoff(10.0, 300.0, record)
    assert [backoff.next() for _ in range(8)] == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert all(low == 0.0 for low, _ in seen)  # full jitter: any point of the window, down to at once
    backoff.reset()
    assert backoff.next() == 10.0
    for _ in range(10_000):  # a long outage: the exponent cannot overflow
        backoff.next()
    assert backoff.next() == 300.0


def test_a_restarted_listener_sees_its_fleet_spread_over_the_first_window() -> None:
    """10,000 VMs whose connection dropped at once come back over the whole first window, not
    in one second: no second of it takes more than a few times its share."""
    rng = random.Random(7)
    waits = [Backoff(10.0, 300.0, rng.uniform).next() for _ in range(10_000)]
    assert 0.0 <= min(waits) and max(waits) <= 10.0
    per_second = [sum(1 for w in waits if s <= w < s + 1) for s in range(10)]
    assert max(per_second) < 2 * 1_000, per_second


def test_an_internal_failure_ends_one_connection_not_the_dialler() -> None:
    """Whatever this side raises on one connection (its own state, a bug) is that connection's
    end: the dialler's thread goes on to the next round."""
    import socket
    import threading

    from imprint.guest.dialer import OwnerDialer
    from imprint.owneraddr import OwnerAddress

    class Broken:
        stopping = threading.Event()

        @property
        def bound(self) -> bool:
            raise RuntimeError("state unreadable")

    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = OwnerAddress("127.0.0.1", listener.getsockname()[1])
        dialler = OwnerDialer(Broken(), [address])  # type: ignore[arg-type]
        assert dialler._once(address) is False
