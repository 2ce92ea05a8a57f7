#!/usr/bin/env bash
# Installs everything Synapse and its tests need on a fresh Debian machine; safe to run again.
# Used by `make run` and `make test` (and so by .ci/run). Runs apt-get as root, or through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Debian package -> a file it installs (present = nothing to do).
declare -A APT_PACKAGES=(
    [redis-server]=/usr/bin/redis-server
    [chromium]=/usr/bin/chromium
    [nodejs]=/usr/bin/node
    # Mesa's Vulkan driver (lavapipe): wgpu-py gets an adapter with shader-f16 for the f16 kernel tests.
    [mesa-vulkan-drivers]=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
    # The deployment tests (tests/deploy/): a base image without a registry (debootstrap), promtool for the
    # Prometheus config and alert rules, haproxy to check the load balancer's config.
    [debootstrap]=/usr/sbin/debootstrap
    [prometheus]=/usr/bin/promtool
    [haproxy]=/usr/sbin/haproxy
)

missing=()
for package in "${!APT_PACKAGES[@]}"; do
    path=${APT_PACKAGES[$package]}
    # nodejs may come from elsewhere (nodesource): any `node` on the PATH will do.
    if [[ $package == nodejs ]] && command -v node >/dev/null; then continue; fi
    [[ -e $path ]] || missing+=("$package")
done
# Compose for the deployment tests, where Docker is installed: the v2 plugin if present, else Debian's 1.29.
if command -v docker >/dev/null && ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    missing+=(docker-compose)
fi
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# torch first and pinned: an unpinned torch pulls a newer multi-GB build.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[test]"

bash ops/provision-vocab.sh
echo "setup: done"
