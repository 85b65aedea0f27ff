#!/usr/bin/env bash
# Installs everything imprint's demo and tests need on a Debian 12 machine, then
# prepares .venv on Debian's own python3 (with its system packages visible), so the
# agent is exercised on the same python3-cryptography/-requests it meets in images.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

debs=(python3 python3-venv python3-pip python3-cryptography python3-requests
      python3-pyroute2 python3-pycdlib openssl ca-certificates iproute2
      mtools dosfstools genisoimage xorriso cloud-init openssh-server openssh-client
      krb5-kdc krb5-admin-server krb5-user)

bash "$here/tools/apt-ensure.sh" bootstrap "${debs[@]}"

venv="$here/.venv"
stamp="$venv/.imprint-stamp"
want="$(sha256sum pyproject.toml tools/requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: preparing $venv on /usr/bin/python3"
  # Updated in place (never deleted) so a change of pyproject.toml does not pull the venv from
  # under a running test.
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
  quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
  quiet "$venv/bin/pip" install -q --disable-pip-version-check -r tools/requirements-dev.txt
  quiet "$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
