"""`imprint bind --from`'s input and scheduler (owner/fleet.py) on their own: every malformed
record refuses the whole run naming its line and field; the scheduler keeps one VM's failure to
that VM, never binds a bound VM, and after stop() starts nothing new. The fleet against real
agents is tests/test_fleet.py."""

from __future__ import annotations

import json
import threading

import pytest
from imprint.owner import fleet
from imprint.owner.errors import AuthenticationFailed, Unreachable, UsageError
from imprint.owner.fleet import FleetRequest, FleetRun, read_requests

VM_TOKEN = "imprint1v-" + "a" * 58


def lines(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_json_lines_and_boot_records_are_read() -> None:
    boot_record = json.dumps({"run_dir": "/tmp/x", "agent_address": "127.0.0.1:7001", "vm_token": VM_TOKEN,
                              "status": "started"}, indent=2)
    text = lines({"name": "web1", "address": "127.0.0.1:7000"}) + boot_record + "\n"
    requests = read_requests(text, name="db{n}")
    assert requests == [FleetRequest("web1", "127.0.0.1:7000", None, "line 1"),
                        FleetRequest("db2", "127.0.0.1:7001", VM_TOKEN, "line 2")]


@pytest.mark.parametrize(("text", "message"), [
    ("{", "line 1: not JSON"),
    (lines({"name": "a", "address": "h:1"}) + "[1, 2]\n", "line 2: a record is a JSON object, not list"),
    (lines({"address": "h:1"}), "line 1: no name"),
    (lines({"name": 7, "address": "h:1"}), "line 1: name is not a string"),
    (lines({"name": "web\x1b[2J", "address": "h:1"}), "line 1: VM name 'web\\x1b[2J' must be"),
    (lines({"name": "web1"}), "VM web1: address is missing"),
    (lines({"name": "web1", "address": "h:99999"}), "is not a number from 1 to 65535"),
    (lines({"name": "web1", "address": "h\n:1"}), "is not a host name"),
    (lines({"name": "web1", "address": "h:1", "vm_token": "x\x07"}), "vm_token is not a VM token's text"),
    (lines({"name": "web1", "address": "h:1"}, {"name": "web1", "address": "h:2"}),
     "line 2: VM web1 is also on line 1"),
    ("", "no VM to bind"),
    ("[" * 100_000, "nested too deeply"),
])
def test_a_malformed_record_refuses_the_run_naming_it(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        read_requests(text)
    assert message in str(caught.value), str(caught.value)
    assert "\x1b" not in str(caught.value) and "\x07" not in str(caught.value)


def test_every_problem_is_listed_up_to_ten() -> None:
    text = lines(*({"name": f"vm{i}"} for i in range(25)))
    with pytest.raises(UsageError) as caught:
        read_requests(text)
    message = str(caught.value)
    assert "nothing was bound" in message and "VM vm9: address" in message and "VM vm10:" not in message
    assert "and 15 more" in message


def test_several_unnamed_records_need_a_numbered_name() -> None:
    text = lines({"agent_address": "h:1"}, {"agent_address": "h:2"})
    with pytest.raises(UsageError, match=r"--name needs \{n\}"):
        read_requests(text, name="web")
    assert [r.name for r in read_requests(text, name="web{n}")] == ["web1", "web2"]


def test_input_size_and_count_are_bounded() -> None:
    with pytest.raises(UsageError, match="MiB of input"):
        read_requests(" " * (fleet.MAX_INPUT + 1))
    with pytest.raises(UsageError, match="more than"):
        read_requests("{}\n" * (fleet.MAX_REQUESTS + 1))


def requests(n: int) -> list[FleetRequest]:
    return [FleetRequest(f"vm{i}", f"127.0.0.1:{7000 + i}") for i in range(n)]


def test_failures_stay_with_their_vm_and_the_worst_code_wins() -> None:
    bound: set[str] = {"vm0"}
    lock = threading.Lock()

    def bind_one(request: FleetRequest) -> str:
        if request.name == "vm1":
            raise Unreachable("no answer")
        if request.name == "vm2":
            raise AuthenticationFailed("wrong token")
        with lock:
            assert request.name not in bound, "bound twice"
            bound.add(request.name)
        return "SHA256:" + request.name

    seen: list[str] = []
    summary = FleetRun(bind_one, lambda name: name in bound, parallel=3,
                       on_result=lambda r: seen.append(r.name)).run(requests(8))
    outcomes = {r.name: r.outcome for r in summary.results}
    assert outcomes == {"vm0": "already-bound", "vm1": "failed", "vm2": "failed", **{f"vm{i}": "bound"
                                                                                     for i in range(3, 8)}}
    assert sorted(seen) == sorted(outcomes)
    assert summary.exit_code == AuthenticationFailed.exit_code  # 3 outranks 4
    assert summary.count("bound") == 5 and bound == {f"vm{i}" for i in range(8)} - {"vm1", "vm2"}


def test_stop_lets_binds_under_way_end_and_starts_no_other() -> None:
    entered = threading.Barrier(3)
    release = threading.Event()
    started: list[str] = []

    def bind_one(request: FleetRequest) -> str:
        started.append(request.name)
        entered.wait(timeout=10)
        release.wait(timeout=10)
        return "SHA256:x"

    run = FleetRun(bind_one, lambda name: False, parallel=2)
    box: list[fleet.FleetSummary] = []
    worker = threading.Thread(target=lambda: box.append(run.run(requests(10))))
    worker.start()
    entered.wait(timeout=10)  # two binds are under way
    run.stop()
    release.set()
    worker.join(timeout=10)
    summary = box[0]
    assert sorted(started) == ["vm0", "vm1"]
    assert [r.outcome for r in summary.results] == ["bound", "bound"] + ["not-started"] * 8
    assert summary.interrupted and summary.exit_code == 130


def test_a_bind_lost_to_another_process_is_already_bound() -> None:
    bound: set[str] = set()

    def bind_one(request: FleetRequest) -> str:
        bound.add(request.name)  # the other process pinned it first
        raise AuthenticationFailed("the token was already used")

    summary = FleetRun(bind_one, lambda name: name in bound, parallel=1).run(requests(1))
    assert summary.results[0].outcome == "already-bound" and summary.exit_code == 0


def test_parallel_must_be_positive() -> None:
    with pytest.raises(UsageError, match="at least 1"):
        FleetRun(lambda r: "", lambda n: False, parallel=0)
