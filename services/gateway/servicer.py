"""gRPC GatewayService: translates protobuf to Hub calls; no logic of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from services.common.node_status import node_status_pb
from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.hub import Hub
from services.wire.control import Assign, dump

_DTYPES = {common_pb2.DTYPE_FLOAT32: "float32", common_pb2.DTYPE_INT8: "int8"}


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def Run(
        self, request_iterator: AsyncIterator[gateway_pb2.RunRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.RunResponse]:
        responses: asyncio.Queue[gateway_pb2.RunResponse | None] = asyncio.Queue()
        steps: set[asyncio.Task[None]] = set()

        async def run_one(step: gateway_pb2.StepRequest) -> None:
            responses.put_nowait(gateway_pb2.RunResponse(step=await self.hub.run_step(step)))

        async def read() -> None:
            async for request in request_iterator:
                if request.WhichOneof("kind") == "step":
                    task = asyncio.create_task(run_one(request.step))
                    steps.add(task)
                    task.add_done_callback(steps.discard)
                elif request.WhichOneof("kind") == "release":
                    await self.hub.release(list(request.release.request_ids), list(request.release.node_ids))
            await asyncio.gather(*steps)
            responses.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:
            reader.cancel()
            for task in list(steps):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def WatchNodes(
        self, request: gateway_pb2.WatchNodesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.NodeEvent]:
        async for record in self.hub.registry.watch():
            yield gateway_pb2.NodeEvent(
                node=node_status_pb(record), gateway_address=record.gateway_address, version=record.version
            )

    async def AssignShard(
        self, request: gateway_pb2.AssignShardRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AssignShardResponse:
        assign = Assign(
            shard_id=request.shard_id,
            layers=(request.layers.start, request.layers.end),
            shard_url=request.shard_url,
            manifest_url=request.manifest_url,
            sha256=request.sha256,
            size_bytes=request.size_bytes,
            top_k=request.top_k,
            activation_dtype=_DTYPES.get(request.activation_dtype, "float16"),
        )
        await self.hub.assign(request, dump(assign))
        return gateway_pb2.AssignShardResponse()
