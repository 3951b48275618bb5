#!/usr/bin/env bash
# The API reference, generated from the docstrings by pdoc into docs/api (or $1), strict:
# any warning (an annotation pdoc cannot resolve, a module that fails to import) fails the
# build. ./test runs it into a temporary directory; open docs/api/aura.html after
# `scripts/api_docs.sh`.
#
# Any Python with the package's dependencies and pdoc will do (pip install '.[platform]'
# pdoc): $PYTHON if set, else the first of the active virtualenv's, python3 and this
# repository's .venv (when it exists) that can import pdoc and aura's dependencies.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/docs/api}"
cd "$root/src"  # so that "aura" is the package, not the ./aura script
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    for candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python"} python3 "$root/.venv/bin/python"; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import pdoc, aura.config, aura.messaging' >/dev/null 2>&1; then
            python="$candidate"
            break
        fi
    done
    if [[ -z "$python" ]]; then
        echo "api_docs.sh: no Python here has pdoc and aura's dependencies" \
            "(pip install '.[platform]' pdoc, or set PYTHON)" >&2
        exit 2
    fi
fi
# The public modules (a package's __all__ hides its submodules from pdoc otherwise).
exec "$python" -W error -m pdoc --docformat markdown -o "$out" \
    aura aura.config aura.errors aura.events aura.logs aura.metrics aura.message_id \
    aura.contract aura.catalog aura.db aura.db.tables aura.llm aura.messaging \
    aura.messaging.app aura.messaging.topology aura.tracing
