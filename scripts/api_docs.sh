#!/usr/bin/env bash
# The API reference, generated from the docstrings by pdoc into docs/api (or $1), strict:
# any warning (an annotation pdoc cannot resolve, a module that fails to import) fails the
# build. ./test runs it into a temporary directory; open docs/api/aura.html after
# `scripts/api_docs.sh`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/docs/api}"
cd "$root/src"  # so that "aura" is the package, not the ./aura script
# The public modules (a package's __all__ hides its submodules from pdoc otherwise).
exec "$root/.venv/bin/python" -W error -m pdoc --docformat markdown -o "$out" \
    aura aura.config aura.errors aura.events aura.logs aura.metrics aura.message_id \
    aura.contract aura.catalog aura.db aura.db.tables aura.llm aura.messaging \
    aura.messaging.app aura.messaging.topology aura.messaging.observability
