#!/usr/bin/env bash
# Install everything, then judge a handful of real pairs with ReflectRM on the embedded model (vLLM, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/reflectagent judge --sample --limit "${LIMIT:-8}" --program reflectrm "$@"
