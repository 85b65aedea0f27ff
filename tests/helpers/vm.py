"""Real-VM helpers shared by the VM tests and the boot benchmark.

The image is built once per set of inputs by image-build/build.sh and cached under
$IMPRINT_IMAGE_CACHE (default ~/.cache/imprint-image)/images/<hash of the inputs>. VMs are
started with the real `imprint-site boot` command; every run directory a helper starts is
remembered, and :func:`stop_all` (fixture teardown, also on failure) kills what is left by pid file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IMAGE_INPUTS = ("image-build/build.sh", "image-build/customize.sh", "image-build/bake-existing.sh",
                "image-build/write_manifest.py", "image-build/unpack_wheel.py", "image-build/files",
                "systemd/imprint-agent.service", "pyproject.toml", "agent/imprint")
KEEP_IMAGES = 3


def cache_dir() -> Path:
    return Path(os.environ.get("IMPRINT_IMAGE_CACHE") or Path.home() / ".cache" / "imprint-image")


def _input_files() -> Iterator[Path]:
    for name in IMAGE_INPUTS:
        path = REPO / name
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                              and p.suffix != ".pyc")
        else:
            yield path


def inputs_hash() -> str:
    digest = hashlib.sha256()
    for path in _input_files():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def qemu_problem() -> str | None:
    """Why VMs cannot run here, or None. Installs QEMU with apt-get when it is missing (as root)."""
    if shutil.which("qemu-system-x86_64") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86", "qemu-utils"],
                       capture_output=True, timeout=600, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed and could not be installed"
    result = subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-S", "-machine", "none",
                             "-monitor", "none", "-version"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return f"qemu-system-x86_64 does not run: {result.stderr.strip()}"
    if os.geteuid() != 0:
        return "building the image needs root (mmdebstrap --mode=root)"
    return None


@dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def base(self) -> Path:
        return self.dir / "base.qcow2"

    @property
    def bare(self) -> Path:
        return self.dir / "bare.qcow2"

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.dir / "manifest.json").read_text())
        return data


def ensure_image(log: Path | None = None) -> Image:
    """The image for the current inputs: from the cache, or built now (once, under a lock)."""
    images = cache_dir() / "images"
    images.mkdir(parents=True, exist_ok=True)
    target = images / inputs_hash()
    with (images / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "manifest.json").exists():
            building = images / f".building-{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            started = time.monotonic()
            with (log or Path(os.devnull)).open("w") as out:
                result = subprocess.run(["bash", str(REPO / "image-build/build.sh"), "--out", str(building)],
                                        stdout=out, stderr=subprocess.STDOUT, timeout=1800)
            if result.returncode != 0:
                raise RuntimeError(f"image-build/build.sh failed (exit {result.returncode}); log: {log}")
            shutil.rmtree(target, ignore_errors=True)
            building.rename(target)
            print(f"built the image in {time.monotonic() - started:.0f} s: {target}", file=sys.stderr)
            old = sorted((p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime)
            for stale in old[:-KEEP_IMAGES]:
                shutil.rmtree(stale, ignore_errors=True)
    return Image(target)


class Site:
    """Runs `imprint-site boot|attach|stop` and remembers every run directory it started."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runs: list[Path] = []
        self._lock = threading.Lock()

    def new_run_dir(self, name: str) -> Path:
        with self._lock:
            run_dir = self.base / f"{len(self.runs):02d}-{name}"
            self.runs.append(run_dir)
        return run_dir

    def _site(self, *args: str, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
        result = subprocess.run([sys.executable, "-m", "imprint.site", *args], capture_output=True, text=True,
                                timeout=timeout)
        try:
            data: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            data = {}
        return result.returncode, data, result.stderr

    def boot(self, image: Image, name: str, *args: str, check: bool = True) -> dict[str, Any]:
        run_dir = self.new_run_dir(name)
        code, data, err = self._site("boot", "--image", str(image.base), "--run-dir", str(run_dir),
                                     "--accel", "auto", "--timeout", "400", *args)
        if check and code != 0:
            raise AssertionError(f"imprint-site boot {name} exited {code}: {err}\n{console_tail(run_dir)}")
        data.setdefault("run_dir", str(run_dir))
        data["stderr"] = err
        return data

    def reboot(self, previous: dict[str, Any], name: str, *args: str) -> dict[str, Any]:
        """A cold reboot of the same VM: a clean power-down, then the same disk booted again."""
        stopped = self.stop(Path(previous["run_dir"]), graceful=True)
        run_dir = self.new_run_dir(name)
        code, data, err = self._site("boot", "--reuse-disk", previous["disk"], "--image", previous["image"],
                                     "--run-dir", str(run_dir), "--accel", "auto", "--timeout", "400", *args)
        if code != 0:
            raise AssertionError(f"imprint-site boot (reboot) exited {code}: {err}\n{console_tail(run_dir)}")
        data["previous_stop"] = stopped
        return data

    def attach(self, run_dir: Path, *args: str) -> dict[str, Any]:
        code, data, err = self._site("attach", str(run_dir), "--timeout", "400", *args)
        if code != 0:
            raise AssertionError(f"imprint-site attach exited {code}: {err}\n{console_tail(run_dir)}")
        return data

    def wait_ssh(self, run_dir: Path) -> dict[str, Any]:
        code, data, err = self._site("wait-ssh", str(run_dir), "--timeout", "300", timeout=400)
        if code != 0:
            raise AssertionError(f"imprint-site wait-ssh exited {code}: {err}\n{console_tail(run_dir)}")
        return data

    def stop(self, run_dir: Path, graceful: bool = False) -> str:
        code, data, err = self._site("stop", str(run_dir), *(["--graceful"] if graceful else []), timeout=300)
        assert code == 0, err
        return str(data.get("stopped"))

    def stop_all(self) -> None:
        """Teardown: no QEMU is left running, whatever happened."""
        from imprint.site import vm

        for run_dir in self.runs:
            with contextlib.suppress(Exception):
                vm.stop(run_dir)


def console_tail(run_dir: Path, lines: int = 40) -> str:
    from imprint.site import vm

    text = vm.console_text(run_dir / "console.log")
    return "--- console tail ---\n" + "\n".join(text.splitlines()[-lines:])
