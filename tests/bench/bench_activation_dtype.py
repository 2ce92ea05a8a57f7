"""int8 activations (per-row scales) against f16 on GPT-2 124M split in two: greedy agreement over 256 tokens
and the largest logit error. Prints figures; never fails on them.

    python tests/bench/bench_activation_dtype.py [--model gpt2-or-folder] [--tokens 256]

Without --model it builds a random-weight GPT-2 124M (transformers, seeded) in a temporary folder.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.common.gpt2.checkpoint import load_checkpoint
from tests.activation_wire import compare
from tests.checkpoints import make_random_checkpoint

PROMPTS = {
    "plain": [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    "repetitive": [464, 2068, 7586, 21831, 11, 464, 2068, 7586, 21831, 11],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or hub name (default: random 124M)")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = args.model or make_random_checkpoint(
            Path(folder) / "gpt2-124m-random", n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
            n_positions=1024, seed=0,
        )  # fmt: skip
        checkpoint = load_checkpoint(source, progress=False)
        print(f"machine: {platform.processor() or platform.machine()}, model: {source}, split 6+6 layers")
        print("| prompt | wire | greedy tokens same as f16 (of N) | teacher-forced agreement | max logit error |")
        print("|---|---|---|---|---|")
        for name, prompt in PROMPTS.items():
            started = time.perf_counter()
            result = compare(checkpoint, prompt, args.tokens, "int8")
            print(
                f"| {name} | int8 | {result.same_prefix} of {result.tokens} | {result.agreement:.4f} | "
                f"{result.max_logit_error:.4f} |  ({time.perf_counter() - started:.0f} s)"
            )


if __name__ == "__main__":
    main()
