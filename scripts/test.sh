#!/usr/bin/env bash
# Install everything, then run the test suite (it starts one real vLLM server of the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
