#!/usr/bin/env bash
# Install everything, then run the test suite (it starts one real vLLM server of the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The page tests open reports in headless Chromium: Debian's package, installed here when it is missing and
# apt-get can (as root); otherwise those tests are skipped with the reason.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing Debian's chromium for the page tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "[test] could not install chromium: the page tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
