"""The sharder's models: the checkpoint it serves, plans for sets of nodes, and the shards those plans need."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import NotFound, SynapseError, Unavailable
from services.common.gpt2.checkpoint import Checkpoint, load_checkpoint
from services.common.gpt2.config import GPT2Config
from services.sharder.footprint import footprint
from services.sharder.placement import NodeCapacity, plan_placement
from services.sharder.random_weights import known_shape, random_checkpoint
from services.sharder.shards import ShardManifest, read_index, shard_id, write_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStage:
    node_id: str
    manifest: ShardManifest


def load_model(source: str, *, random_fallback: bool) -> Checkpoint:
    """The checkpoint at `source`; offline with random_fallback, a random GPT-2 of the same shape, labelled."""
    try:
        return load_checkpoint(source)
    except Unavailable as error:
        config = known_shape(source)
        if not random_fallback or config is None:
            raise
        log.warning("hub_unreachable_using_random_weights", extra={"model": source, "why": str(error)})
        print(
            f"\n*** the Hugging Face hub cannot be reached ({source}); serving a RANDOM-WEIGHT GPT-2 of the "
            "same shape: its text is gibberish. Pass a local checkpoint folder for real output. ***\n",
            flush=True,
        )
        return random_checkpoint(config, source)


class Catalog:
    """One served model and its shard folder; shards for planned ranges are written on first need."""

    def __init__(self, checkpoint: Checkpoint, shards_dir: Path, dtype: str) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.folder = shards_dir / checkpoint.model_id.replace("/", "--")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    @property
    def config(self) -> GPT2Config:
        return self.checkpoint.config

    def manifests(self) -> list[ShardManifest]:
        try:
            return list(read_index(self.folder).shards)
        except NotFound:
            return []
        except SynapseError as error:
            log.warning("shard_index_unreadable", extra={"folder": str(self.folder), "error": str(error)})
            return []

    def current(self) -> list[ShardManifest]:
        """The folder's shards cut from this very checkpoint. A shard of the same model name and range cut from
        other weights (the folder's checkpoint changed since) is stale: logged here, rewritten when planned."""
        fresh = []
        for manifest in self.manifests():
            if manifest.source_sha256 == self.checkpoint.fingerprint:
                fresh.append(manifest)
            else:
                log.warning(
                    "shard_stale",
                    extra={"shard": manifest.shard_id, "was": manifest.source_sha256[:12] or "unknown",
                           "now": self.checkpoint.fingerprint[:12]},
                )  # fmt: skip
        return fresh

    def manifest(self, wanted_shard_id: str) -> ShardManifest:
        for manifest in self.current():
            if manifest.shard_id == wanted_shard_id:
                return manifest
        raise NotFound(f"no shard {wanted_shard_id!r} for model {self.model_id}; ask Plan for one first")

    def shard_path(self, manifest: ShardManifest) -> Path:
        return self.folder / manifest.file

    def manifest_path(self, manifest: ShardManifest) -> Path:
        return self.folder / f"{manifest.shard_id}.json"

    async def plan(self, nodes: list[NodeCapacity]) -> tuple[list[PlannedStage], list[str]]:
        """Place the model on the nodes and make sure each planned range has a shard; returns unused nodes."""
        assignments = plan_placement(footprint(self.config, self.dtype), nodes)
        async with self._lock:  # one writer at a time per folder
            have = {(m.layer_start, m.layer_end, m.dtype): m for m in self.current()}
            missing = [(a.start, a.end) for a in assignments if (a.start, a.end, self.dtype) not in have]
            if missing:
                written = await asyncio.to_thread(
                    write_shards, self.checkpoint, missing, self.folder, dtype=self.dtype, progress=False
                )
                have.update({(m.layer_start, m.layer_end, m.dtype): m for m in written})
        planned = [PlannedStage(a.node_id, have[(a.start, a.end, self.dtype)]) for a in assignments]
        used = {a.node_id for a in assignments}
        return planned, sorted(n.node_id for n in nodes if n.node_id not in used)

    def expected_shard_id(self, start: int, end: int) -> str:
        return shard_id(self.model_id, start, end, self.dtype)
