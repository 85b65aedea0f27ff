"""The owner store's rules for binds that run at once (owner/store.py): one claim per VM (a live
holder makes the next bind wait, a dead one's claim is taken over), a bound pin is never
replaced, and a confirmation confirms only the certificate its bind verified."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from imprint import crypto, tls
from imprint.owner.store import ClaimHeld, Store
from imprint.tokens import Mode


def cert() -> tls.PinnedCert:
    return tls.PinnedCert.from_pem(crypto.PrivateKey.generate().self_signed_certificate("vm"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "imprint.db")
    s.issue_token("web1", Mode.SHARED, "01" * 8, "imprint1s-x")
    return s


def test_a_live_claim_makes_the_next_bind_wait_then_it_is_free(store: Store, tmp_path: Path) -> None:
    held, release, outcome = threading.Event(), threading.Event(), []

    def holder() -> None:
        other = Store(tmp_path / "imprint.db")
        with other.claim("web1"):
            held.set()
            release.wait(10)
        other.close()

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    with pytest.raises(ClaimHeld, match=r"another bind of web1 is under way \(process \d+\)"):
        with store.claim("web1", wait=0.2):
            pass
    release.set()
    thread.join(10)
    with store.claim("web1", wait=5):
        outcome.append("claimed")
    assert outcome == ["claimed"]
    assert store._db.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)  # released


def test_a_dead_holders_claim_is_taken_over(store: Store) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store._db.execute("INSERT INTO claims VALUES ('web1', ?, ?)", (f"{dead.pid}:12345:1", time.time()))
    started = time.monotonic()
    with store.claim("web1", wait=5):
        pass
    assert time.monotonic() - started < 2


def test_a_bound_pin_is_never_replaced(store: Store) -> None:
    first, second = cert(), cert()
    assert store.pin_pending("web1", first, first.fingerprint, Mode.SHARED, "127.0.0.1:1")
    assert store.confirm_pin("web1", "127.0.0.1:1", cert=first)
    assert not store.pin_pending("web1", second, second.fingerprint, Mode.SHARED, "127.0.0.1:2")
    pin = store.pin("web1")
    assert pin is not None and pin.state == "bound" and pin.vm_cert == first and pin.address == "127.0.0.1:1"


def test_a_confirmation_confirms_only_the_certificate_verified(store: Store) -> None:
    written, other = cert(), cert()
    assert store.pin_pending("web1", written, written.fingerprint, Mode.SHARED, "127.0.0.1:1")
    assert not store.confirm_pin("web1", "127.0.0.1:1", audit_detail="x", cert=other)
    pin, token = store.pin("web1"), store.current_token("web1")
    assert pin is not None and pin.state == "pending"
    assert token is not None and token.state == "issued"  # nothing spent, nothing audited as bound
    assert [e.outcome for e in store.audit_log("web1")] == ["issued"]
