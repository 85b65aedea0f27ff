#!/usr/bin/env bash
# The test command: installs what the tests need, then lint, type check and the suite.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash tools/bootstrap.sh
bash image-build/bootstrap.sh   # mmdebstrap, QEMU, packer: the VM and Packer tests build and boot images
py="$here/.venv/bin/python"
echo "== ruff"; "$py" -m ruff check agent tests benchmarks
echo "== mypy"; "$py" -m mypy
echo "== pytest"; "$py" -m pytest "$@"
