"""gRPC GatewayService: translates protobuf to Hub calls; no logic of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from services.common.node_status import node_event_pb
from services.common.pb import gateway_pb2, gateway_pb2_grpc
from services.gateway.hub import Hub
from services.wire import convert
from services.wire.steps import StepFailed


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def Run(
        self, request_iterator: AsyncIterator[gateway_pb2.RunRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.RunResponse]:
        responses: asyncio.Queue[gateway_pb2.RunResponse | None] = asyncio.Queue()
        steps: set[asyncio.Task[None]] = set()

        async def run_one(request: gateway_pb2.StepRequest) -> None:
            try:
                response = convert.result_to_pb(request.step_id, await self.hub.run_step(convert.step_from_pb(request)))
            except StepFailed as error:  # in band: the stream carries other steps and outlives this one
                response = convert.failure_to_pb(request.step_id, error)
            except ValueError as error:  # a malformed StepRequest (InvalidArgument)
                response = convert.failure_to_pb(request.step_id, StepFailed(f"bad step: {error}"))
            responses.put_nowait(gateway_pb2.RunResponse(step=response))

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
            yield node_event_pb(record)

    async def AssignShard(
        self, request: gateway_pb2.AssignShardRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AssignShardResponse:
        node_id, assign, config = convert.assign_from_pb(request)
        await self.hub.assign(node_id, assign, config)
        return gateway_pb2.AssignShardResponse()
