"""When the router frees a request's KV caches on the nodes: never while a step of it is on its way (the soak
found releases overtaking steps, leaving caches behind and failing whole batches), always when it fails, and
a request whose client left is never replayed."""

from __future__ import annotations

import asyncio
import time

from services.common.errors import DeadlineExceeded
from services.common.nodes import NodeRecord
from services.router.cluster import Cluster
from services.router.engine import Engine, Scheduler
from services.router.requests import Generation
from services.router.settings import RouterSettings
from services.router.topology import Pipeline
from services.sampler.sampling import SamplingParams
from services.sampler.seeding import SteppedSampler
from services.wire.steps import Step, StepFailed, StepResult
from tests.polling import eventually


class HeldGateway:
    """The scheduler's gateway seam: each step waits until the test lets it go, then fails (so it never needs
    an answer); steps and releases are recorded in the order the scheduler sent them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int]]] = []
        self.go = asyncio.Event()

    async def step(self, step: Step, timeout_s: float) -> StepResult:
        self.sent.append(("step", [item.request_id for item in step.tokens]))
        await self.go.wait()
        self.sent.append(("step_back", [item.request_id for item in step.tokens]))
        raise StepFailed("node-1 is busy", node_id="node-1")

    async def release(self, request_ids: list[int], node_ids: list[str]) -> None:
        self.sent.append(("release", request_ids))


class Decoder:
    def push(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def generation(wire_id: int, deadline: float | None = None) -> Generation:
    prompt = [1, 2, 3]
    return Generation(
        request_id=f"r{wire_id}", wire_id=wire_id, prompt_ids=prompt, max_tokens=8, stop=[], ignore_eos=True,
        eos_id=0, sampler=SteppedSampler(SamplingParams(temperature=0.0), prompt), decoder=Decoder(),
        deadline=deadline,
    )  # fmt: skip


def node(index: int, layers: tuple[int, int], gateway: str = "127.0.0.1:1") -> NodeRecord:
    return NodeRecord(f"node-{index}", "native", "cpu", 1 << 30, 1.0, gateway, gateway, "ready", layers)


def engine_with(gateways: dict[str, HeldGateway]) -> Engine:
    settings = RouterSettings(gateways=list(gateways))
    engine = Engine(settings, Cluster(settings))
    engine.gateways.get = gateways.__getitem__  # by address, as GatewayClients hands them out
    return engine


def one_pipeline(gateway: HeldGateway) -> tuple[Engine, Pipeline]:
    engine = engine_with({"127.0.0.1:1": gateway})
    pipeline = Pipeline((node(0, (0, 3)), node(1, (3, 6))))
    engine.cluster.pipelines = [pipeline]
    return engine, pipeline


async def test_a_request_cancelled_mid_step_is_released_only_when_the_step_is_back() -> None:
    gateway = HeldGateway()
    engine, _pipeline = one_pipeline(gateway)
    request = generation(7)
    await engine.submit(request)
    await eventually(lambda: gateway.sent == [("step", [7])], what="the step sent")
    await engine.cancel(request)
    await asyncio.sleep(0.05)
    assert gateway.sent == [("step", [7])], "released while its step was still on its way"
    gateway.go.set()
    await eventually(lambda: ("release", [7]) in gateway.sent, what="the release after the step")
    assert gateway.sent == [("step", [7]), ("step_back", [7]), ("release", [7])]
    await asyncio.sleep(0.1)
    assert not any(scheduler.requests for scheduler in engine.schedulers.values())
    assert [kind for kind, _ in gateway.sent].count("step") == 1, "a cancelled request was replayed"


async def test_a_request_past_its_deadline_is_failed_and_released() -> None:
    gateway = HeldGateway()
    engine, _pipeline = one_pipeline(gateway)
    request = generation(9, deadline=time.monotonic() + 60)
    await engine.submit(request)
    await eventually(lambda: gateway.sent == [("step", [9])], what="the step sent")
    request.deadline = 0.0  # passes while the step is out; the step fails, and the replay finds it expired
    gateway.go.set()
    await eventually(lambda: ("release", [9]) in gateway.sent, what="the expired request released")
    assert gateway.sent == [("step", [9]), ("step_back", [9]), ("release", [9])]
    assert isinstance(await request.events.get(), DeadlineExceeded)


async def test_caches_left_on_a_retired_pipeline_are_freed_through_each_nodes_gateway() -> None:
    """A failover moves a request to another pipeline while its old step is still out; at the end both
    pipelines' nodes are released, each through its own gateway, and only once every step is back."""
    first, second = HeldGateway(), HeldGateway()
    engine = engine_with({"gw-a:1": first, "gw-b:1": second})
    old, new = Pipeline((node(0, (0, 6), "gw-a:1"),)), Pipeline((node(1, (0, 6), "gw-b:1"),))
    engine.cluster.pipelines = [old]
    request = generation(5)
    await engine.submit(request)
    await eventually(lambda: first.sent == [("step", [5])], what="the step on the old pipeline")
    engine.cluster.pipelines = [new]
    engine.pipelines_changed([new])  # a re-plan: the old pipeline retires, the request replays on the new
    await eventually(lambda: second.sent == [("step", [5])], what="the replay on the new pipeline")
    await engine.cancel(request)
    second.go.set()
    await asyncio.sleep(0.05)
    assert first.sent == [("step", [5])], "released on the old pipeline while its step was still out"
    first.go.set()
    await eventually(lambda: ("release", [5]) in first.sent, what="the old pipeline's node released")
    assert first.sent[-1] == ("release", [5]) and second.sent[-1] == ("release", [5])
    assert [kind for kind, _ in first.sent + second.sent].count("release") == 2


async def test_a_request_whose_client_left_during_a_failover_is_not_resubmitted() -> None:
    gateway = HeldGateway()
    engine, pipeline = one_pipeline(gateway)
    request = generation(11)
    await engine.cancel(request)  # not on any pipeline: between two, as during a failover's back-off
    await engine.submit(request)
    assert all(request not in scheduler.requests for scheduler in engine.schedulers.values())
    assert isinstance(engine.schedulers[pipeline.key], Scheduler) and gateway.sent == []
