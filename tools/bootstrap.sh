#!/usr/bin/env bash
# Installs everything imprint's demo and tests need on a Debian 12 machine, then prepares two
# venvs on Debian's own python3, the two ends of the dependency range pyproject.toml declares:
#   .venv         with Debian's system packages visible: the agent is exercised on the same
#                 python3-cryptography/-pycdlib/-pyroute2 it meets in images (the floor)
#   .venv-newest  the same, with the newest PyPI release of every declared dependency (and of
#                 theirs) installed in the venv over Debian's: only the range's end changes, the
#                 rest (Debian's cloud-init, PyYAML, jsonschema that tests and backends use) is
#                 as in .venv. Re-resolved when pyproject.toml or the dev requirements change
#                 and once a day (new releases appear); pip's cache keeps that fast
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

debs=(python3 python3-venv python3-pip python3-cryptography python3-requests
      python3-pyroute2 python3-pycdlib openssl ca-certificates iproute2
      mtools dosfstools genisoimage xorriso cloud-init openssh-server openssh-client
      krb5-kdc krb5-admin-server krb5-user)

bash "$here/tools/apt-ensure.sh" bootstrap "${debs[@]}"

quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

venv="$here/.venv"
stamp="$venv/.imprint-stamp"
# The third-party backend the tests install as a vendor would (tests/plugins/imprint-motd): any
# change of its files reinstalls it.
plugin="tests/plugins/imprint-motd"
want="$(sha256sum pyproject.toml tools/requirements-dev.txt $(find "$plugin" -type f -not -name '*.pyc' | sort) |
        sha256sum | cut -c1-16)"
# Not editable, from a copy: pip builds in the source directory, and the tests must find the
# plugin only as installed (its entry point), never by its path.
install_plugin() {
  local copy
  copy=$(mktemp -d /tmp/imprint-motd-build.XXXXXX)
  cp -r "$here/$plugin/." "$copy"
  quiet "$1/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "$copy"
  rm -rf "$copy"
}
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: preparing $venv on /usr/bin/python3"
  # Updated in place (never deleted) so a change of pyproject.toml does not pull the venv from
  # under a running test.
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
  quiet "$venv/bin/pip" install -q --disable-pip-version-check -r tools/requirements-dev.txt
  quiet "$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation -e .
  install_plugin "$venv"
  echo "$want" > "$stamp"
fi

newest="$here/.venv-newest"
nstamp="$newest/.imprint-stamp"
nwant="$want $(date -u +%F)"
if [ ! -x "$newest/bin/python" ] || [ "$(cat "$nstamp" 2>/dev/null)" != "$nwant" ]; then
  echo "bootstrap: preparing $newest: the newest PyPI releases of the declared dependencies"
  [ -x "$newest/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$newest"
  pip_newest() { quiet "$newest/bin/pip" install -q --disable-pip-version-check --timeout 30 --retries 2 "$@"; }
  if pip_newest -r tools/requirements-dev.txt &&
     pip_newest --upgrade --upgrade-strategy eager --no-build-isolation -e . &&
     install_plugin "$newest"; then
    echo "$nwant" > "$nstamp"
  elif [ "$(cut -d' ' -f1 "$nstamp" 2>/dev/null)" = "$want" ]; then
    # Same declared range, only the daily refresh failed (PyPI unreachable): say so and go on.
    echo "bootstrap: could not refresh $newest; it keeps the releases resolved on $(cut -d' ' -f2 "$nstamp")"
  else
    echo "bootstrap: cannot prepare $newest (is PyPI reachable?)" >&2
    exit 1
  fi
fi
