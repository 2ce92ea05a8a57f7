"""The soak's traffic: request templates with known answers, one Generate stream run and checked, the tallies.

Every template is greedy or seeded, so its tokens are fixed: the reference is the same request run once
undisturbed (and, for greedy ones, transformers' generate()). A stream is then checked token by token: its
indices must run 0, 1, 2, … and its tokens must equal the reference's (all of them when it finished, a
prefix when it was cancelled or ran out of time).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

import grpc

from services.common.pb import common_pb2, router_pb2, router_pb2_grpc

MODES = ("complete", "cancel", "deadline")  # how a stream ends: on its own, cancelled by us, by its deadline
TEXT_PROMPTS = ("The quick brown fox", "Once upon a time", "In the beginning", "Synapse splits models across")
COMPLETE_TIMEOUT_S = 300.0  # a complete stream that takes longer than this has hung


@dataclass(frozen=True)
class Template:
    name: str
    request: router_pb2.GenerateRequest
    greedy: bool


def make_templates(count: int, vocab_size: int, rng: random.Random) -> list[Template]:
    """Mixed requests: a third greedy (token-id prompts, checkable with transformers), the rest seeded with
    temperature, top-k, top-p and penalties; some text prompts (through the tokenizer), some stopping at EOS."""
    templates = []
    for index in range(count):
        greedy = index % 3 == 0
        request = router_pb2.GenerateRequest(max_tokens=rng.randint(8, 64), ignore_eos=rng.random() < 0.8)
        if greedy or rng.random() < 0.5:
            request.prompt_token_ids.ids.extend(rng.randrange(vocab_size - 1) for _ in range(rng.randint(3, 12)))
        else:
            request.prompt = rng.choice(TEXT_PROMPTS)
        if not greedy:
            request.sampling.CopyFrom(
                common_pb2.SamplingParams(
                    temperature=rng.choice((0.6, 0.9, 1.0, 1.3)),
                    top_k=rng.choice((0, 20, 50)),
                    top_p=rng.choice((1.0, 0.9, 0.7)),
                    repetition_penalty=rng.choice((0.0, 1.1)),
                    seed=rng.randrange(2**32),
                )
            )
        templates.append(Template(f"t{index}-{'greedy' if greedy else 'seeded'}", request, greedy))
    return templates


@dataclass
class Tally:
    """What every stream did, summed."""

    started: int = 0
    finished: int = 0
    by_mode: Counter = field(default_factory=Counter)
    finish_reasons: Counter = field(default_factory=Counter)
    status_codes: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # streams that ended in a way their mode does not allow
    tokens: int = 0
    lost: int = 0  # an index skipped, or a finished stream shorter than its reference
    duplicated: int = 0  # an index repeated, or more tokens than the reference
    reordered: int = 0  # an index out of order, or a token differing from the reference at its index
    failovers: int = 0
    examples: list[str] = field(default_factory=list)  # the first few token faults, for the report

    def fault(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {text}")


async def run_stream(
    stub: router_pb2_grpc.RouterServiceStub,
    template: Template,
    reference: list[int],
    mode: str,
    rng: random.Random,
    tally: Tally,
) -> None:
    """One stream of `template`, ended the `mode` way, checked against `reference` into `tally`."""
    request = router_pb2.GenerateRequest()
    request.CopyFrom(template.request)
    request.request_id = f"soak-{tally.started}-{template.name}-{mode}"
    cancel_after = rng.randint(1, max(1, len(reference) - 1)) if mode == "cancel" else None
    timeout = rng.uniform(0.2, 3.0) if mode == "deadline" else COMPLETE_TIMEOUT_S
    tally.started += 1
    tally.by_mode[mode] += 1
    call = stub.Generate(request, timeout=timeout)
    received: list[router_pb2.GenerateResponse] = []
    code, details = grpc.StatusCode.OK, ""
    try:
        async for response in call:
            received.append(response)
            if cancel_after is not None and len(received) >= cancel_after:
                call.cancel()
                break
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details() or ""
    except asyncio.CancelledError:
        call.cancel()
        raise
    if cancel_after is not None and code is grpc.StatusCode.OK and not (received and received[-1].finish_reason):
        code = grpc.StatusCode.CANCELLED  # cancelled by us before its end
    tally.finished += 1
    tally.status_codes[code.name] += 1
    last = received[-1] if received else None
    if last is not None and last.finish_reason:
        tally.finish_reasons[router_pb2.FinishReason.Name(last.finish_reason)] += 1
        tally.failovers += last.usage.failovers
    allowed = {"complete": {"OK"}, "cancel": {"OK", "CANCELLED"}, "deadline": {"OK", "DEADLINE_EXCEEDED"}}[mode]
    if code.name not in allowed:
        tally.unexpected.append(f"{request.request_id}: {code.name} {details}"[:300])
    check_tokens(request.request_id, received, reference, ended=bool(last and last.finish_reason), tally=tally)


def check_tokens(
    name: str, received: list[router_pb2.GenerateResponse], reference: list[int], *, ended: bool, tally: Tally
) -> None:
    """Indices contiguous from 0; tokens equal to the reference's; all of them when the stream ended."""
    tokens = [response.token_id for response in received if response.HasField("token_id")]
    tally.tokens += len(tokens)
    for expected, response in enumerate(received):
        if response.index != expected:
            kind = "lost" if response.index > expected else "duplicated"
            tally.fault(kind, f"{name}: index {response.index} where {expected} was due")
            break
    for index, (got, want) in enumerate(zip(tokens, reference, strict=False)):
        if got != want:
            tally.fault("reordered", f"{name}: token {index} is {got}, the reference has {want}")
            break
    if len(tokens) > len(reference):
        tally.fault("duplicated", f"{name}: {len(tokens)} tokens, the reference has {len(reference)}")
    elif ended and len(tokens) < len(reference):
        tally.fault("lost", f"{name}: finished after {len(tokens)} tokens, the reference has {len(reference)}")
    if ended and received[-1].usage.completion_tokens != len(tokens):
        tally.fault("lost", f"{name}: usage says {received[-1].usage.completion_tokens}, {len(tokens)} came")
