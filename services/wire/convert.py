"""Steps, their results and shard assignments <-> the gateway's protobuf, at both ends of a Run stream."""

from __future__ import annotations

from services.common.errors import InvalidArgument
from services.common.gpt2.config import GPT2Config
from services.common.model_config_pb import model_config_from_pb, model_config_to_pb
from services.common.pb import common_pb2, gateway_pb2
from services.wire.control import ActivationDType, Assign
from services.wire.steps import Hop, Stage, Step, StepFailed, StepResult, TokenInput

DTYPES: dict[ActivationDType, int] = {
    "float16": common_pb2.DTYPE_FLOAT16,
    "float32": common_pb2.DTYPE_FLOAT32,
    "int8": common_pb2.DTYPE_INT8,
}
DTYPE_NAMES: dict[int, ActivationDType] = {value: name for name, value in DTYPES.items()}


def route_to_pb(route: tuple[Stage, ...]) -> list[gateway_pb2.Stage]:
    return [
        gateway_pb2.Stage(
            node_id=stage.node_id,
            layers=common_pb2.LayerRange(start=stage.layers[0], end=stage.layers[1]),
            gateway_address=stage.gateway_address,
            verifiers=stage.verifiers,
        )
        for stage in route
    ]


def step_to_pb(step: Step, step_id: int, route: list[gateway_pb2.Stage] | None = None) -> gateway_pb2.StepRequest:
    """`route` may be given already converted: a pipeline's route is the same for every step."""
    request = gateway_pb2.StepRequest(
        step_id=step_id,
        route=route if route is not None else route_to_pb(step.route),
        verify_request_ids=sorted(step.verify),
    )
    if step.tokens:
        for item in step.tokens:
            request.items.items.add(
                request_id=item.request_id, position=item.position, token_ids=item.token_ids, predicted=item.predicted
            )
    else:
        request.frames = step.frames
    return request


def step_from_pb(request: gateway_pb2.StepRequest) -> Step:
    route = tuple(
        Stage(stage.node_id, (stage.layers.start, stage.layers.end), stage.gateway_address, tuple(stage.verifiers))
        for stage in request.route
    )
    verify = frozenset(request.verify_request_ids)
    if not route:
        raise InvalidArgument("a step needs a route of at least one stage")
    if request.WhichOneof("input") == "items":
        tokens = tuple(
            TokenInput(i.request_id, i.position, list(i.token_ids), i.predicted) for i in request.items.items
        )
        if not tokens:
            raise InvalidArgument("a step's items hold no request")
        return Step(route, tokens=tokens, verify=verify)
    if not request.frames:
        raise InvalidArgument("a step needs token items or SYN1 frames as input")
    return Step(route, frames=request.frames, verify=verify)


def result_to_pb(step_id: int, result: StepResult) -> gateway_pb2.StepResponse:
    response = gateway_pb2.StepResponse(step_id=step_id, frames=result.frames)
    for hop in result.hops:
        response.hops.add(
            node_id=hop.node_id,
            round_trip_ms=hop.round_trip_ms,
            compute_ms=hop.compute_ms,
            queue_ms=hop.queue_ms,
            node_serialize_ms=hop.node_serialize_ms,
            gateway_serialize_ms=hop.gateway_serialize_ms,
            bytes_sent=hop.bytes_sent,
            bytes_received=hop.bytes_received,
        )
    return response


def failure_to_pb(step_id: int, error: StepFailed) -> gateway_pb2.StepResponse:
    """A failed step travels in band: the Run stream carries many steps and must outlive one's failure."""
    failure = gateway_pb2.StepError(node_id=error.node_id, message=str(error), node_gone=error.node_gone)
    return gateway_pb2.StepResponse(step_id=step_id, error=failure)


def result_from_pb(response: gateway_pb2.StepResponse) -> StepResult:
    """The response's result, or its in-band error raised as StepFailed."""
    if response.HasField("error") and response.error.message:
        error = response.error
        raise StepFailed(error.message, node_id=error.node_id, node_gone=error.node_gone)
    hops = tuple(
        Hop(
            hop.node_id,
            hop.round_trip_ms,
            hop.compute_ms,
            hop.queue_ms,
            hop.node_serialize_ms,
            hop.gateway_serialize_ms,
            hop.bytes_sent,
            hop.bytes_received,
        )
        for hop in response.hops
    )
    return StepResult(response.frames, hops)


def assign_to_pb(node_id: str, assign: Assign, config: GPT2Config) -> gateway_pb2.AssignShardRequest:
    return gateway_pb2.AssignShardRequest(
        node_id=node_id,
        shard_id=assign.shard_id,
        layers=common_pb2.LayerRange(start=assign.layers[0], end=assign.layers[1]),
        shard_url=assign.shard_url,
        manifest_url=assign.manifest_url,
        sha256=assign.sha256,
        size_bytes=assign.size_bytes,
        top_k=assign.top_k,
        activation_dtype=DTYPES[assign.activation_dtype],
        config=model_config_to_pb(config),
    )


def assign_from_pb(request: gateway_pb2.AssignShardRequest) -> tuple[str, Assign, GPT2Config]:
    """(node id, the assign message for it, the model's shape); an unknown activation dtype or a missing
    config is INVALID_ARGUMENT."""
    if not request.HasField("config"):
        raise InvalidArgument("config is required: the model's shape, which every answer of the node is checked by")
    config = model_config_from_pb(request.config)
    dtype = DTYPE_NAMES.get(request.activation_dtype)
    if dtype is None:
        names = ", ".join(common_pb2.DType.Name(value) for value in DTYPES.values())
        raise InvalidArgument(f"activation_dtype {request.activation_dtype} is not one of {names}")
    assign = Assign(
        shard_id=request.shard_id,
        layers=(request.layers.start, request.layers.end),
        shard_url=request.shard_url,
        manifest_url=request.manifest_url,
        sha256=request.sha256,
        size_bytes=request.size_bytes,
        top_k=request.top_k,
        activation_dtype=dtype,
    )
    config.check_layer_range(*assign.layers)
    return request.node_id, assign, config
