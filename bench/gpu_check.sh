#!/usr/bin/env bash
# fedseal GPU check: demo-CNN training through fedseal's client path vs a bare PyTorch loop on
# the same tensors (bf16 autocast on a GPU), samples/s and their ratio (goal >= 0.90), plus one
# full secure round with 3 in-process sites. Self-contained: synthetic seeded tensors, no
# downloads. Without a GPU it runs on the CPU (the CI smoke test uses tiny sizes).
#
#   bench/gpu_check.sh                      # defaults: 50,000 samples x 3 epochs, batch 256
#   bench/gpu_check.sh --samples 512 --epochs 1 --batch-size 64 --round-samples 300   # smoke
#
# Prints the card (nvidia-smi, when present), a Markdown table, a "secure round: ok|FAILED" line
# and a "gpu_check-json: {...}" line. Exit 0 when the secure round checks out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' || true
else
  echo "gpu: none visible (nvidia-smi not found); running on the CPU"
fi
exec "$PY" -m bench.gpu_check "$@"
