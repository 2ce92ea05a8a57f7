"""`synapse settings`: the table of every setting (the README's table is this output)."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

HELP = "Print a Markdown table of every SYNAPSE_* setting of every service (or rewrite the README's)."

SETTINGS_CLASSES = (
    "services.tokenizer.settings:TokenizerSettings",
    "services.sampler.settings:SamplerSettings",
    "services.sharder.settings:SharderSettings",
    "services.gateway.settings:GatewaySettings",
    "services.router.settings:RouterSettings",
    "services.node.settings:NodeSettings",
)
BLOCK = re.compile(r"(<!-- settings:start -->\n).*?(<!-- settings:end -->)", re.DOTALL)


def settings_classes() -> list[type]:
    classes = []
    for spec in SETTINGS_CLASSES:
        module_name, class_name = spec.split(":")
        classes.append(getattr(importlib.import_module(module_name), class_name))
    return classes


def table() -> str:
    from services.common.settings import settings_table

    return settings_table(settings_classes())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--update", type=Path, metavar="README", help="rewrite the table between the markers")


def run(args: argparse.Namespace) -> int:
    if args.update is None:
        print(table())
        return 0
    text = args.update.read_text()
    if not BLOCK.search(text):
        print(f"{args.update} has no <!-- settings:start --> ... <!-- settings:end --> block")
        return 2
    args.update.write_text(BLOCK.sub(lambda m: m.group(1) + table() + "\n" + m.group(2), text))
    return 0
