"""The VM's append-only journal (guest/journal.py): a hash chain that shows an edited, removed
or reordered line, survives a torn last line, and records a bind in either direction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imprint.guest import journal
from imprint.tokens import Mode

from tests.helpers import AgentFactory, Owner


def test_chain_reads_back_and_shows_every_change(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    for n in range(5):
        journal.append(path, "event", n_given=n)
    entries = journal.read(path)
    assert [e.n for e in entries] == [1, 2, 3, 4, 5] and [e.fields["n_given"] for e in entries] == list(range(5))
    lines = path.read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["n_given"] = 99
    for changed in (lines[:2] + [json.dumps(edited).encode() + b"\n"] + lines[3:],  # edited
                    lines[:2] + lines[3:],                                       # removed
                    lines[:1] + [lines[2], lines[1]] + lines[3:]):               # reordered
        path.write_bytes(b"".join(changed))
        with pytest.raises(journal.JournalBroken, match="line"):
            journal.read(path)


def test_a_torn_last_line_is_reported_and_the_next_append_starts_a_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    journal.append(path, "first")
    with path.open("ab") as out:
        out.write(b'{"n":2,"at":1,"ev')  # a crash half-way through a write
    with pytest.raises(journal.JournalBroken, match="line 2"):
        journal.read(path)
    journal.append(path, "after")
    assert path.read_bytes().endswith(b"\n") and b'"ev\n{' in path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_a_bind_is_journalled(agents: AgentFactory, owner: Owner, mode: str) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", mode)))
    args = ["bind", "web1", "--address", agent.address]
    args += ["--vm-token", agent.vm_token()] if mode == "nosecret" else []
    bound = owner.json(*args)
    (entry,) = journal.read(agent.root / "var/lib/imprint/journal.log")
    assert entry.event == "bound" and entry.fields["owner_fingerprint"] == bound["owner_fingerprint"]
    assert entry.fields["mode"] == Mode(mode).value and entry.fields["reached"] == "dial-in"
    assert "imprint1s" not in (agent.root / "var/lib/imprint/journal.log").read_text()  # never K
