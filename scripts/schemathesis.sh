#!/usr/bin/env bash
# A longer schemathesis run (--checks all, bodies fuzzed) against a running `aura gateway`.
#   AURA_API_KEY=... AURA_TENANT_ID=... scripts/schemathesis.sh http://127.0.0.1:8000 [examples]
# Make the tenant with `aura tenant create fuzz` against the gateway's DATABASE_URL.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="${1:?usage: scripts/schemathesis.sh BASE_URL [MAX_EXAMPLES]}"
examples="${2:-300}"
: "${AURA_API_KEY:?set AURA_API_KEY to the tenant's key}"
: "${AURA_TENANT_ID:?set AURA_TENANT_ID to the tenant's id}"
exec "$root/.venv/bin/schemathesis" --config-file "$root/scripts/schemathesis.toml" \
    run "$base/openapi.json" --checks all --max-examples "$examples" --workers 2
