"""Local end-to-end demo: a real imprint-agent on a temporary root binds to a fresh owner, in
both modes, and each step prints what it proved. Run: bash tools/demo.sh (or python tools/demo.py).

It drives the agent and the owner CLI through the tests' own harness (tests/helpers), so the
demo, the tests and the benchmarks start agents one way; it is not part of the shipped package.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: tools/ is on the path, the harness is tests.helpers

from imprint import tokens  # noqa: E402
from imprint.site import reverse  # noqa: E402

from tests.helpers import Agent, AgentFactory, Owner  # noqa: E402


class DemoFailed(Exception):
    """A step did not do what the demo says it does."""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(owner: Owner, *args: str, expect: int = 0) -> str:
    """`imprint ARGS` as the owner types it, shown with its output."""
    result = owner.run(*args, check=None)
    shown = (result.stdout + result.stderr).rstrip()
    print("\n".join([f"   $ imprint {' '.join(args)}", *(f"     {line}" for line in shown.splitlines())]),
          flush=True)
    if result.returncode != expect:
        raise DemoFailed(f"`imprint {' '.join(args)}` exited {result.returncode}, expected {expect}")
    return result.stdout


def run_mode(mode: str, owner: Owner, agents: AgentFactory, work: Path) -> None:
    name = f"web-{mode}"
    say(f"{mode} mode: the owner makes a token for {name} and hands it to the site")
    token = run(owner, "token", "new", name, "--mode", mode).strip().splitlines()[-1]
    root = agents.make_root(token, name)
    print(f"   the site boots the VM with imprint.token=... on its kernel command line ({root}/proc/cmdline)")

    agent: Agent = agents.start(root)
    print(f"   imprint-agent read the token, made its key and listens on {agent.address}")
    bind_args = ["bind", name, "--address", agent.address]
    if mode == "nosecret":
        # What the site does: only the agent's whole announcement line counts (imprint-site reverse).
        answers = tokens.parse(token)
        vm_token = reverse.extract(agent.console, answers=answers.token_id.hex())
        line = tokens.vm_token_line(vm_token, answers)
        print(f"   the VM printed on its console, and the site relays it to the owner:\n     {line}")
        bind_args += ["--vm-token", vm_token.encode()]
    say(f"{mode} mode: the owner binds; the exchange runs inside TLS 1.3 bound to the VM's certificate")
    run(owner, *bind_args)
    print("   what the agent proved and recorded:")
    for logged in agent.log().splitlines():
        if "bound to owner" in logged:
            print(f"     {logged}")
    say(f"{mode} mode: the agent is killed and restarts; the pin survives, no token needed")
    agent.kill()
    agent = agents.start(root, port=agent.port)
    run(owner, "status", name)
    say(f"{mode} mode: another owner cannot bind the bound VM: it accepts only its pinned owner")
    other = Owner(work / f"other-{mode}")
    run(other, "init")
    run(other, "token", "new", name, "--mode", mode)
    run(other, "bind", name, "--address", agent.address, *bind_args[4:], expect=3)
    agent.kill()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="imprint-demo-") as tmp:
        work = Path(tmp)
        agents = AgentFactory(work)
        owner = Owner(work / "owner")
        try:
            say("the owner creates its identity once")
            run(owner, "init")
            for mode in ("shared", "nosecret"):
                run_mode(mode, owner, agents, work)
            say("the owner's record")
            run(owner, "list")
            run(owner, "audit")
        except (DemoFailed, AssertionError, reverse.ReverseError) as exc:  # the harness asserts
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        finally:
            agents.cleanup()
    print("\ndemo: both modes bound, pinned, survived a restart, and refused a second bind.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
