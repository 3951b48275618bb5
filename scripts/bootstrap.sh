#!/usr/bin/env bash
# Set-up shared by ./aura and ./test: create .venv if it is missing, (re)install the
# project when pyproject.toml changed since the last install. Silent when up to date.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.aura-install-stamp"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "aura: Python 3.11 or newer is needed (tried '$python'; set PYTHON to another)" >&2
    exit 1
fi
want="$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
echo "aura: setting up .venv (first run, or pyproject.toml changed)..." >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"; } >"$log" 2>&1 \
    || ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e "$root[dev]" >"$log" 2>&1; then
    cat "$log" >&2
    echo "aura: set-up failed (output above)" >&2
    exit 1
fi
echo "$want" >"$stamp"
echo "aura: .venv ready" >&2
