"""200 agents dialling one `imprint serve` at once all bind; after a kill -9 and a restart of the
listener all reconnect (issue 12). Real agent processes; synchronised on their STATUS=
notifications and the listener's own list of connected VMs (no sleeps)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from imprint.owner import viaserve
from imprint.owner.home import OwnerHome

from tests.helpers import AgentFactory, Owner
from tests.helpers.owner import issue_token
from tests.helpers.serve import Serve
from tests.sshkit import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

AGENTS = 200
# Spread the reconnections over 3 s, as a fleet would over its first window.
ENV = {"IMPRINT_AGENT_RECONNECT_SECONDS": "3", "IMPRINT_AGENT_RECONNECT_CAP_SECONDS": "10"}
WAIT = 600.0


def test_200_agents_bind_at_once_and_all_reconnect_after_a_listener_restart(tmp_path: Path) -> None:
    owner = Owner.create(tmp_path / "owner")
    home = OwnerHome(owner.home)
    store = home.store()
    serve = Serve(owner, free_port(), tmp_path / "serve.log").start()
    agents = AgentFactory(tmp_path / "agents", env=dict(os.environ, **ENV), ready_timeout=WAIT)
    agents.base.mkdir()
    try:
        started = []
        for n in range(AGENTS):
            name = f"vm{n:03d}"
            root = agents.make_root(issue_token(home, store, name, "shared"), name)
            cmdline = root / "proc" / "cmdline"
            cmdline.write_text(cmdline.read_text().strip() + f" imprint.owner={serve.address}\n")
            started.append(agents.start(root, "--listen", "none", expect_ready=False))
        for agent in started:
            agent.await_status("connected to the owner", WAIT)
        listed = owner.json("list")["vms"]
        assert [vm["state"] for vm in listed] == ["bound"] * AGENTS
        assert len({vm["vm_fingerprint"] for vm in listed}) == AGENTS
        names = sorted(vm["vm"] for vm in listed)
        assert viaserve.await_connected(owner.home, names, WAIT) == names

        serve.kill()
        serve.start()
        assert viaserve.await_connected(owner.home, names, WAIT) == names
        assert owner.json("status", f"vm{AGENTS // 2:03d}")["state"] == "bound"
        assert all(agent.proc.poll() is None for agent in started)
    finally:
        serve.kill()
        agents.cleanup()
        store.close()
