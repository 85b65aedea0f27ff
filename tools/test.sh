#!/usr/bin/env bash
# The test command: installs what the tests need, then lint, type check and the suite on both
# ends of the dependency range pyproject.toml declares (tools/bootstrap.sh makes both venvs):
#
#   pass 1, Debian 12's packages (.venv: /usr/bin/python3 with its system site packages, the
#           agent's floor in images): every test, the VM, QEMU and Packer tests included.
#   pass 2, the newest PyPI release of every declared dependency (.venv-newest): every test but
#           - the VM/QEMU/Packer tests (-m "not vm", tests/test_packer.py): they boot the image,
#             whose agent runs on the image's own Debian packages, not on this venv's;
#           - tests/test_dial_out_scale.py (200 real agents dialling one listener, about 2
#             minutes): the agents run on pass 1's packages either way, and the listener's own
#             code on the newest releases is exercised by tests/test_dial_out.py;
#           - tests/test_dependency_range.py: it builds its own clean venv with the newest
#             releases whichever interpreter runs it, so a second run proves nothing new;
#           - the kill -9 tests of the backend applies (tests/test_crashpoints.py, ssh, x509,
#             kerberos, cloudinit: about 2 minutes on 2 cores): they test the backends'
#             durable writes, which use no declared dependency; the backends' own tests
#             (tests/test_backend_*.py, cryptography in x509 included) and the kill -9 tests of
#             the bind (owner store, TLS, crypto) do run here.
#           That is the whole rest: every other test of the owner, site, protocol, crypto, agent
#           and backend code runs on the newest releases too.
#
# Each pass prints the versions it runs on first, and fails if the floor pass is not on
# Debian's packages. Arguments go to pytest in both passes (e.g. a test file or -k). pytest's
# exit code 5 ("no tests ran") is a failure, except in pass 2 when the arguments select only
# tests that pass 2 leaves out (then it says so).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash tools/bootstrap.sh
bash image-build/bootstrap.sh   # mmdebstrap, QEMU, packer: the VM and Packer tests build and boot images
debian="$here/.venv/bin/python"
newest="$here/.venv-newest/bin/python"

echo "== ruff"; "$debian" -m ruff check agent tests benchmarks tools image-build docs/examples
echo "== mypy (Debian 12's packages)"; "$debian" -m mypy
# Its own cache: mypy's cache of one cryptography release crashes mypy run on another.
echo "== mypy (newest releases)"; "$newest" -m mypy --cache-dir "$here/.venv-newest/mypy-cache"

# Both passes run whatever the first gives; the script exits with the first failure's code.
# pytest's 5 (no test ran) is a failure unless ALLOW_EMPTY says why it may be.
status=0
pytest_pass() {  # NAME PYTHON REQUIRE ALLOW_EMPTY [pytest args...]
  local name=$1 py=$2 require=$3 allow_empty=$4 rc=0
  shift 4
  echo "== pytest, pass $name"
  "$py" tools/deps.py --require "$require" || exit 1
  "$py" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ] && [ -n "$allow_empty" ]; then
    echo "tools/test.sh: pass $name ran no test: $allow_empty"
    rc=0
  elif [ "$rc" -eq 5 ]; then
    echo "tools/test.sh: pass $name ran no test" >&2
    rc=1
  elif [ "$rc" -ne 0 ]; then
    echo "tools/test.sh: pass $name failed (pytest exit $rc)" >&2
  fi
  [ "$status" -ne 0 ] || status=$rc
}

pytest_pass "1, Debian 12's packages" "$debian" debian "" "$@"
# A -m of your own replaces pass 2's "not vm".
pytest_pass "2, newest PyPI releases" "$newest" pypi \
  "${1:+the arguments select no test that pass 2 runs (it leaves out VM, Packer, dependency-range and backend-apply kill tests)}" \
  -m "not vm" --ignore=tests/test_vm_boot.py --ignore=tests/test_vm_dial_out.py --ignore=tests/test_packer.py \
  --ignore=tests/test_dial_out_scale.py \
  --ignore=tests/test_dependency_range.py \
  --deselect tests/test_crashpoints.py::test_kill_at_every_point_of_an_ssh_apply \
  --deselect tests/test_crashpoints.py::test_kill_at_every_point_of_an_x509_apply \
  --deselect tests/test_crashpoints.py::test_kill_at_every_point_of_a_kerberos_apply \
  --deselect tests/test_crashpoints.py::test_kill_at_every_point_of_a_cloudinit_apply \
  -p no:cacheprovider "$@"
exit "$status"
