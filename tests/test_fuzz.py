"""The fuzz targets of tests/fuzz in the test suite.

* Every file of every tests/fuzz/corpus/<name>/ and tests/fuzz/crashes/<name>/ is replayed through
  its target in plain pytest (no atheris needed): a seed must pass, and a crash once found must
  stay fixed.
* When atheris is importable, each target is fuzzed for a few seconds in a subprocess through the
  real runner (python -m tests.fuzz.run), which must exit 0 and write no crash.

Targets are found by globbing tests/fuzz/fuzz_*.py, so a new target joins by existing.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import run, seeds

ROOT = Path(__file__).resolve().parent.parent
TARGETS = run.target_names()
FUZZ_SECONDS = 3
FUZZ_RUNS = 100_000  # a cap as well as the time: a fast target stops early
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None

# Crash inputs found in code this file's owner does not own, until the owner's fix lands:
# "<target>/<file>" -> who and what. Strict: once fixed, the replay passes, the xfail fails, and
# the entry must go (the input stays in crashes/ as the regression test).
KNOWN_OPEN: dict[str, str] = {}


def _replay_params() -> list[object]:
    params: list[object] = []
    for name in TARGETS:
        for kind, directory in (("corpus", run.corpus_dir(name)), ("crashes", run.crashes_dir(name))):
            if not directory.is_dir():
                continue
            for path in sorted(p for p in directory.iterdir() if p.is_file()):
                key = f"{name}/{path.name}"
                marks = [pytest.mark.xfail(strict=True, reason=KNOWN_OPEN[key])] if key in KNOWN_OPEN else []
                params.append(pytest.param(name, path, id=f"{name}/{kind}/{path.name}", marks=marks))
    return params


def target(name: str) -> object:
    return importlib.import_module(f"tests.fuzz.fuzz_{name}")


def test_targets_are_found() -> None:
    assert {"frames", "exchange_vm", "exchange_owner", "tokens", "vm_token_lines", "control_http",
            "profile_toml"} <= set(TARGETS)


@pytest.mark.parametrize("name", TARGETS)
def test_every_target_has_a_seed_corpus_and_an_entry_point(name: str) -> None:
    directory = run.corpus_dir(name)
    assert directory.is_dir() and any(p.is_file() for p in directory.iterdir()), f"no seeds in {directory}"
    assert callable(getattr(target(name), "test_one_input", None))


@pytest.mark.parametrize(("name", "path"), _replay_params())
def test_replay(name: str, path: Path) -> None:
    target(name).test_one_input(path.read_bytes())  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(seeds.SEEDS))
def test_generated_seeds_are_current(name: str) -> None:
    # python -m tests.fuzz.seeds rewrites them; stale seeds would quietly fuzz a protocol gone by.
    directory = run.corpus_dir(name)
    committed = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    assert committed == seeds.SEEDS[name](), "run: python -m tests.fuzz.seeds"


def test_genuine_seeds_reach_the_end_of_the_exchange() -> None:
    # The exchange seeds are worth something only while they still complete the exchange.
    from imprint.protocol.exchange import State

    from tests.fuzz import _exchange as ex

    for mode in ex.MODES:
        for direction in ex.Direction:
            g = ex.genuine(mode, direction)
            vm = ex.vm_at(mode, ex.Point(direction, State.AWAIT_OWNER_HELLO))
            vm.receive_data(g["OwnerHello"] + g["OwnerProof"])
            vm.confirm()
            owner = ex.owner_at(mode, ex.Point(direction, State.AWAIT_VM_HELLO))
            owner.receive_data(g["VmHello"] + g["VmProof"] + g["VmConfirm"])
            assert vm.state is State.DONE and owner.state is State.DONE, (mode, direction)


def test_the_dial_out_seeds_complete_the_exchange_through_the_target() -> None:
    # The listener's genuine seeds begin with VmDial: only the target's accept() on VmDialled
    # leads on to DONE. Replayed step by step as the target does, the session must end there.
    from imprint.protocol.exchange import State, VmDialled

    from tests.fuzz import _exchange as ex

    for mode in ex.MODES:
        for name in (f"{mode.value}-dial-out-await-vm-dial-genuine-whole",
                     f"{mode.value}-dial-out-await-vm-dial-genuine-bytewise-then-close"):
            selected = ex.parse_selector((run.corpus_dir("exchange_owner") / name).read_bytes(), ex.OWNER_STATES)
            owner = ex.owner_at(selected.mode, selected.point)
            for chunk in ex.chunks(selected.stream, selected.size):
                for event in owner.receive_data(chunk):
                    if isinstance(event, VmDialled):
                        assert ex.listener_accept(owner, event)
            assert owner.state is State.DONE, (name, owner.state)


_EXCHANGE_POINTS = {"exchange_owner": "OWNER_STATES", "exchange_vm": "VM_STATES"}


@pytest.mark.parametrize("name", list(_EXCHANGE_POINTS))
def test_every_exchange_seed_lands_where_its_name_says(name: str) -> None:
    # A seed is named <mode>-<direction>-<state>-<what>[-then-close]; the target's selector must
    # put it there (once the close bit leaked into the state index and sent the owner's
    # "-then-close" seeds to START). Every point of either side has a seed in each mode.
    from tests.fuzz import _exchange as ex

    points = getattr(ex, _EXCHANGE_POINTS[name])
    landed = set()
    for path in sorted(p for p in run.corpus_dir(name).iterdir() if p.is_file()):
        selected = ex.parse_selector(path.read_bytes(), points)
        where = f"{selected.mode.value}-{selected.point.label}-"
        assert path.name.startswith(where), f"{path.name} lands in {where}"
        assert selected.close == path.name.endswith("-then-close"), (path.name, selected.close)
        session = (ex.owner_at if name == "exchange_owner" else ex.vm_at)(selected.mode, selected.point)
        assert session.state is selected.point.state
        landed.add((selected.mode, selected.point))
    missing = {(mode, point) for mode in ex.MODES for point in points} - landed
    assert not missing, f"no seed for {sorted((m.value, p.label) for m, p in missing)}"


def test_selector_round_trip() -> None:
    from tests.fuzz import _exchange as ex

    for points in (ex.OWNER_STATES, ex.VM_STATES):
        assert len(set(points)) == len(points)
        for mode in ex.MODES:
            for point in points:
                for size, close in ((1, False), (101, True), (256, True)):
                    selected = ex.parse_selector(ex.selector_for(mode, point, points, size=size, close=close)
                                                 + b"x", points)
                    assert selected == (mode, point, size, close, b"x")
        # Any first byte lands on some point; the close bit never moves it.
        for byte in range(0x80):
            assert ex.parse_selector(bytes([byte, 0]), points).point == ex.parse_selector(
                bytes([byte | 0x80, 0]), points).point


def test_runner_defaults_and_overrides(tmp_path: Path) -> None:
    argv = run.libfuzzer_args("frames", [], [])
    assert f"-artifact_prefix={run.crashes_dir('frames')}/" in argv and "-timeout=10" in argv
    assert argv[-1] == str(run.corpus_dir("frames"))
    given = run.libfuzzer_args("frames", ["-timeout=2", f"-artifact_prefix={tmp_path}/a/", str(tmp_path)],
                               ["-max_len=9", "-timeout=99"])
    assert given.count("-timeout=2") == 1 and "-timeout=99" not in given and "-max_len=9" in given
    assert given[-1] == str(tmp_path) and (tmp_path / "a").is_dir()


def _fuzz_params() -> list[object]:
    params: list[object] = []
    for name in TARGETS:
        open_ = sorted(key for key in KNOWN_OPEN if key.startswith(f"{name}/"))
        # Not strict: a few seconds may or may not rediscover a known crash. Any crash fails it
        # while it is marked, so the mark goes with the last KNOWN_OPEN entry of the target.
        marks = [pytest.mark.xfail(strict=False, reason=f"known open: {', '.join(open_)}")] if open_ else []
        params.append(pytest.param(name, marks=marks))
    return params


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (tools/requirements-dev.txt)")
@pytest.mark.parametrize("name", _fuzz_params())
def test_fuzz_briefly(name: str, tmp_path: Path) -> None:
    work, crashes = tmp_path / "work", tmp_path / "crashes"
    work.mkdir()
    cmd = [sys.executable, "-m", "tests.fuzz.run", name, f"-max_total_time={FUZZ_SECONDS}", f"-runs={FUZZ_RUNS}",
           f"-artifact_prefix={crashes}/", str(work), str(run.corpus_dir(name))]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    # A slow unit (one input over 10 s) is libFuzzer's note, not a failure: on 2 shared cores a
    # heavy input can get there; the campaign table lists them.
    found = sorted(p for p in crashes.iterdir() if not p.name.startswith("slow-unit-")) if crashes.is_dir() else []
    detail = "\n".join(f"{p.name}: base64 {base64.b64encode(p.read_bytes()[:4096]).decode()}" for p in found)
    assert result.returncode == 0 and not found, (
        f"fuzzing {name} exited {result.returncode}; save each input below as tests/fuzz/crashes/{name}/<name> "
        f"and fix it\n{detail}\n{result.stderr[-6000:]}")
    assert "INITED" in result.stderr and "Done " in result.stderr, result.stderr[-3000:]  # it really fuzzed
