"""The client of a gateway's Run stream, used by the router and by a gateway forwarding to another.

One channel and one bidirectional stream per gateway; many steps in flight at once, matched to
their answers by an id this client chooses. A step returns its StepResult or raises StepFailed,
whatever went wrong: a node's failure reported in band, a timeout, or the stream breaking.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import grpc

from services.common.pb import gateway_pb2, gateway_pb2_grpc
from services.common.server import channel
from services.wire import convert
from services.wire.steps import Stage, Step, StepFailed, StepResult

log = logging.getLogger(__name__)


class GatewayClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = channel(address)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self._outgoing: asyncio.Queue[gateway_pb2.RunRequest | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[gateway_pb2.StepResponse]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._routes: dict[tuple[Stage, ...], list[gateway_pb2.Stage]] = {}  # a pipeline's route, converted once

    async def step(self, step: Step, timeout_s: float) -> StepResult:
        self._ensure_stream()
        step_id = next(self._ids)
        future: asyncio.Future[gateway_pb2.StepResponse] = asyncio.get_running_loop().create_future()
        self._pending[step_id] = future
        request = convert.step_to_pb(step, step_id, self._route_pb(step.route))
        self._outgoing.put_nowait(gateway_pb2.RunRequest(step=request))
        try:
            response = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise StepFailed(f"gateway {self.address} did not answer a step within {timeout_s:.0f} s") from None
        finally:
            self._pending.pop(step_id, None)
        return convert.result_from_pb(response)

    async def release(self, request_ids: list[int], node_ids: list[str]) -> None:
        self._ensure_stream()
        release = gateway_pb2.ReleaseRequest(request_ids=request_ids, node_ids=node_ids)
        self._outgoing.put_nowait(gateway_pb2.RunRequest(release=release))

    def _route_pb(self, route: tuple[Stage, ...]) -> list[gateway_pb2.Stage]:
        converted = self._routes.get(route)
        if converted is None:
            if len(self._routes) > 64:  # routes change only on re-plans; keep the cache small anyway
                self._routes.clear()
            converted = self._routes[route] = convert.route_to_pb(route)
        return converted

    def _ensure_stream(self) -> None:
        if self._reader is None or self._reader.done():
            self._outgoing = asyncio.Queue()
            self._reader = asyncio.create_task(self._read(self.stub.Run(self._requests())))

    async def _requests(self) -> AsyncIterator[gateway_pb2.RunRequest]:
        queue = self._outgoing
        while (request := await queue.get()) is not None:
            yield request

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for response in call:
                future = self._pending.get(response.step.step_id)
                if future is not None and not future.done():
                    future.set_result(response.step)
        except grpc.aio.AioRpcError as error:
            log.warning("gateway_stream_broken", extra={"gateway": self.address, "code": error.code().name})
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(StepFailed(f"stream to gateway {self.address} broke"))

    async def close(self) -> None:
        self._outgoing.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.channel.close()


class GatewayClients:
    """A GatewayClient per address, made on first use."""

    def __init__(self) -> None:
        self.clients: dict[str, GatewayClient] = {}

    def get(self, address: str) -> GatewayClient:
        if address not in self.clients:
            self.clients[address] = GatewayClient(address)
        return self.clients[address]

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()
