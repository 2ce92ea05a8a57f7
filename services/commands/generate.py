"""`synapse generate "prompt"`: stream generated text to the terminal."""

from __future__ import annotations

import argparse
import sys

HELP = "Generate text from a prompt through the router, streaming it to the terminal."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--router", default="127.0.0.1:50050", help="router gRPC address (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stats", action="store_true", help="print timing and usage at the end")
    parser.add_argument("--token", default=None, help="API token, when the router asks for one")
    parser.add_argument("--tls-ca", default=None, help="certificate to trust for a router serving TLS")


def run(args: argparse.Namespace) -> int:
    import grpc

    from services.client import SynapseClient

    last = None
    with SynapseClient(args.router, token=args.token, tls_ca=args.tls_ca) as client:
        try:
            sys.stdout.write(args.prompt)
            for response in client.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
            ):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                last = response
        except grpc.RpcError as error:
            print(f"\nsynapse generate: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    if args.stats and last is not None:
        usage = last.usage
        rate = usage.completion_tokens / (usage.total_ms / 1e3) if usage.total_ms else 0.0
        print(
            f"[{usage.completion_tokens} tokens, ttft {usage.time_to_first_token_ms:.1f} ms, "
            f"{rate:.1f} tokens/s, finish {last.finish_reason}]",
            file=sys.stderr,
        )
    return 0
