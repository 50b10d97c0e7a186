#!/usr/bin/env bash
# Stage-1 model throughput on one GPU: bench/gpu_bench.py -> bench/results/gpu.json + gpu.md, under 5 minutes on an H200.
# Full-size SD v1.5-shaped models + CLIP RN50 with random weights (nothing is downloaded); batch sizes 16-128,
# fp32 (TF32) / bf16 / fp16, channels_last and torch.compile on and off, each configuration time-boxed.
#
#   bench/gpu.sh                          # needs a CUDA build of torch in .venv, e.g.
#                                         # make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
#   PY=python3 bench/gpu.sh --no-compile  # another interpreter; more options: bench/gpu.sh --help
#
# A hard limit (LIMIT_S, default 290 s) stops the run whatever happens; the results written so far stay.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIMIT_S=${LIMIT_S:-290}
export PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=10 "$LIMIT_S" "$PY" bench/gpu_bench.py --out "${OUT_DIR:-bench/results}" "$@"
