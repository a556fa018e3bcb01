#!/usr/bin/env bash
# Installs what benches/compare/compare.py needs for the full head-to-head into a private venv
# (benches/compare/.venv, gitignored): numpy, the ringfeed Python client from this checkout,
# PyTorch + torchvision, matplotlib and NVIDIA DALI (CPU pipeline; the CUDA 12 wheel installs
# and runs without a GPU). DALI is optional: when it cannot be installed the comparison runs
# without it and says why. Also builds the release daemon. Usage: bash benches/compare/setup.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" numpy matplotlib torch torchvision
"${pip[@]}" "$root/clients/python"
if ! "${pip[@]}" nvidia-dali-cuda120; then
    echo "setup: nvidia-dali-cuda120 could not be installed; compare.py will skip DALI" >&2
fi

(cd "$root" && cargo build --release)
echo "setup: done; run: $venv/bin/python $here/compare.py"
