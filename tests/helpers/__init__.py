"""The test harness: what the tests, the benchmarks and the demo (tools/demo.py) run imprint with.

agents     real `imprint-agent run` processes, ready through NOTIFY_SOCKET (Agent, AgentFactory)
agentroot  a guest root for `--root` (proc/cmdline with the token, dev/)
exchange   the key exchange in memory on the fixed identities: sessions, the drivers, frame splitting
keys       fixed identities (keys, certificates, tokens) from fixed seeds; the fuzz corpus depends on them
owner      the real `imprint` CLI on an owner home (Owner), in-process token issue
servers    loopback fake servers and proxies that serve each connection in a thread
fake_imds  a fake site's metadata service (EC2 IMDSv2, OpenStack), in a thread or as a program
tlsbytes   a genuine TLS 1.3 ClientHello, for tests below TLS
text       assertions on what an error message may not contain (secrets never echoed)
vm         real VMs: the cached image of image-build/build.sh, `imprint-site boot` runs (Site)

tests/conftest.py only turns these into fixtures; no test imports conftest. Everything here
takes its timeouts as parameters: nothing is monkeypatched.
"""

from tests.helpers.agents import READY_TIMEOUT, Agent, AgentFactory
from tests.helpers.owner import Owner

__all__ = ["READY_TIMEOUT", "Agent", "AgentFactory", "Owner"]
