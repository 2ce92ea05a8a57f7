"""`synapse settings`: print the table of every setting (the README's table is this output)."""

from __future__ import annotations

import argparse
import importlib

HELP = "Print a Markdown table of every SYNAPSE_* setting of every service."

SETTINGS_CLASSES = (
    "services.tokenizer.settings:TokenizerSettings",
    "services.sampler.settings:SamplerSettings",
    "services.sharder.settings:SharderSettings",
    "services.router.settings:RouterSettings",
    "services.gateway.settings:GatewaySettings",
    "services.node.settings:NodeSettings",
)


def settings_classes() -> list[type]:
    classes = []
    for spec in SETTINGS_CLASSES:
        module_name, class_name = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # a service not built yet
        classes.append(getattr(module, class_name))
    return classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    from services.common.settings import settings_table

    del args
    print(settings_table(settings_classes()))
    return 0
