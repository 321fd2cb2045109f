#!/usr/bin/env bash
# Check that the declared dependency floors are true: install the lowest Hugging Face versions
# pyproject.toml allows into a throwaway venv (on top of this machine's torch) and run the tests
# that exercise them (Trainer loss scaling, warm-up, resume, PEFT, decoding, loading).
#
#   bash scripts/check_floors.sh [pytest args...]
#
# torch itself is not downgraded (its floor, 2.5, is a multi-GB download): the venv reuses the
# installed torch (and the other packages) through --system-site-packages. Needs pip access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$(mktemp -d "${TMPDIR:-/tmp}/unbackdoor-floors.XXXXXX")
trap 'rm -rf "$VENV"' EXIT
floors=$("$PY" - <<'EOF'
import re
deps = re.search(r"dependencies = \[(.*?)\]", open("pyproject.toml").read(), re.S).group(1)
pins = [f"{n}=={v}" for n, v in re.findall(r'"([a-z_-]+)>=([0-9.]+)', deps)
        if n in ("transformers", "peft", "accelerate", "safetensors", "tokenizers")]
print(" ".join(pins))
EOF
)
echo "[floors] $floors (torch: $("$PY" -c 'import torch; print(torch.__version__)'), reused)"
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-deps $floors
"$VENV/bin/python" -c 'import transformers, peft, accelerate; print("[floors] running on transformers",
    transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
PYTHONPATH="$PWD/src" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/lm/test_sft.py tests/lm/test_crow.py tests/lm/test_decoding.py tests/lm/test_models.py \
    tests/lm/test_evaluate.py tests/reliability/test_folder_files.py tests/test_requirements.py "$@"
