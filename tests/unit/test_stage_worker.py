"""StageWorker over SYN1 frames against transformers: batched and graph-path decode, mixed prefill and decode,
chunked prefill, slot reuse, replay and truncation, a full KV pool; on CUDA too where there is one."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.gpt2.checkpoint import Checkpoint, load_checkpoint
from services.common.gpt2.kv_pool import StepPlan
from services.common.gpt2.model import GPT2Stage
from services.node.graphs import DecodeGraphs, graph_sizes
from services.node.worker import StageWorker
from services.wire import syn1
from tests.checkpoints import load_reference, make_random_checkpoint

TOP_K = 5
SPLIT = [(0, 2), (2, 3)]
TOLERANCE = 1e-4  # max abs logit difference vs transformers, float32
POSITIONS = 64  # n_positions of the test checkpoint
HAS_CUDA = torch.cuda.is_available()


@dataclass
class Model:
    checkpoint: Checkpoint
    reference: torch.nn.Module

    def logits(self, tokens: list[int]) -> np.ndarray:
        """transformers' (vocab,) logits after `tokens`."""
        with torch.no_grad():
            return self.reference(torch.tensor([tokens])).logits[0, -1].numpy()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    folder = make_random_checkpoint(tmp_path_factory.mktemp("model"), n_layer=3, n_head=2, n_embd=32, seed=5)
    return Model(load_checkpoint(folder, progress=False), load_reference(folder))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads on a busy machine
    yield
    torch.set_num_threads(threads)


class Pipeline:
    """Workers for SPLIT; activations cross between them through the real SYN1 encoding (f32)."""

    def __init__(self, model: Model, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> None:
        config, tensors = model.checkpoint.config, model.checkpoint.tensors
        self.workers = [
            StageWorker(
                GPT2Stage.from_tensors(config, start, end, tensors, dtype=dtype, device=device),
                top_k=TOP_K,
                activation_dtype="float32",
                max_batch=8,
                **options,
            )
            for start, end in SPLIT
        ]

    def run(self, frames: list[syn1.Frame]) -> list[syn1.Frame]:
        for worker in self.workers[:-1]:
            frames = syn1.decode_frames(worker.encode(worker.run(frames)))
        return self.workers[-1].run(frames)  # OUTPUT frames, f32 values (before the f16 wire encoding)

    def release(self, request_ids: list[int]) -> None:
        for worker in self.workers:
            worker.release(request_ids)


def check(model: Model, output: syn1.Frame, tokens: list[int], tolerance: float = TOLERANCE) -> int:
    """The output frame is transformers' top-k after `tokens`; returns transformers' greedy token.

    At float32 the ranking must be identical; at float16 (tolerance above TOLERANCE) near-ties may swap,
    so there every value must be its own token's logit and the k values must be the k largest, in order."""
    logits = model.logits(tokens)
    expected_ids = np.argsort(-logits, kind="stable")[:TOP_K]
    ids, values = output.token_ids[0], output.array[0]
    assert output.msg_type is syn1.MessageType.OUTPUT and output.position == len(tokens) - 1
    assert np.abs(values - logits[ids]).max() <= tolerance
    assert np.abs(values - logits[expected_ids]).max() <= tolerance
    if tolerance <= TOLERANCE:
        assert ids.tolist() == expected_ids.tolist()
    return int(expected_ids[0])


def generate(model: Model, pipeline: Pipeline, prompts: dict[int, list[int]], steps: int, **check_options) -> dict:
    """Prefill every prompt in one batch, then decode them all together, checking each step."""
    sequences = {request_id: list(prompt) for request_id, prompt in prompts.items()}
    frames = [syn1.Frame.tokens(request_id, 0, prompt) for request_id, prompt in prompts.items()]
    for _ in range(steps):
        outputs = pipeline.run(frames)
        frames = []
        for output in outputs:
            sequence = sequences[output.request_id]
            sequence.append(check(model, output, sequence, **check_options))
            frames.append(syn1.Frame.tokens(output.request_id, len(sequence) - 1, sequence[-1:]))
    return sequences


PROMPTS = {1: [3, 14, 15], 2: [92, 65], 3: [35, 89, 79, 32, 38], 4: [46], 5: [26, 43, 38, 32, 79, 50]}


@pytest.mark.parametrize("graphs", ["off", "eager"])
def test_batched_decode_matches_transformers_greedy(model: Model, graphs: str) -> None:
    """Five requests (padded to 8 on the graph path), then three (padded to 4) once two are released."""
    pipeline = Pipeline(model, graphs=graphs)
    sequences = generate(model, pipeline, PROMPTS, steps=6)
    pipeline.release([1, 4])
    rest = {request_id: sequences[request_id] for request_id in (2, 3, 5)}
    frames = [syn1.Frame.tokens(r, len(tokens) - 1, tokens[-1:]) for r, tokens in rest.items()]
    for output, request_id in zip(pipeline.run(frames), rest, strict=True):
        check(model, output, rest[request_id])
    assert [worker.cached_requests for worker in pipeline.workers] == [3, 3]


def test_mixed_prefill_and_decode_in_one_batch(model: Model) -> None:
    pipeline = Pipeline(model)
    sequences = generate(model, pipeline, {1: PROMPTS[1], 2: PROMPTS[2]}, steps=2)
    frames = [syn1.Frame.tokens(r, len(sequences[r]) - 1, sequences[r][-1:]) for r in (1, 2)]
    frames.insert(1, syn1.Frame.tokens(7, 0, PROMPTS[5]))  # a new prompt between two decodes
    outputs = pipeline.run(frames)
    for output, tokens in zip(outputs, [sequences[1], PROMPTS[5], sequences[2]], strict=True):
        check(model, output, tokens)


def test_chunked_prefill_lets_decodes_through_between_chunks(model: Model) -> None:
    pipeline = Pipeline(model, prefill_chunk=4)
    first, last = pipeline.workers
    sequences = generate(model, pipeline, {1: PROMPTS[1]}, steps=1)
    prompt = [int(t) for t in np.arange(13) * 7 % 97]
    jobs = first.submit([syn1.Frame.tokens(9, 0, prompt), syn1.Frame.tokens(1, 3, sequences[1][-1:])])
    rounds = []
    while first.pending:
        rounds.append([job.frame.request_id for job in first.step()])
    assert rounds == [[1], [], [], [9]]  # the decode is done after the first chunk of 4 prompt tokens
    assert jobs[0].output.rows == 13 and first.requests_served == 3
    middle = syn1.decode_frames(first.encode([job.output for job in jobs]))
    outputs = last.run(middle)  # the last stage takes the 13 rows in chunks of 4 within one run
    check(model, outputs[0], prompt)
    check(model, outputs[1], sequences[1])


def test_slot_reuse_after_release_replay_and_truncation(model: Model) -> None:
    pipeline = Pipeline(model, kv_slots=2)
    sequences = generate(model, pipeline, {1: PROMPTS[3], 2: PROMPTS[5]}, steps=3)
    with pytest.raises(ResourceExhausted, match="all 2 KV cache slots"):
        pipeline.run([syn1.Frame.tokens(3, 0, PROMPTS[1])])
    pipeline.release([1])
    (output,) = pipeline.run([syn1.Frame.tokens(3, 0, PROMPTS[1])])  # request 3 takes request 1's slot
    check(model, output, PROMPTS[1])
    tokens = sequences[2]
    (output,) = pipeline.run([syn1.Frame.tokens(2, 0, tokens)])  # a replay from position 0
    check(model, output, tokens)
    (output,) = pipeline.run([syn1.Frame.tokens(2, 3, tokens[3:5])])  # truncated to 3 tokens, then 2 more
    check(model, output, tokens[:5])
    with pytest.raises(InvalidArgument, match="continues at position 9 but this node holds 5 tokens"):
        pipeline.run([syn1.Frame.tokens(2, 9, [1])])
    with pytest.raises(InvalidArgument, match="replay from position 0"):
        pipeline.run([syn1.Frame.tokens(1, 2, [1])])  # released: its tokens are gone
    assert [worker.cached_requests for worker in pipeline.workers] == [2, 2]


def test_bad_frames_are_refused_before_anything_runs(model: Model) -> None:
    first, last = Pipeline(model).workers
    activation = syn1.Frame.activation(1, 0, np.zeros((2, 32), np.float32))
    bad_calls = [
        (first, [syn1.Frame.tokens(1, 0, [5, 97])], "request 1: token id outside [0, 97)"),
        (first, [activation], "the first stage takes TOKENS frames"),
        (last, [syn1.Frame.tokens(1, 0, [5])], "takes ACTIVATION frames"),
        (last, [syn1.Frame.activation(1, 0, np.zeros((2, 31), np.float32))], "31 columns, not 32"),
        (first, [syn1.Frame.tokens(1, 63, [5, 6])], "positions up to 65 exceed the model's 64"),
        (first, [syn1.Frame.tokens(1, 0, [5]), syn1.Frame.tokens(1, 0, [6])], "request 1 appears twice"),
    ]
    for worker, frames, message in bad_calls:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            worker.run(frames)
    assert (first.cached_requests, first.pending, first.requests_served) == (0, 0, 0)


def test_full_logits_when_top_k_is_zero(model: Model) -> None:
    config, tensors = model.checkpoint.config, model.checkpoint.tensors
    worker = StageWorker(
        GPT2Stage.from_tensors(config, 0, 3, tensors), top_k=0, activation_dtype="float32", max_batch=4
    )
    outputs = worker.run([syn1.Frame.tokens(1, 0, PROMPTS[3]), syn1.Frame.tokens(2, 0, PROMPTS[1])])
    for output, prompt in zip(outputs, [PROMPTS[3], PROMPTS[1]], strict=True):
        assert output.msg_type is syn1.MessageType.LOGITS and output.array.shape == (1, 97)
        assert output.position == len(prompt) - 1
        assert np.abs(output.array[0] - model.logits(prompt)).max() <= TOLERANCE


def test_idle_requests_are_released(model: Model) -> None:
    pipeline = Pipeline(model)
    generate(model, pipeline, {1: PROMPTS[1], 2: PROMPTS[2]}, steps=1)
    first = pipeline.workers[0]
    assert first.release_idle(3600) == 0 and first.release_idle(0) == 2
    assert first.cached_requests == 0 and first.engine.pool.free_slots == 16
    first.run([syn1.Frame.tokens(1, 0, [1])])
    first.release_all()
    assert first.cached_requests == 0 and first.engine.pool.free_slots == 16


def test_decode_fill_writes_the_padded_plan_over_the_last_steps_rows(model: Model) -> None:
    (engine,) = [worker.engine for worker in Pipeline(model, graphs="eager").workers[:1]]
    static = engine.graphs.statics[8]
    for batch in (7, 3):  # the second step must reset the four rows the first one wrote past it
        plan = StepPlan.of(list(range(batch, 0, -1)), [5 + i for i in range(batch)], [1] * batch, POSITIONS)
        tokens = np.arange(batch, dtype=np.int32) + 10
        engine._fill(static, plan, tokens, None)
        assert np.array_equal(static.ints.numpy(), plan.padded(8, engine.pool.scratch_slot).ints(tokens))


def test_graph_sizes_and_padding_to_the_next_size() -> None:
    assert graph_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_sizes(48) == (1, 2, 4, 8, 16, 32, 48) and graph_sizes(1) == (1,)
    graphs = DecodeGraphs(graph_sizes(8), make_static=lambda size: None, step=None, fill_idle=None, capture=False)
    assert [graphs.size_for(batch) for batch in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(InvalidArgument, match="1 to 8 requests, got 9"):
        graphs.size_for(9)


CUDA_CASES = [("capture", torch.float32, TOLERANCE), ("capture", torch.float16, 0.1), ("eager", torch.float16, 0.1)]


@pytest.mark.skipif(not HAS_CUDA, reason="device-only: CUDA graphs and the varlen kernel need a CUDA GPU")
@pytest.mark.parametrize(("graphs", "dtype", "tolerance"), CUDA_CASES)
def test_on_cuda_batched_graph_decode_and_mixed_steps_match_transformers(model, graphs, dtype, tolerance) -> None:
    pipeline = Pipeline(model, device="cuda", dtype=dtype, graphs=graphs, prefill_chunk=4)
    assert pipeline.workers[0].engine.graphs.captured == (graphs == "capture")
    sequences = generate(model, pipeline, PROMPTS, steps=6, tolerance=tolerance)
    frames = [syn1.Frame.tokens(r, len(sequences[r]) - 1, sequences[r][-1:]) for r in (1, 2, 3)]
    frames.insert(1, syn1.Frame.tokens(9, 0, PROMPTS[5] * 2))  # a 12-token prompt in chunks, between decodes
    expected = [sequences[1], PROMPTS[5] * 2, sequences[2], sequences[3]]
    for output, tokens in zip(pipeline.run(frames), expected, strict=True):
        check(model, output, tokens, tolerance=tolerance)


@pytest.mark.parametrize("prefill_chunk", [None, 3])
def test_a_predicted_frame_is_answered_at_every_row_and_a_rejected_draft_is_cut_back(
    model: Model, prefill_chunk: int | None
) -> None:
    """A decode token plus a draft (SYN1 PREDICTED): the last stage answers every row, row i being
    transformers' top-k after the sequence up to draft token i; the next step at an earlier position
    truncates the caches back to the accepted prefix (here: nothing of the draft kept)."""
    pipeline = Pipeline(model, prefill_chunk=prefill_chunk)
    sequence = generate(model, pipeline, {1: PROMPTS[3]}, steps=1)[1]  # prompt + one generated token
    draft = [11, 12, 13]
    (answer,) = pipeline.run([syn1.Frame.tokens(1, len(sequence) - 1, sequence[-1:] + draft, predicted=True)])
    assert answer.rows == 1 + len(draft) and answer.position == len(sequence) - 1
    for row in range(answer.rows):
        prefix = sequence + draft[:row]
        one = syn1.Frame.output(1, len(prefix) - 1, answer.array[row : row + 1], answer.token_ids[row : row + 1])
        check(model, one, prefix)
    # The draft was wrong: decode again from the sequence as it was; the caches drop the draft's rows.
    (again,) = pipeline.run([syn1.Frame.tokens(1, len(sequence) - 1, sequence[-1:])])
    check(model, again, sequence)


def test_activations_carry_the_predicted_flag_on() -> None:
    frame = syn1.Frame.activation(4, 9, np.zeros((3, 8), np.float32), predicted=True)
    (decoded,) = syn1.decode_frames(syn1.encode(frame, syn1.DType.F16))
    assert decoded.predicted and decoded.rows == 3
    with pytest.raises(syn1.FrameError, match="PREDICTED is for TOKENS and ACTIVATION"):
        syn1.encode(syn1.Frame(syn1.MessageType.LOGITS, 1, 0, np.zeros((1, 4), np.float32), syn1.Flag.PREDICTED))
