#!/usr/bin/env bash
# Set up ul3d in a virtual environment: bash scripts/bootstrap.sh [demo|test]
#
# 1. creates .venv (UL3D_VENV overrides) unless it exists;
# 2. installs torch first, pinned (UL3D_TORCH, default torch==2.13.0): on the project's machines
#    pip takes that CPU wheel from local disk, and a pre-installed torch satisfies ul3d's range so
#    pip never resolves a bare "torch" (which can pull a multi-GB CUDA build); elsewhere pip takes
#    the same release from PyPI — set UL3D_TORCH to choose another build;
# 3. installs ul3d in editable mode, with the test extras for "test";
# 4. installs the real demo data (Debian's mricron-data: Colin27 T1 + AAL labels) when it is
#    missing and apt-get can be used; otherwise says how.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-demo}
venv=${UL3D_VENV:-.venv}
torch_spec=${UL3D_TORCH:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip_q() { "$py" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $torch_spec"
  pip_q "$torch_spec"
fi
case "$mode" in
  test) target=".[test]" ;;
  demo) target=".[onnx]" ;;
  *) echo "usage: bash scripts/bootstrap.sh [demo|test]" >&2; exit 2 ;;
esac
echo "bootstrap: installing ul3d$([ "$mode" = test ] && echo ' with test extras')"
pip_q -e "$target"
"$py" -c "import torch, monai, ul3d; print(f'bootstrap: torch {torch.__version__}, monai {monai.__version__}, ul3d {ul3d.__version__}')"

if [ ! -f /usr/share/mricron/templates/ch2.nii.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing mricron-data (Colin27 + AAL)"
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends mricron-data) >/dev/null 2>&1 \
      || echo "bootstrap: could not install mricron-data; tests that need it will skip"
  else
    echo "bootstrap: real data missing; install it with: sudo apt-get install mricron-data"
  fi
fi
