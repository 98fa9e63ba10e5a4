#!/usr/bin/env bash
# Set up loralab in ./.venv on a fresh machine: `bash scripts/setup.sh [EXTRAS]`
# (EXTRAS e.g. "test" or "report,ray"). Safe to re-run; it only installs what is missing.
#
# torch (docs/gpu.md, "Set-up"): an existing torch in the venv is kept (a GPU user's CUDA build
# stays). Otherwise:
#   * a machine where nvidia-smi reports a driver gets the CUDA build of torch $TORCH_VERSION that
#     matches the driver: the newest of cu118 cu121 cu124 cu126 cu128 cu130 not above the
#     driver's "CUDA Version", from https://download.pytorch.org/whl/cuXXX;
#   * any other machine gets the CPU build from https://download.pytorch.org/whl/cpu (a few
#     hundred MB, not the multi-GB CUDA build PyPI serves on Linux).
#   If that index cannot be reached within a few seconds (machines that reach only PyPI, such as
#   this project's CI), torch==$TORCH_VERSION comes from the configured index instead.
# LORALAB_TORCH overrides the choice: "cpu" or "cu126" (a build from the PyTorch index), or any
# pip arguments, e.g. LORALAB_TORCH="torch==2.13.0" or "torch --index-url https://my.mirror/simple".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${LORALAB_TORCH_INDEX:-https://download.pytorch.org/whl}
CUDA_BUILDS="118 121 124 126 128 130"   # the CUDA builds the PyTorch index carries, oldest first

# The test extra opens the study report in headless Chromium (tests/test_report_browser.py):
# Debian's chromium package, installed where apt runs as root; elsewhere that test is skipped.
# It also compiles decoder layers for real (tests/test_compiled.py, train.compile): inductor's
# CPU backend needs a C++ compiler, Debian's g++ where none is on PATH. apt works beside pip
# (pip's unpacking and byte-compiling keep one core busy; apt mostly waits on downloads).
wanted=() apt_pid=""
case ",$extras," in
  *,test,*)
    command -v chromium >/dev/null 2>&1 || wanted+=(chromium)
    command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || wanted+=(g++)
    if [ ${#wanted[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${wanted[@]}" >/dev/null) &
      apt_pid=$!
    fi ;;
esac

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# The driver's CUDA version as digits ("12.4" -> 124); empty when there is no working driver.
driver_cuda() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\.\([0-9]\).*/\1\2/p' | head -n 1
}

# The newest CUDA build not above the driver's version ("cu124"); empty when the driver is older than all.
cuda_build() {
  local driver=$1 best="" b
  for b in $CUDA_BUILDS; do
    if [ "$b" -le "$driver" ]; then best="cu$b"; fi
  done
  echo "$best"
}

# Whether an index answers within 5 seconds.
reachable() {
  .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/', timeout=5)" \
    "$1" >/dev/null 2>&1
}

install_build() {  # install_build cpu|cuXXX
  local url="$TORCH_INDEX/$1"
  if reachable "$url"; then
    echo "installing torch $TORCH_VERSION ($1 build) from $url" >&2
    "${pip[@]}" --index-url "$url" "torch==$TORCH_VERSION"
  else
    echo "$url cannot be reached; installing torch==$TORCH_VERSION from the configured index" >&2
    "${pip[@]}" "torch==$TORCH_VERSION"
  fi
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  case "${LORALAB_TORCH:-}" in
    cpu | cu[0-9]*) install_build "$LORALAB_TORCH" ;;
    "")
      driver=$(driver_cuda)
      if [ -n "$driver" ]; then
        build=$(cuda_build "$driver")
        if [ -n "$build" ]; then
          echo "nvidia-smi: driver supports CUDA ${driver:0:-1}.${driver: -1}; choosing the $build build" >&2
          install_build "$build"
        else
          echo "WARNING: the NVIDIA driver supports only CUDA ${driver:0:-1}.${driver: -1}, older than every" \
               "CUDA build of torch $TORCH_VERSION; installing the CPU build (update the driver for the GPU)" >&2
          install_build cpu
        fi
      else
        install_build cpu
      fi
      ;;
    *) read -r -a custom <<<"$LORALAB_TORCH"; "${pip[@]}" "${custom[@]}" ;;
  esac
fi
if [ -n "$extras" ]; then "${pip[@]}" -e ".[$extras]"; else "${pip[@]}" -e .; fi
if [ -n "$apt_pid" ] && ! wait "$apt_pid"; then
  echo "could not install ${wanted[*]}: the browser check of the report is skipped without chromium," \
       "and train.compile's tests fail without a C++ compiler" >&2
fi
echo "loralab is installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
