"""The sharder in-process on loopback: gRPC Plan/GetManifest/ListModels, HTTP shard downloads, health."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.pb import common_pb2, sharder_pb2, sharder_pb2_grpc
from services.common.server import channel
from services.sharder.__main__ import start_sharder
from services.sharder.catalog import Catalog
from services.sharder.settings import SharderSettings
from services.sharder.shards import ShardManifest, read_manifest
from tests.checkpoints import make_random_checkpoint

DEADLINE_S = 10.0
N_LAYER = 3
MODEL = "tiny-gpt2"
SERVICE = "synapse.v1.ShardService"
ROOMY = 1 << 20  # bytes: the tiny model whole is ~85 KiB in float16


@dataclass
class Sharder:
    stub: sharder_pb2_grpc.ShardServiceStub
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession
    base_url: str  # http://127.0.0.1:<port>
    catalog: Catalog


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, n_layer=N_LAYER)


@pytest.fixture
async def sharder(checkpoint_dir: Path, tmp_path: Path) -> AsyncIterator[Sharder]:
    settings = SharderSettings(
        host="127.0.0.1",
        port=0,
        http_host="127.0.0.1",
        http_port=0,
        metrics_port=None,
        shutdown_grace_s=0.5,
        model=str(checkpoint_dir),
        shards_dir=tmp_path / "shards",
    )
    server, runner, catalog = await start_sharder(settings)
    http_port = runner.addresses[0][1]
    try:
        async with channel(server.address) as opened, aiohttp.ClientSession() as http:
            stub = sharder_pb2_grpc.ShardServiceStub(opened)
            yield Sharder(stub, opened, http, f"http://127.0.0.1:{http_port}", catalog)
    finally:
        await server.stop()
        await runner.cleanup()


def node(node_id: str, memory_bytes: int = ROOMY, speed: float = 1.0) -> common_pb2.NodeCapacity:
    return common_pb2.NodeCapacity(node_id=node_id, memory_bytes=memory_bytes, speed=speed)


async def plan(sharder: Sharder, *nodes: common_pb2.NodeCapacity, model_id: str = "") -> sharder_pb2.PlanResponse:
    return await sharder.stub.Plan(sharder_pb2.PlanRequest(model_id=model_id, nodes=nodes), timeout=DEADLINE_S)


async def planned_shard(sharder: Sharder) -> tuple[sharder_pb2.Assignment, bytes]:
    """Plan two nodes and return the first stage's assignment and its file's bytes, read from disk."""
    assignment = (await plan(sharder, node("a"), node("b"))).assignments[0]
    return assignment, (sharder.catalog.folder / f"{assignment.shard_id}.safetensors").read_bytes()


async def status_of(call: grpc.aio.UnaryUnaryCall) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


# --- gRPC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
async def test_plan_covers_every_layer_and_describes_the_shards_on_disk(sharder: Sharder, n_nodes: int) -> None:
    response = await plan(sharder, *[node(f"node-{i}") for i in range(n_nodes)])
    assert response.model_id == MODEL
    assert (response.config.n_layer, response.config.n_embd, response.config.vocab_size) == (N_LAYER, 32, 97)
    assert not response.unused_node_ids
    starts = [a.layers.start for a in response.assignments]
    ends = [a.layers.end for a in response.assignments]
    assert len(response.assignments) == n_nodes
    assert starts[0] == 0 and ends[-1] == N_LAYER and starts[1:] == ends[:-1]
    assert sorted(a.node_id for a in response.assignments) == [f"node-{i}" for i in range(n_nodes)]
    for assignment in response.assignments:
        manifest = read_manifest(sharder.catalog.folder / f"{assignment.shard_id}.json")
        data = (sharder.catalog.folder / manifest.file).read_bytes()
        assert (manifest.layer_start, manifest.layer_end) == (assignment.layers.start, assignment.layers.end)
        assert assignment.shard_url == f"{sharder.base_url}/shards/{manifest.shard_id}.safetensors"
        assert assignment.manifest_url == f"{sharder.base_url}/shards/{manifest.shard_id}.json"
        assert assignment.size_bytes == manifest.byte_size == len(data)
        assert assignment.sha256 == manifest.sha256 == hashlib.sha256(data).hexdigest()
        async with sharder.http.get(assignment.shard_url) as reply:
            assert hashlib.sha256(await reply.read()).hexdigest() == assignment.sha256


async def test_plan_with_more_nodes_than_layers_leaves_standby_nodes(sharder: Sharder) -> None:
    response = await plan(sharder, *[node(f"node-{i}", speed=1.0 + i) for i in range(N_LAYER + 2)])
    assert [a.layers.end - a.layers.start for a in response.assignments] == [1] * N_LAYER
    assert list(response.unused_node_ids) == ["node-0", "node-1"]  # the slowest wait as standby


async def test_plan_for_the_model_by_name_reuses_written_shards(sharder: Sharder) -> None:
    first = await plan(sharder, node("a"), node("b"), model_id=MODEL)
    written = {path: path.stat().st_mtime_ns for path in sharder.catalog.folder.iterdir()}
    again = await plan(sharder, node("b"), node("a"))
    assert [(a.shard_id, a.sha256) for a in again.assignments] == [(a.shard_id, a.sha256) for a in first.assignments]
    assert {path: path.stat().st_mtime_ns for path in sharder.catalog.folder.iterdir()} == written


@pytest.mark.parametrize(
    ("request_kwargs", "code", "message"),
    [
        ({"nodes": []}, grpc.StatusCode.FAILED_PRECONDITION, "no nodes connected"),
        ({"nodes": [node("a", memory_bytes=1000)]}, grpc.StatusCode.RESOURCE_EXHAUSTED, "not enough memory"),
        (
            {"model_id": "gpt2", "nodes": [node("a")]},
            grpc.StatusCode.NOT_FOUND,
            f"model 'gpt2' is not served here; this sharder serves '{MODEL}'",
        ),
        ({"nodes": [node("")]}, grpc.StatusCode.INVALID_ARGUMENT, "every node needs a node_id"),
        ({"nodes": [node("a", speed=0.0)]}, grpc.StatusCode.INVALID_ARGUMENT, "speed must be > 0"),
        ({"nodes": [node("a", speed=float("nan"))]}, grpc.StatusCode.INVALID_ARGUMENT, "speed must be > 0"),
        ({"nodes": [node("a", memory_bytes=0)]}, grpc.StatusCode.INVALID_ARGUMENT, "must be a positive int"),
        ({"nodes": [node("a"), node("a")]}, grpc.StatusCode.INVALID_ARGUMENT, "node 'a' is listed twice"),
    ],
)
async def test_plan_errors_are_statuses_that_say_what_to_do(
    sharder: Sharder, request_kwargs: dict, code: grpc.StatusCode, message: str
) -> None:
    call = sharder.stub.Plan(sharder_pb2.PlanRequest(**request_kwargs), timeout=DEADLINE_S)
    got_code, details = await status_of(call)
    assert got_code == code
    assert message in details
    assert not list(sharder.catalog.folder.iterdir())  # a failed plan writes nothing


async def test_get_manifest_returns_the_stored_manifest_and_its_urls(sharder: Sharder) -> None:
    assignment = (await plan(sharder, node("a"), node("b"))).assignments[1]
    response = await sharder.stub.GetManifest(
        sharder_pb2.GetManifestRequest(shard_id=assignment.shard_id), timeout=DEADLINE_S
    )
    stored = read_manifest(sharder.catalog.folder / f"{assignment.shard_id}.json")
    assert ShardManifest.from_json(response.manifest_json) == stored
    assert response.manifest_json == (sharder.catalog.folder / f"{assignment.shard_id}.json").read_text()
    assert (response.shard_url, response.manifest_url) == (assignment.shard_url, assignment.manifest_url)
    assert stored.is_last and stored.sha256 == assignment.sha256


@pytest.mark.parametrize(
    ("shard_id", "code", "message"),
    [
        (f"{MODEL}-L0-1-float16", grpc.StatusCode.NOT_FOUND, f"no shard '{MODEL}-L0-1-float16'"),
        ("../model", grpc.StatusCode.NOT_FOUND, "no shard '../model'"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "shard_id is empty"),
    ],
)
async def test_get_manifest_of_an_unknown_shard(
    sharder: Sharder, shard_id: str, code: grpc.StatusCode, message: str
) -> None:
    await plan(sharder, node("a"))
    call = sharder.stub.GetManifest(sharder_pb2.GetManifestRequest(shard_id=shard_id), timeout=DEADLINE_S)
    got_code, details = await status_of(call)
    assert (got_code, message in details) == (code, True)


async def test_list_models_shows_the_model_and_its_written_shards(sharder: Sharder) -> None:
    before = await sharder.stub.ListModels(sharder_pb2.ListModelsRequest(), timeout=DEADLINE_S)
    assert [(m.model_id, m.config.n_layer, list(m.shard_ids)) for m in before.models] == [(MODEL, N_LAYER, [])]
    planned = await plan(sharder, node("a"), node("b"))
    after = await sharder.stub.ListModels(sharder_pb2.ListModelsRequest(), timeout=DEADLINE_S)
    assert list(after.models[0].shard_ids) == [a.shard_id for a in planned.assignments]


async def test_health_is_serving_and_reflection_lists_the_service(sharder: Sharder) -> None:
    health = health_pb2_grpc.HealthStub(sharder.channel)
    for service in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(sharder.channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [service.name async for reply in replies for service in reply.list_services_response.service]
    assert SERVICE in names and "grpc.health.v1.Health" in names


# --- HTTP ------------------------------------------------------------------------------------


async def test_get_shard_bytes_match_the_etag_and_the_manifest(sharder: Sharder) -> None:
    assignment, data = await planned_shard(sharder)
    async with sharder.http.get(assignment.shard_url) as reply:
        body = await reply.read()
        assert reply.status == 200
        assert reply.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"' == f'"{assignment.sha256}"'
        assert int(reply.headers["Content-Length"]) == len(body) == assignment.size_bytes
        assert reply.headers["Accept-Ranges"] == "bytes"
        assert reply.headers["Content-Type"] == "application/octet-stream"
        assert reply.headers["Cache-Control"] == "no-cache"
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert "ETag" in reply.headers["Access-Control-Expose-Headers"]
        assert "Content-Range" in reply.headers["Access-Control-Expose-Headers"]
    assert body == data
    async with sharder.http.get(assignment.manifest_url) as reply:
        assert reply.status == 200 and reply.content_type == "application/json"
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert ShardManifest.from_json(await reply.read()).sha256 == assignment.sha256


@pytest.mark.parametrize(
    ("header", "piece"),
    [
        ("bytes=0-99", slice(0, 100)),
        ("bytes=100-299", slice(100, 300)),
        ("bytes=-100", slice(-100, None)),
        ("bytes=1000-", slice(1000, None)),
        ("bytes=5-5", slice(5, 6)),
        ("bytes=200-99999999", slice(200, None)),  # the end is clamped to the file
        ("bytes=-99999999", slice(0, None)),  # a suffix longer than the file is the whole file
    ],
)
async def test_range_requests_return_exactly_the_bytes_asked_for(sharder: Sharder, header: str, piece: slice) -> None:
    assignment, data = await planned_shard(sharder)
    expected = data[piece]
    first = piece.indices(len(data))[0]
    async with sharder.http.get(assignment.shard_url, headers={"Range": header}) as reply:
        assert reply.status == 206
        assert await reply.read() == expected
        assert reply.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
        assert int(reply.headers["Content-Length"]) == len(expected)
        assert reply.headers["ETag"] == f'"{assignment.sha256}"'
        assert reply.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("header", ["bytes=SIZE-", "bytes=SIZE-SIZE", "bytes=-0"])
async def test_unsatisfiable_range_is_416_with_the_size(sharder: Sharder, header: str) -> None:
    assignment, data = await planned_shard(sharder)
    headers = {"Range": header.replace("SIZE", str(len(data)))}
    async with sharder.http.get(assignment.shard_url, headers=headers) as reply:
        assert reply.status == 416
        assert reply.headers["Content-Range"] == f"bytes */{len(data)}"
        assert reply.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("header", ["bytes=0-1,4-5", "bytes=9-3", "items=0-5", "bytes=abc"])
async def test_unsupported_or_invalid_range_sends_the_whole_file(sharder: Sharder, header: str) -> None:
    assignment, data = await planned_shard(sharder)
    async with sharder.http.get(assignment.shard_url, headers={"Range": header}) as reply:
        assert reply.status == 200 and "Content-Range" not in reply.headers
        assert await reply.read() == data


@pytest.mark.parametrize("tag", ['"SHA"', 'W/"SHA"', '"0000", "SHA"', "*"])
async def test_if_none_match_with_the_etag_is_304(sharder: Sharder, tag: str) -> None:
    assignment, _ = await planned_shard(sharder)
    headers = {"If-None-Match": tag.replace("SHA", assignment.sha256)}
    async with sharder.http.get(assignment.shard_url, headers=headers) as reply:
        assert reply.status == 304
        assert await reply.read() == b""
        assert reply.headers["ETag"] == f'"{assignment.sha256}"'
    async with sharder.http.get(assignment.shard_url, headers={"If-None-Match": '"other"'}) as reply:
        assert reply.status == 200


async def test_if_range_resumes_only_the_same_file(sharder: Sharder) -> None:
    """A resume names the bytes it holds by their ETag: the same file sends the rest, another sends it whole."""
    assignment, data = await planned_shard(sharder)
    same = {"Range": "bytes=100-", "If-Range": f'"{assignment.sha256}"'}
    async with sharder.http.get(assignment.shard_url, headers=same) as reply:
        assert reply.status == 206 and await reply.read() == data[100:]
    other = {"Range": "bytes=100-", "If-Range": '"another-file"'}
    async with sharder.http.get(assignment.shard_url, headers=other) as reply:
        assert reply.status == 200 and "Content-Range" not in reply.headers
        assert await reply.read() == data


async def test_head_sends_the_headers_without_the_body(sharder: Sharder) -> None:
    assignment, data = await planned_shard(sharder)
    async with sharder.http.head(assignment.shard_url) as reply:
        assert reply.status == 200
        assert int(reply.headers["Content-Length"]) == len(data)
        assert reply.headers["ETag"] == f'"{assignment.sha256}"'
        assert await reply.read() == b""


async def test_cors_preflight_allows_range_requests_from_any_origin(sharder: Sharder) -> None:
    assignment, _ = await planned_shard(sharder)
    headers = {
        "Origin": "https://node.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range",
    }
    async with sharder.http.options(assignment.shard_url, headers=headers) as reply:
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert "GET" in reply.headers["Access-Control-Allow-Methods"]
        assert "range" in reply.headers["Access-Control-Allow-Headers"].lower()
        assert int(reply.headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize("ext", ["safetensors", "json"])
async def test_unknown_shard_is_404_with_a_clear_body(sharder: Sharder, ext: str) -> None:
    await planned_shard(sharder)
    async with sharder.http.get(f"{sharder.base_url}/shards/{MODEL}-L0-3-float32.{ext}") as reply:
        assert reply.status == 404
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert await reply.text() == f"no shard '{MODEL}-L0-3-float32' for model {MODEL}; ask Plan for one first"


async def raw_get(sharder: Sharder, path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (clients normalise '..' and '%2e' away)."""
    port = int(sharder.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "path",
    [
        "/shards/../model.json",
        "/shards/model.json",
        "/shards/%2e%2e/model.json",
        "/shards/..%2fmodel.json",
        "/shards/%2e%2e%2f%2e%2e%2fconfig.json",
        "/shards/..%2f..%2f..%2fetc%2fpasswd.json",
        "/shards/....json",
        "/shards/SHARD/../../model.json",
        "/../../etc/passwd",
        "/shards/%2Fetc%2Fpasswd.json",
    ],
)
async def test_path_traversal_is_rejected(sharder: Sharder, path: str) -> None:
    assignment, _ = await planned_shard(sharder)
    status, body = await raw_get(sharder, path.replace("SHARD", assignment.shard_id))
    assert status in (400, 404)
    assert b'"format_version"' not in body and b"root:" not in body and b"n_layer" not in body


async def test_healthz(sharder: Sharder) -> None:
    async with sharder.http.get(f"{sharder.base_url}/healthz") as reply:
        assert (reply.status, await reply.text()) == (200, "ok\n")
