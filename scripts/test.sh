#!/usr/bin/env bash
# Install everything, check the code with ruff (pyproject.toml's [tool.ruff]: lint errors and the format), then run the
# test suite (it starts one real vLLM server of the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The page tests open reports in headless Chromium and the shared-cache tests start redis-server: Debian's
# packages, installed here when missing and apt-get can (as root); otherwise those tests are skipped with the reason.
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing Debian's$missing for the page and shared-cache tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >/dev/null 2>&1 \
    || echo "[test] could not install$missing: those tests will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
