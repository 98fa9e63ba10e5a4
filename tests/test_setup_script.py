"""scripts/setup.sh picks the torch build for the machine: run with a fake nvidia-smi on PATH and
a stub python whose venv and pip only record their arguments (nothing is installed)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0"

STUB_PYTHON = """#!/bin/sh
# stub python: `-m venv DIR` makes DIR/bin/python this stub; pip records its arguments
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0 ;;
  "-m pip") shift 2
    # STUB_PIP_AWAITS: pip waits (at most 10 s) until that text is in the log
    i=0
    while [ -n "$STUB_PIP_AWAITS" ] && ! grep -q -- "$STUB_PIP_AWAITS" "$STUB_LOG" 2>/dev/null && [ $i -lt 100 ]; do
      sleep 0.1; i=$((i + 1))
    done
    echo "$*" >> "$STUB_LOG"; exit 0 ;;
esac
if [ "$1" = "-c" ]; then
  case "$2" in
    *urlopen*) echo "probe $3" >> "$STUB_LOG"; [ -n "$STUB_INDEX_UP" ] && exit 0; exit 1 ;;
    *"print("*) echo "torch stub"; exit 0 ;;
    *"import torch"*) [ -n "$STUB_HAS_TORCH" ] && exit 0; exit 1 ;;
  esac
fi
exit 0
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_setup(tmp_path, *, cuda: str | None = None, index_up: bool = True, has_torch: bool = False,
              env: dict | None = None, extras: str = "") -> tuple[list[str], str]:
    """(pip argument lines, stderr) of setup.sh in a copy of the repository layout under tmp_path."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "python3", STUB_PYTHON)
    if cuda is not None:
        _executable(bin_dir / "nvidia-smi",
                    "#!/bin/sh\necho '+-----------------------------------------------------------+'\n"
                    f"echo '| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: {cuda}     |'\n")
    log = tmp_path / "pip.log"
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "HOME": str(tmp_path),
                "STUB_INDEX_UP": "1" if index_up else "", "STUB_HAS_TORCH": "1" if has_torch else "",
                **(env or {})}
    done = subprocess.run(["bash", str(repo / "scripts" / "setup.sh"), *([extras] if extras else [])],
                          env=full_env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    quiet = "install --quiet --disable-pip-version-check "
    return [line.replace(quiet, "") for line in lines], done.stderr


def test_cpu_machine_gets_the_cpu_build_from_the_pytorch_cpu_index(tmp_path):
    lines, err = run_setup(tmp_path)
    assert lines == ["probe https://download.pytorch.org/whl/cpu", CPU_INDEX, "-e ."]
    assert "torch stub" in err


def test_cpu_index_unreachable_falls_back_to_the_pinned_torch(tmp_path):
    lines, err = run_setup(tmp_path, index_up=False, extras="test")
    assert lines == ["probe https://download.pytorch.org/whl/cpu", "torch==2.13.0", "-e .[test]"]
    assert "cannot be reached" in err


@pytest.mark.parametrize(("cuda", "build"), [("12.4", "cu124"), ("12.2", "cu121"), ("12.9", "cu128"),
                                             ("13.0", "cu130"), ("11.8", "cu118"), ("12.6", "cu126")])
def test_gpu_machine_gets_the_cuda_build_its_driver_runs(tmp_path, cuda, build):
    lines, err = run_setup(tmp_path, cuda=cuda)
    assert lines[1] == f"--index-url https://download.pytorch.org/whl/{build} torch==2.13.0"
    assert f"choosing the {build} build" in err


def test_driver_older_than_every_cuda_build_gets_the_cpu_build_and_a_warning(tmp_path):
    lines, err = run_setup(tmp_path, cuda="11.4")
    assert lines[1] == CPU_INDEX
    assert "WARNING" in err and "11.4" in err


@pytest.mark.parametrize(("value", "want"), [
    ("cu118", "--index-url https://download.pytorch.org/whl/cu118 torch==2.13.0"),
    ("cpu", CPU_INDEX),
    ("torch==2.12.0 --no-deps", "torch==2.12.0 --no-deps"),
])
def test_loralab_torch_overrides_the_choice(tmp_path, value, want):
    lines, _ = run_setup(tmp_path, cuda="12.4", env={"LORALAB_TORCH": value})
    assert want in lines and not any("cu124" in line for line in lines)


def test_an_installed_torch_is_kept(tmp_path):
    lines, _ = run_setup(tmp_path, cuda="12.4", has_torch=True)
    assert lines == ["-e ."]


STUB_APT = """#!/bin/sh
echo "apt $*" >> "$STUB_LOG"
[ "$1" = install ] || exit 0
# the install ends once pip has installed loralab (or after 10 s): it ran beside pip
i=0
while ! grep -q -- "-e .\\[test\\]" "$STUB_LOG" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "apt done" >> "$STUB_LOG"
exit "$STUB_APT_CODE"
"""


@pytest.mark.parametrize("apt_code", [0, 100])
def test_the_test_extra_installs_chromium_and_gxx_with_apt_beside_pip(tmp_path, apt_code):
    """A machine without chromium and g++ (a PATH of the script's own tools only) gets them
    from apt, which runs while pip installs; an apt that fails is reported, not fatal."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("bash", "sh", "dirname", "sed", "head", "id", "mkdir", "cp", "sleep", "cat", "grep"):
        (tools / name).symlink_to(shutil.which(name))
    _executable(tools / "apt-get", STUB_APT)
    if shutil.which("id") is None or int(subprocess.check_output(["id", "-u"])) != 0:
        pytest.skip("setup.sh runs apt only as root")
    lines, err = run_setup(tmp_path, index_up=False, extras="test",
                           env={"PATH": f"{tmp_path / 'bin'}:{tools}", "STUB_APT_CODE": str(apt_code),
                                "STUB_PIP_AWAITS": "apt install"})
    # pip installs once apt's install has started, and apt's ends after pip's: the two overlap
    assert [line for line in lines if line.startswith("apt")] == \
        ["apt update -qq", "apt install -y -qq chromium g++", "apt done"]
    assert [line for line in lines if not line.startswith("apt")] == \
        ["probe https://download.pytorch.org/whl/cpu", "torch==2.13.0", "-e .[test]"]
    assert lines.index("apt install -y -qq chromium g++") < lines.index("torch==2.13.0") and lines[-1] == "apt done"
    assert ("could not install chromium g++" in err) == (apt_code != 0)
