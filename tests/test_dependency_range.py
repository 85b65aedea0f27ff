"""`pip install` of the project is enough to run it: a wheel built from the checkout (not
editable), installed into a clean venv (no system site packages) with the dependencies
pyproject.toml declares, resolved from PyPI. The installed `imprint-agent` finds a token on an
ISO9660 seed, made by genisoimage or by the installed `imprint-site seed` (pycdlib builds it),
the installed `imprint` binds it, and the x509 backend's address enumeration (pyroute2) runs in
that venv.

Needs PyPI: where a bounded probe cannot reach the index pip is configured with, the test skips
and says why. pip's cache (its default cache directory) keeps reruns fast.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Agent, AgentFactory

REPO = Path(__file__).resolve().parent.parent
PROBE_SECONDS = 20
needs_genisoimage = pytest.mark.skipif(shutil.which("genisoimage") is None, reason="genisoimage not installed")


def _pip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _pypi_reachable() -> str | None:
    """None if pip reaches its index, else why not (bounded: one try, a short timeout)."""
    try:
        probe = _pip("index", "versions", "pycdlib", "--timeout", "10", "--retries", "0", timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return f"pip's index did not answer within {PROBE_SECONDS} s"
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip() and "WARNING: Location" not in line]
        return f"pip cannot reach its index: {lines[-1] if lines else f'exit {probe.returncode}'}"
    return None


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reason := _pypi_reachable():
        print(f"test_dependency_range: skipped: {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("deprange")
    # The wheel from a copy of the checkout, so the build leaves nothing in the working tree.
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "agent", src / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work / "wheel"), str(src))
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "wheel").glob("vm_imprint-*.whl")
    venv = work / "venv"
    # No pip in the venv (faster); pip runs on it from outside with --python.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    installed = _pip("--python", str(venv / "bin/python"), "install", "-q", str(wheel))
    assert installed.returncode == 0, f"pip install of the wheel failed:\n{installed.stdout}\n{installed.stderr}"
    return venv


def _run(venv: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                            timeout=120, env=env, cwd=venv, check=False)
    if check:
        assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_venv_is_clean_and_has_every_declared_dependency(clean_venv: Path) -> None:
    where = _run(clean_venv, "python", "-c", "import imprint, sys; print(imprint.__file__); print(sys.path)")
    module, path = where.stdout.splitlines()
    assert module.startswith(str(clean_venv)), f"imprint imported from {module}, not from the installed wheel"
    assert not any(p.startswith("/usr/lib/python3/dist-packages") for p in ast.literal_eval(path)), path
    versions = _run(clean_venv, "python", str(REPO / "tools/deps.py"), "--require", "pypi")
    print(versions.stdout)


@needs_genisoimage
@pytest.mark.parametrize("maker", ["genisoimage", "imprint-site"])
def test_installed_agent_reads_an_iso_seed_and_the_installed_owner_binds(clean_venv: Path, tmp_path: Path,
                                                                        agents: AgentFactory, maker: str) -> None:
    agent_root = agents.make_root(None)
    home = tmp_path / "owner-home"
    _run(clean_venv, "imprint", "--home", str(home), "init")
    token = _run(clean_venv, "imprint", "--home", str(home), "token", "new", "web1",
                 "--mode", "shared").stdout.strip().splitlines()[-1]
    token_file = tmp_path / "seed" / "token"
    token_file.parent.mkdir()
    token_file.write_text(token + "\n")
    iso = tmp_path / "seed.iso"
    if maker == "genisoimage":
        subprocess.run(["genisoimage", "-quiet", "-output", str(iso), "-volid", "IMPRINT", "-joliet", "-rock",
                        str(token_file.parent)], check=True, capture_output=True)
    else:
        _run(clean_venv, "imprint-site", "seed", "--channel", "imprint-seed-iso", "--token-file", str(token_file),
             "--out", str(iso))
    link = agent_root / "dev/disk/by-label/IMPRINT"
    link.parent.mkdir(parents=True)
    link.symlink_to(iso)

    agent = _start_installed_agent(agents, clean_venv, agent_root)
    try:
        bound = _run(clean_venv, "imprint", "--home", str(home), "bind", "web1", "--address", agent.address)
        assert "bound web1" in bound.stdout
        status = _run(clean_venv, "imprint", "--home", str(home), "status", "web1")
        assert "bound (shared mode)" in status.stdout
        assert "found a shared-mode token" in agent.log() and "imprint-seed" in agent.log()
        assert "Traceback" not in agent.log()
    finally:
        agent.kill(signal.SIGTERM)


def test_x509_addresses_come_from_the_installed_pyroute2(clean_venv: Path) -> None:
    code = "from imprint.backends.x509.guest import enumerate_addresses; print(enumerate_addresses())"
    listed = _run(clean_venv, "python", "-c", code)
    assert isinstance(ast.literal_eval(listed.stdout.strip()), list)


def _start_installed_agent(agents: AgentFactory, venv: Path, root: Path) -> Agent:
    """The venv's own `imprint-agent` script, run from the venv (no PYTHONPATH to this checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return agents.start(root, "--channels", "imprint-seed", "--token-wait", "30",
                        program=[str(venv / "bin/imprint-agent")], env=env, cwd=venv, log=root.parent / "agent.log")
