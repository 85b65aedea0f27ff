#!/usr/bin/env bash
# The main job, end to end: an agent on a temporary root binds to a fresh owner in both modes.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash tools/bootstrap.sh
exec "$here/.venv/bin/python" tools/demo.py "$@"
