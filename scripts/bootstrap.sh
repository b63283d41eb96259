#!/usr/bin/env bash
# Creates .venv with Python 3.11+ and installs the project (and, with --dev, its test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
py=""
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py=$candidate; break
  fi
done
[ -n "$py" ] || { echo "Python 3.11 or newer is required" >&2; exit 1; }
if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
extra=""; [ "${1:-}" = "--dev" ] && extra="[dev]"
# Installed once per pyproject.toml (and extra): a later start needs no package index (an office with no
# internet restarts its service). A changed pyproject.toml, or a missing stamp, installs again.
stamp=".venv/.installed${extra:+-dev}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
for done in "$stamp" .venv/.installed-dev; do  # the test tools' install has the service's too
  if [ -f "$done" ] && [ "$(cat "$done")" = "$want" ] && .venv/bin/python -c 'import main' >/dev/null 2>&1; then
    exit 0
  fi
done
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extra}"
echo "$want" > "$stamp"
