#!/usr/bin/env bash
# Set up loralab in ./.venv on a fresh machine: `bash scripts/setup.sh [EXTRAS]`
# (EXTRAS e.g. "test" or "report,ray"). Safe to re-run; it only installs what is missing.
#
# torch: an existing torch in the venv is kept (a GPU user's CUDA build stays). Otherwise a
# machine with an NVIDIA driver gets the default (CUDA) wheel and any other machine the CPU
# build pinned below; set LORALAB_TORCH to choose yourself, e.g. LORALAB_TORCH="torch==2.13.0".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${LORALAB_TORCH:-}" ]; then
    "${pip[@]}" "$LORALAB_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" "torch==2.13.0"   # the CPU build on this project's machines
  fi
fi
if [ -n "$extras" ]; then "${pip[@]}" -e ".[$extras]"; else "${pip[@]}" -e .; fi
# The test extra opens the study report in headless Chromium (tests/test_report_browser.py):
# Debian's chromium package, installed where apt runs as root; elsewhere that test is skipped.
case ",$extras," in
  *,test,*)
    if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "chromium could not be installed: the browser check of the report will be skipped" >&2
    fi ;;
esac
echo "loralab is installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
