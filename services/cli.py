"""The `synapse` command: everyday tasks as subcommands, one module each under services/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from services.common.errors import SynapseError
from services.common.logs import setup_logging

# name -> module with HELP, add_arguments(parser) and run(args) -> exit code. Heavy imports live in run().
SUBCOMMANDS = ("up", "node", "generate", "shard", "plan", "certs", "token", "bench", "settings")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synapse", description="Distributed GPT-2 inference.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"services.commands.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging("synapse", level=args.log_level, fmt="text")
    try:
        return args.run(args)
    except SynapseError as error:
        print(f"synapse {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger(__name__).info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
