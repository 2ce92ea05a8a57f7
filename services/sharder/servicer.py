"""gRPC ShardService: Plan, GetManifest, ListModels; protobuf <-> catalog only."""

from __future__ import annotations

import grpc

from services.common.errors import InvalidArgument, NotFound
from services.common.model_config_pb import model_config_to_pb
from services.common.pb import common_pb2, sharder_pb2, sharder_pb2_grpc
from services.sharder.catalog import Catalog
from services.sharder.placement import NodeCapacity


class ShardServicer(sharder_pb2_grpc.ShardServiceServicer):
    def __init__(self, catalog: Catalog, public_url: str) -> None:
        self.catalog = catalog
        self.public_url = public_url.rstrip("/")

    def _check_model(self, model_id: str) -> None:
        if model_id and model_id != self.catalog.model_id:
            raise NotFound(f"model {model_id!r} is not served here; this sharder serves {self.catalog.model_id!r}")

    def _url(self, shard_id: str, ext: str) -> str:
        return f"{self.public_url}/shards/{shard_id}.{ext}"

    async def Plan(
        self, request: sharder_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> sharder_pb2.PlanResponse:
        self._check_model(request.model_id)
        nodes = []
        for node in request.nodes:
            if not node.node_id:
                raise InvalidArgument("every node needs a node_id")
            nodes.append(NodeCapacity(node.node_id, node.memory_bytes, node.speed))
        planned, unused = await self.catalog.plan(nodes)
        response = sharder_pb2.PlanResponse(
            model_id=self.catalog.model_id, config=model_config_to_pb(self.catalog.config), unused_node_ids=unused
        )
        for stage in planned:
            manifest = stage.manifest
            response.assignments.add(
                node_id=stage.node_id,
                layers=common_pb2.LayerRange(start=manifest.layer_start, end=manifest.layer_end),
                shard_id=manifest.shard_id,
                shard_url=self._url(manifest.shard_id, "safetensors"),
                manifest_url=self._url(manifest.shard_id, "json"),
                sha256=manifest.sha256,
                size_bytes=manifest.byte_size,
            )
        return response

    async def GetManifest(
        self, request: sharder_pb2.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> sharder_pb2.GetManifestResponse:
        if not request.shard_id:
            raise InvalidArgument("shard_id is empty; use a shard_id from Plan or ListModels")
        manifest = self.catalog.manifest(request.shard_id)
        return sharder_pb2.GetManifestResponse(
            manifest_json=manifest.to_json(),
            shard_url=self._url(manifest.shard_id, "safetensors"),
            manifest_url=self._url(manifest.shard_id, "json"),
        )

    async def ListModels(
        self, request: sharder_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> sharder_pb2.ListModelsResponse:
        summary = sharder_pb2.ModelSummary(
            model_id=self.catalog.model_id,
            config=model_config_to_pb(self.catalog.config),
            shard_ids=[m.shard_id for m in self.catalog.current()],
        )
        return sharder_pb2.ListModelsResponse(models=[summary])
