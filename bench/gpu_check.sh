#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): run it whenever a GPU is at hand, and put its figures in
# docs/gpu.md with the date and the GPU.
#   bash bench/gpu_check.sh                # one CUDA GPU, < 8 minutes; JSON to $OUT/gpu_check.json or bench/results/
#   bash bench/gpu_check.sh --cpu-smoke    # any machine, < 2 minutes: every code path at tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$python" bench/gpu_check.py "$@"
