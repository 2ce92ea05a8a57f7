"""`synapse plan`: show where the sharder would place a model's layers on a set of nodes (offline, pure)."""

from __future__ import annotations

import argparse
import json
import math
import re
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from services.sharder.placement import NodeCapacity

if TYPE_CHECKING:
    from services.common.gpt2.config import GPT2Config
    from services.sharder.footprint import ModelFootprint
    from services.sharder.placement import Assignment

HELP = "Print the layer placement of a model on nodes given as ID:MEMORY:SPEED (nothing is loaded)."
NODE_FORMAT = "ID:MEMORY:SPEED, e.g. laptop:4G:900 (memory in bytes or with K/M/G/T; speed in layers/s)"
# "2G", "2Gi", "2GiB" are binary (2 * 1024**3, as `free -h` and Docker read them); "2GB" is SI (2 * 10**9).
_MEMORY = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([kmgt]?)(i?b?)$", re.IGNORECASE)
_PREFIX_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_memory(text: str) -> int:
    """Bytes from "1073741824", "512M", "1.5G", "2GiB" (binary) or "2GB" (SI); > 0."""
    match = _MEMORY.match(text.strip())
    if match is None or (not match.group(2) and match.group(3).lower() not in ("", "b")):
        raise argparse.ArgumentTypeError(
            f"memory {text!r} is not a size: write bytes, or a number with K, M, G or T (binary, 2G = 2 GiB) "
            "or KB, MB, GB, TB (SI, 2GB = 2e9 bytes)"
        )
    number, prefix, suffix = match.groups()
    power = _PREFIX_POWER[prefix.lower()]
    base = 1000 if suffix.lower() == "b" else 1024
    size = int(Decimal(number) * base**power)
    if size < 1:
        raise argparse.ArgumentTypeError(f"memory {text!r} is less than one byte")
    return size


def parse_node(text: str) -> NodeCapacity:
    """ID:MEMORY:SPEED; the id may itself hold colons (the last two fields are split off)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"node {text!r} is not {NODE_FORMAT}")
    node_id, memory, speed_text = parts
    try:
        speed = float(speed_text)
    except ValueError:
        speed = math.nan
    if not (math.isfinite(speed) and speed > 0):
        raise argparse.ArgumentTypeError(f"node {text!r}: speed {speed_text!r} must be a number > 0")
    return NodeCapacity(node_id, parse_memory(memory), speed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="checkpoint folder, config.json file, or a GPT-2 hub name (gpt2, gpt2-medium, ...)",
    )
    parser.add_argument(
        "--node",
        dest="nodes",
        type=parse_node,
        action="append",
        default=[],
        metavar="ID:MEMORY:SPEED",
        help=f"a node, repeated for each: {NODE_FORMAT}",
    )
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="shard dtype")
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=0,
        metavar="N",
        help="KV cache positions each node reserves per layer (batch x context); default 0",
    )


def run(args: argparse.Namespace) -> int:
    from services.common.errors import InvalidArgument
    from services.sharder.footprint import footprint
    from services.sharder.placement import plan_placement

    if not args.nodes:
        raise InvalidArgument(f"no nodes given; pass --node {NODE_FORMAT}, once per node")
    model_id, config = read_config(args.model)
    model_footprint = footprint(config, args.dtype, kv_cache_tokens=args.kv_cache_tokens)
    plan = plan_placement(model_footprint, args.nodes)
    print(f"{model_id}: {config.n_layer} layers, {args.dtype}, KV cache {args.kv_cache_tokens} tokens/layer")
    print(describe(model_footprint, args.nodes, plan))
    return 0


def read_config(source: str) -> tuple[str, GPT2Config]:
    """(model id, config) from a checkpoint folder, a config.json file, or a known hub name's shape."""
    from services.common.errors import InvalidArgument, NotFound
    from services.common.gpt2.config import GPT2Config
    from services.sharder.random_weights import HUB_SHAPES, known_shape

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise NotFound(f"{path} does not exist; pass a checkpoint folder or a config.json file")
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"{path} is not valid JSON: {error}") from error
        name = path.parent.resolve().name if path.name == "config.json" else path.stem
        return name, GPT2Config.from_dict(data)
    config = known_shape(source)
    if config is None:
        raise NotFound(
            f"{source!r} is not a folder, a config.json file or a known GPT-2 shape "
            f"({', '.join(HUB_SHAPES)}); plan runs offline, so other hub models need a local config.json"
        )
    return source, config


def describe(model_footprint: ModelFootprint, nodes: list[NodeCapacity], plan: list[Assignment]) -> str:
    """The plan as a table (one row per stage), its bottleneck, and the nodes left without layers."""
    from services.commands.shard import format_table
    from services.sharder.placement import stage_seconds

    by_id = {node.node_id: node for node in nodes}
    rows = [["stage", "node", "layers", "needs", "memory", "used", "ms/token"]]
    times = []
    for stage, assignment in enumerate(plan):
        node = by_id[assignment.node_id]
        needed = model_footprint.stage_bytes(assignment.start, assignment.end)
        times.append(stage_seconds(model_footprint, node, assignment))
        rows.append(
            [
                str(stage),
                node.node_id,
                f"[{assignment.start}, {assignment.end})",
                human_bytes(needed),
                human_bytes(node.memory_bytes),
                f"{100 * needed / node.memory_bytes:.0f}%",
                f"{1000 * times[-1]:.2f}",
            ]
        )
    slowest = max(range(len(plan)), key=times.__getitem__)
    lines = [
        format_table(rows, numeric={0, 3, 4, 5, 6}),
        f"bottleneck: stage {slowest} ({plan[slowest].node_id}), {1000 * times[slowest]:.2f} ms per token "
        f"= {1 / times[slowest]:.1f} tokens/s with the pipeline full",
    ]
    placed = {assignment.node_id for assignment in plan}
    for node in nodes:
        if node.node_id not in placed:
            too_small = node.memory_bytes < model_footprint.per_layer_bytes
            why = "cannot hold one layer" if too_small else "standby for failover"
            lines.append(f"no layers: {node.node_id} ({why})")
    return "\n".join(lines)


def human_bytes(size: int) -> str:
    """Binary units, matching how --node memory is read: 1536 -> "1.5 KiB"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
