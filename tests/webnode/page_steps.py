"""What the page tests share: the tiny GPT-2 they shard, AssignShard and Plan through the real services, and
Scenario, which runs the same steps on a page (through the gateway) and on the PyTorch reference stage.

The fixtures these use (checkpoint_dir, sharder, gateway, client) are in conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from services.common.gpt2.config import GPT2Config
from services.common.gpt2.model import GPT2Stage, KVCache
from services.common.model_config_pb import model_config_to_pb
from services.common.pb import common_pb2, gateway_pb2, sharder_pb2
from services.sharder.shards import read_shard
from services.wire import syn1
from services.wire.gateway_client import GatewayClient
from services.wire.steps import Step, TokenInput
from tests.checkpoints import torch_tensors
from tests.integration.gateway_fixtures import RunningGateway, frames_step, stage
from tests.webnode.conftest import SHAPE, NodePage, Sharder

TOP_K = 5
MAX_RELATIVE_ERROR = 1e-3
FAST = dict(speed=50)  # skip the start-up benchmark (test_hello_reports_benchmark_and_adapter runs it)


async def plan(sharder: Sharder, nodes: int) -> list[sharder_pb2.Assignment]:
    capacities = [common_pb2.NodeCapacity(node_id=f"n{i}", memory_bytes=1 << 30, speed=100.0) for i in range(nodes)]
    response = await sharder.stub.Plan(sharder_pb2.PlanRequest(nodes=capacities), timeout=60)
    return list(response.assignments)


async def assign(
    gateway: RunningGateway,
    node: str,
    assignment: sharder_pb2.Assignment,
    *,
    top_k: int,
    dtype: int = common_pb2.DTYPE_FLOAT32,
    **urls: str,
) -> None:
    request = gateway_pb2.AssignShardRequest(
        config=model_config_to_pb(GPT2Config(**SHAPE)), node_id=node, shard_id=assignment.shard_id,
        layers=assignment.layers,
        shard_url=urls.get("shard_url", assignment.shard_url),
        manifest_url=urls.get("manifest_url", assignment.manifest_url),
        sha256=assignment.sha256, size_bytes=assignment.size_bytes, top_k=top_k, activation_dtype=dtype,
    )  # fmt: skip
    await gateway.stub.AssignShard(request, timeout=10)


async def assign_and_wait(page: NodePage, gateway: RunningGateway, node: str, assignment, **options) -> dict:
    loads = (await page.state())["loads"]
    await assign(gateway, node, assignment, **options)
    return await page.wait_for(f"s.state === 'ready' && s.loads === {loads + 1}", 120)


def reference_stage(sharder: Sharder, assignment: sharder_pb2.Assignment) -> GPT2Stage:
    """GPT2Stage in float32 on the shard's own (f16-rounded) weights."""
    manifest = sharder.catalog.manifest(assignment.shard_id)
    tensors = torch_tensors(read_shard(manifest, sharder.catalog.folder))  # numpy arrays: the sharder has no torch
    return GPT2Stage.from_tensors(manifest.config, manifest.layer_start, manifest.layer_end, tensors)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - expected)) / np.max(np.abs(expected)))


@dataclass
class Scenario:
    """The same steps on the page (through the gateway) and on the reference stage, request by request."""

    client: GatewayClient
    node: str
    reference: GPT2Stage
    caches: dict[int, KVCache] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)

    async def step(self, new: dict[int, object]) -> list[tuple[syn1.Frame, torch.Tensor]]:
        """new: request id -> token ids (first stage) or activations (T, n_embd); (page frame, reference)."""
        ref = self.reference
        route = [stage(self.node, ref.start, ref.end)]
        positions = {rid: self.lengths.get(rid, 0) for rid in new}
        if ref.is_first:
            tokens_in = tuple(TokenInput(rid, positions[rid], tokens) for rid, tokens in new.items())
            request = Step(tuple(route), tokens=tokens_in)
            inputs = [torch.tensor(tokens) for tokens in new.values()]
        else:
            frames = [syn1.Frame.activation(rid, positions[rid], hidden) for rid, hidden in new.items()]
            request = frames_step(route, syn1.encode_frames(frames))
            inputs = [torch.from_numpy(hidden) for hidden in new.values()]
        response = await self.client.step(request, 120)
        caches = [self.caches.setdefault(rid, ref.new_cache()) for rid in new]
        expected = ref(inputs, caches, last_only=True)
        for rid, tokens in new.items():
            self.lengths[rid] = positions[rid] + len(tokens)
        frames = syn1.decode_frames(response.frames)
        assert [frame.request_id for frame in frames] == list(new)
        for frame, rid in zip(frames, new, strict=True):
            last = positions[rid] + len(new[rid]) - 1
            assert frame.position == (last if ref.is_last else positions[rid])
        return list(zip(frames, expected, strict=True))

    async def run(self, first_id: int, hidden_rng: np.random.Generator | None = None):
        """Prefill two requests (7 and 3 tokens) in one step, then 3 decode steps of both; every pair."""
        lengths = {first_id: 7, first_id + 1: 3}
        pairs = []
        for step in range(4):
            new = {}
            for rid, length in lengths.items():
                rows = length if step == 0 else 1
                if self.reference.is_first:
                    new[rid] = [int(t) for t in (np.arange(rows) * 4099 + 31 * rid + 997 * step) % SHAPE["vocab_size"]]
                else:
                    new[rid] = hidden_rng.standard_normal((rows, SHAPE["n_embd"])).astype(np.float32)
            pairs += await self.step(new)
        return pairs
