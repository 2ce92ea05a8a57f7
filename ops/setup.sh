#!/usr/bin/env bash
# Installs everything Synapse and its tests need on a fresh Debian machine; safe to run again.
# Used by `make run` and `make test` (and so by .ci/run). Runs apt-get as root, or through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(redis-server chromium nodejs npm)

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build on disk here.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install -q "torch==2.13.0" || "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install -q -e ".[test]"

bash ops/provision-vocab.sh
echo "setup: done"
