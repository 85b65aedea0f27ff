"""Clone and rollback detection, the owner's half (docs/protocol.md §4.7).

Every pinned request carries ``Imprint-Session: PROPOSED CONFIRMED``: the next counter (above
every earlier proposal, written to the record before it is sent) and the highest the VM has
confirmed to this owner. The agent answers with its counter before and after. Its counter below
the confirmed one means the VM's state is older than what this owner has seen of it: a copy of
its disk, or a snapshot restored. The agent then refuses the request unworked (409) and does
not advance, and the owner flags the VM ``rolled-back``; a later answer from a VM with this key
and a current counter means two copies are alive: ``cloned``. A flagged VM is refused (exit 3)
until the owner decides (`imprint resolve NAME`); a status request still goes out, to learn.
"""

from __future__ import annotations

from imprint.owner.errors import AuthenticationFailed
from imprint.owner.store import Store


class SessionCheck:
    """One pinned request's counters, for ``vm`` in ``store``."""

    def __init__(self, store: Store, vm: str) -> None:
        self._store, self._vm = store, vm
        self._confirmed = 0

    def flagged(self) -> str | None:
        return self._store.clone_state(self._vm)

    def propose(self) -> str:
        """The Imprint-Session value of the next request."""
        self._confirmed, proposed = self._store.propose_session(self._vm)
        return f"{proposed} {self._confirmed}"

    def settle(self, answered: str | None, address: str) -> None:
        """Check the agent's answer; AuthenticationFailed (recorded) for a copy or a rollback,
        or for a VM already flagged."""
        vm, store = self._vm, self._store
        parts = (answered or "").split()
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 15 for p in parts):
            raise AuthenticationFailed(f"the agent at {address} did not answer the session counter that detects "
                                       "a copied or restored VM; refused (fail closed)")
        before, after = int(parts[0]), int(parts[1])
        state = store.clone_state(vm)
        if before < self._confirmed:
            new = "cloned" if state == "cloned" else "rolled-back"
            store.flag_clone(vm, new, address, f"session counter {before} below the confirmed {self._confirmed}: "
                             "a copy of this VM, or a snapshot restored")
            raise AuthenticationFailed(
                f"{vm} at {address} is {new}: its session counter {before} is below the {self._confirmed} this owner "
                "has seen, so it is a copy of the VM's disk or was restored from an older snapshot; it is refused "
                f"until you decide (`imprint resolve {vm}`)")
        store.confirm_session(vm, after)
        if state is not None:
            if state == "rolled-back":
                state = "cloned"
                store.flag_clone(vm, state, address, f"a current session (counter {before}) after a stale one: two "
                                 "copies of this VM are alive")
            raise AuthenticationFailed(f"{vm} is flagged {state}: another copy of this VM answered with an older "
                                       f"session counter; it is refused until you decide (`imprint resolve {vm}`)")
