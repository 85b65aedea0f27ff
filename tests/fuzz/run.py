"""Run one fuzz target under atheris (libFuzzer): ``python -m tests.fuzz.run NAME [flags] [paths]``.

NAME is the ``<name>`` of tests/fuzz/fuzz_<name>.py. The target module is imported inside
``atheris.instrument_imports(include=...)``, so imprint's modules report coverage to libFuzzer, and
so do the packages the target lists in ``INSTRUMENT = [...]`` (e.g. tomllib, whose parser is the
one under test). Nothing else is instrumented: cryptography's or requests' Python layers would
cost seconds at every start and add only noise to the coverage signal.

Anything after NAME goes to libFuzzer unchanged (``-max_total_time=120``, ``-runs=N``, ``-help=1``).
Defaults, each overridden by the same flag on the command line:

* corpus: with no path given, a working directory (new inputs are written to the first one:
  ``$IMPRINT_FUZZ_WORK/NAME``, default ``<tmp>/imprint-fuzz/NAME``, kept between runs) and the
  seed corpus tests/fuzz/corpus/NAME (only read). Given paths are used as they are: directories
  as corpora, files are replayed once each (how a crash is reproduced).
* ``-artifact_prefix=tests/fuzz/crashes/NAME/``: a crash is written where tests/test_fuzz.py
  replays it, so it becomes a regression input by being found.
* ``-timeout=10`` (an input that takes 10 s is a hang), ``-rss_limit_mb=1024``, then the
  target's own ``FLAGS`` list if it has one (e.g. a larger ``-max_len``).

The fuzzing runs in a forked child whose temporary directory (TMPDIR, tempfile.tempdir) is a
private one that the parent removes afterwards: libFuzzer ends the process with exit(), which
runs no Python cleanup, and a target must not leave files behind.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_FLAGS = ("-timeout=10", "-rss_limit_mb=1024")


def target_names() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


def corpus_dir(name: str) -> Path:
    return HERE / "corpus" / name


def crashes_dir(name: str) -> Path:
    return HERE / "crashes" / name


def work_dir(name: str) -> Path:
    base = os.environ.get("IMPRINT_FUZZ_WORK") or os.path.join(tempfile.gettempdir(), "imprint-fuzz")
    return Path(base) / name


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def libfuzzer_args(name: str, args: list[str], target_flags: list[str]) -> list[str]:
    """The argv for atheris.Setup: given flags first, then defaults not given, then paths."""
    flags = [a for a in args if a.startswith("-")]
    paths = [a for a in args if not a.startswith("-")]
    given = {_flag_name(f) for f in flags}
    for default in (f"-artifact_prefix={crashes_dir(name)}/", *DEFAULT_FLAGS, *target_flags):
        if _flag_name(default) not in given:
            flags.append(default)
            given.add(_flag_name(default))
    if not paths:
        work = work_dir(name)
        work.mkdir(parents=True, exist_ok=True)
        paths = [str(work), str(corpus_dir(name))]
    for flag in flags:
        if flag.startswith("-artifact_prefix=") and flag.endswith("/"):
            Path(flag.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
    return [f"tests.fuzz.run:{name}", *flags, *paths]


def instrumented_packages(name: str) -> list[str]:
    """imprint and the target's INSTRUMENT list, read from its source (before importing it)."""
    extra: list[str] = []
    for node in ast.parse((HERE / f"fuzz_{name}.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "INSTRUMENT" for t in node.targets):
            extra = list(ast.literal_eval(node.value))
    return ["imprint", *extra]


def _fuzz(name: str, args: list[str]) -> None:
    import atheris

    packages = instrumented_packages(name)
    early = sorted(m for m in sys.modules if m.split(".")[0] in packages)
    if early:  # they would run uninstrumented and the fuzzer would be blind inside them
        raise SystemExit(f"imported before instrumentation: {', '.join(early)}")
    with atheris.instrument_imports(include=packages):
        module = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    argv = libfuzzer_args(name, args, list(getattr(module, "FLAGS", [])))
    atheris.Setup(argv, module.test_one_input)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    names = target_names()
    if not argv or argv[0] not in names:
        print(f"usage: python -m tests.fuzz.run NAME [libFuzzer flags] [corpus dirs or files]\n"
              f"targets: {' '.join(names)}", file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    scratch = tempfile.mkdtemp(prefix=f"imprint-fuzz-{name}-")
    pid = os.fork()
    if pid == 0:
        try:
            os.environ["TMPDIR"] = scratch
            tempfile.tempdir = scratch
            _fuzz(name, args)
        except SystemExit:
            # atheris ends a crashing run with sys.exit(-1): the interpreter's normal exit runs
            # libFuzzer's exit handler, which writes the crash file. Let it.
            raise
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)  # not reached: atheris.Fuzz() does not return
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except KeyboardInterrupt:
                continue  # the child got the same SIGINT and is writing its summary
        return os.waitstatus_to_exitcode(status)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
