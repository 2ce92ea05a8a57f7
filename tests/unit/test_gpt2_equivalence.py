"""GPT2Stage chained over every split reproduces transformers' GPT2LMHeadModel: prefill, decode, batching."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from services.common.errors import InvalidArgument
from services.common.gpt2.checkpoint import Checkpoint, load_checkpoint
from services.common.gpt2.model import GPT2Stage, KVCache, ranked_top_k, top_k
from tests.checkpoints import load_reference, make_random_checkpoint

SHAPES = {  # name: (n_layer, n_head, n_embd)
    "2x2x32": (2, 2, 32),
    "4x4x64": (4, 4, 64),
    "5x3x48": (5, 3, 48),
}
PROMPT_LENGTH = 7
DECODE_STEPS = 32
TOLERANCE = 1e-4  # max abs logit difference vs transformers, float32
BATCH_TOLERANCE = 1e-5  # batched vs alone, same code


@dataclass
class Reference:
    checkpoint: Checkpoint
    tokens: Tensor  # (PROMPT_LENGTH + DECODE_STEPS,) the prompt, then transformers' greedy tokens
    logits: Tensor  # (PROMPT_LENGTH + DECODE_STEPS, vocab); row t is computed from tokens[: t + 1]
    model: torch.nn.Module


def splits(n_layer: int) -> list[list[tuple[int, int]]]:
    """Every way to cut [0, n_layer) into contiguous non-empty stages."""
    if n_layer == 0:
        return [[]]
    return [[*rest, (n_layer - last, n_layer)] for last in range(1, n_layer + 1) for rest in splits(n_layer - last)]


def build(reference: Reference, split: list[tuple[int, int]]) -> list[GPT2Stage]:
    config = reference.checkpoint.config
    return [GPT2Stage.from_tensors(config, a, b, reference.checkpoint.tensors) for a, b in split]


def run(stages: list[GPT2Stage], caches: list[list[KVCache]], inputs: list[Tensor], **options) -> list[Tensor]:
    """One step of the pipeline: caches[stage][request]."""
    for stage, stage_caches in zip(stages, caches, strict=True):
        inputs = stage(inputs, stage_caches, **options)
    return inputs


def max_difference(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine their spinning cost 4x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Callable[[str], Reference]:
    made: dict[str, Reference] = {}

    def get(shape: str) -> Reference:
        if shape not in made:
            n_layer, n_head, n_embd = SHAPES[shape]
            folder = make_random_checkpoint(
                tmp_path_factory.mktemp(shape), n_layer=n_layer, n_head=n_head, n_embd=n_embd, seed=n_layer
            )
            model = load_reference(folder)
            tokens = torch.randint(0, 97, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                for _ in range(DECODE_STEPS):
                    next_token = model(tokens[None]).logits[0, -1].argmax()
                    tokens = torch.cat([tokens, next_token[None]])
                logits = model(tokens[None]).logits[0]
            made[shape] = Reference(load_checkpoint(folder, progress=False), tokens, logits, model)
        return made[shape]

    return get


CASES = [(shape, split) for shape, (n_layer, _, _) in SHAPES.items() for split in splits(n_layer)]


@pytest.mark.parametrize(
    ("shape", "split"), CASES, ids=[f"{s}-" + "".join(f"[{a},{b})" for a, b in p) for s, p in CASES]
)
def test_split_pipeline_matches_transformers_prefill_and_greedy_decode(reference, shape, split) -> None:
    ref = reference(shape)
    stages = build(ref, split)
    caches = [[stage.new_cache()] for stage in stages]
    (logits,) = run(stages, caches, [ref.tokens[:PROMPT_LENGTH]])
    assert max_difference(logits, ref.logits[:PROMPT_LENGTH]) <= TOLERANCE
    for position in range(PROMPT_LENGTH, PROMPT_LENGTH + DECODE_STEPS):
        assert logits[-1].argmax() == ref.tokens[position]  # greedy agrees with transformers
        (logits,) = run(stages, caches, [ref.tokens[position : position + 1]], last_only=True)
        assert max_difference(logits[0], ref.logits[position]) <= TOLERANCE, f"decode position {position}"
    assert all(stage_caches[0].length == PROMPT_LENGTH + DECODE_STEPS for stage_caches in caches)


MIDDLE_SPLITS = {
    "2x2x32": [(0, 1), (1, 2)],
    "4x4x64": [(0, 2), (2, 3), (3, 4)],
    "5x3x48": [(0, 1), (1, 4), (4, 5)],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_batched_requests_of_different_lengths_match_running_each_alone(reference, shape) -> None:
    ref = reference(shape)
    stages = build(ref, MIDDLE_SPLITS[shape])
    generator = torch.Generator().manual_seed(2)
    prompts = [5, 1, 9, 4]
    sequences = [torch.randint(0, 97, (n + 6,), generator=generator) for n in prompts]
    # Schedule of (request, tokens) per step: requests 0-2 prefill together, then decode; request 3
    # prefills in the same batch as their third decode step.
    steps: list[list[tuple[int, Tensor]]] = [[(r, sequences[r][: prompts[r]]) for r in range(3)]]
    for step in range(6):
        batch = [(r, sequences[r][prompts[r] + step : prompts[r] + step + 1]) for r in range(3)]
        if step >= 2:
            batch.append((3, sequences[3][:4] if step == 2 else sequences[3][step + 1 : step + 2]))
        steps.append(batch)

    batched_caches = [[stage.new_cache() for _ in sequences] for stage in stages]
    alone_caches = [[stage.new_cache() for _ in sequences] for stage in stages]
    for batch in steps:
        requests = [r for r, _ in batch]
        batched = run(stages, [[c[r] for r in requests] for c in batched_caches], [t for _, t in batch])
        for (r, tokens), logits in zip(batch, batched, strict=True):
            (alone,) = run(stages, [[c[r]] for c in alone_caches], [tokens])
            assert logits.shape == (len(tokens), 97)
            assert max_difference(logits, alone) <= BATCH_TOLERANCE, f"request {r}"
            seen = batched_caches[0][r].length
            with torch.no_grad():
                expected = ref.model(sequences[r][:seen][None]).logits[0, seen - len(tokens) :]
            assert max_difference(logits, expected) <= TOLERANCE, f"request {r}"


def test_last_only_gives_the_last_row_of_the_full_logits(reference) -> None:
    ref = reference("4x4x64")
    stages = build(ref, [(0, 2), (2, 4)])
    prompts = [ref.tokens[:6], ref.tokens[:3]]
    full = run(stages, [[s.new_cache(), s.new_cache()] for s in stages], prompts)
    last = run(stages, [[s.new_cache(), s.new_cache()] for s in stages], prompts, last_only=True)
    for full_logits, last_logits in zip(full, last, strict=True):
        assert last_logits.shape == (1, 97)
        assert max_difference(last_logits[0], full_logits[-1]) <= BATCH_TOLERANCE


def test_truncated_cache_replays_to_the_same_logits(reference) -> None:
    ref = reference("2x2x32")
    stages = build(ref, [(0, 1), (1, 2)])
    caches = [[stage.new_cache()] for stage in stages]
    run(stages, caches, [ref.tokens[:10]])
    for stage_caches in caches:
        stage_caches[0].truncate(4)
    (logits,) = run(stages, caches, [ref.tokens[4:12]])
    assert max_difference(logits, ref.logits[4:12]) <= TOLERANCE


def test_new_cache_takes_a_slot_of_a_pool_that_doubles_and_gets_slots_back(reference) -> None:
    ref = reference("2x2x32")
    (stage,) = build(ref, [(0, 2)])
    caches = [stage.new_cache() for _ in range(5)]
    pool = stage.own_pool
    assert [cache.slot for cache in caches] == [0, 1, 2, 3, 4] and pool.slots == 8
    assert pool.nbytes == 2 * 9 * 64 * 2 * 32 * 4  # layers, slots + scratch, positions, k and v, n_embd, f32
    stage([ref.tokens[:10]], [caches[0]])
    first_logits = stage([ref.tokens[10:17]], [caches[0]])
    assert caches[0].length == 17
    pool.grow(16)  # the stored rows move with the pool
    caches[0].truncate(10)
    assert torch.equal(stage([ref.tokens[10:17]], [caches[0]])[0], first_logits[0])
    caches[1].release()
    del caches[2]  # a dropped handle gives its slot back too
    again = [stage.new_cache() for _ in range(2)]
    assert [cache.slot for cache in again] == [1, 2]
    stage([torch.zeros(40, dtype=torch.long)], [caches[0]])
    assert caches[0].length == 57
    with pytest.raises(InvalidArgument, match="exceed the model's 64 positions"):
        stage([torch.zeros(8, dtype=torch.long)], [caches[0]])
    assert caches[0].length == 57


def test_from_tensors_casts_float16_and_names_missing_tensors(reference) -> None:
    ref = reference("2x2x32")
    half = {name: tensor.half() for name, tensor in ref.checkpoint.tensors.items()}
    stages = [GPT2Stage.from_tensors(ref.checkpoint.config, a, b, half) for a, b in [(0, 1), (1, 2)]]
    assert all(p.dtype == torch.float32 for stage in stages for p in stage.parameters())
    (logits,) = run(stages, [[stage.new_cache()] for stage in stages], [ref.tokens[:8]])
    assert max_difference(logits, ref.logits[:8]) <= 0.05  # weights rounded to float16
    without_embedding = {k: v for k, v in ref.checkpoint.tensors.items() if k != "wte.weight"}
    with pytest.raises(InvalidArgument, match=re.escape("needs tensor 'wte.weight'")):
        GPT2Stage.from_tensors(ref.checkpoint.config, 1, 2, without_embedding)


def test_forward_rejects_bad_batches(reference) -> None:
    ref = reference("2x2x32")
    first, last = build(ref, [(0, 1), (1, 2)])
    cache = first.new_cache()
    bad_calls = [
        (first, [torch.tensor([3, 97])], [cache], "token ids must be in [0, 97)"),
        (first, [torch.zeros(2, 32)], [cache], "expected token ids (T,)"),
        (first, [torch.tensor([], dtype=torch.long)], [cache], "expected token ids"),
        (last, [torch.zeros(2, 31)], [last.new_cache()], "expected activations (T, 32)"),
        (first, [torch.tensor([1]), torch.tensor([2])], [cache], "2 inputs and 1 caches"),
        (first, [torch.tensor([1]), torch.tensor([2])], [cache, cache], "same KV cache appears twice"),
        (first, [torch.tensor([1])], [GPT2Stage(ref.checkpoint.config, 0, 2).new_cache()], "new_cache"),
    ]
    for stage, inputs, caches, message in bad_calls:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            stage(inputs, caches)
    assert cache.length == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, TOLERANCE), (torch.float16, 0.1)])
def test_batched_stages_on_cuda_match_transformers(reference, dtype: torch.dtype, tolerance: float) -> None:
    ref = reference("4x4x64")
    config, tensors = ref.checkpoint.config, ref.checkpoint.tensors
    split = [(0, 1), (1, 3), (3, 4)]
    stages = [GPT2Stage.from_tensors(config, a, b, tensors, dtype=dtype, device="cuda") for a, b in split]
    lengths = [7, 2, 5]  # every request is a prefix of ref.tokens, so ref.logits rows apply
    caches = [[stage.new_cache() for _ in lengths] for stage in stages]
    logits = run(stages, caches, [ref.tokens[:n] for n in lengths])
    for n, request_logits in zip(lengths, logits, strict=True):
        assert request_logits.device.type == "cuda"
        assert max_difference(request_logits.float().cpu(), ref.logits[:n]) <= tolerance
    for step in range(4):
        positions = [n + step for n in lengths]
        logits = run(stages, caches, [ref.tokens[p : p + 1] for p in positions], last_only=True)
        for p, request_logits in zip(positions, logits, strict=True):
            assert max_difference(request_logits[0].float().cpu(), ref.logits[p]) <= tolerance


def test_top_k_returns_float32_values_and_int64_ids_largest_first() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, 0.0, 4.0, 2.0]], dtype=torch.float16)
    values, token_ids = top_k(logits, 2)
    assert values.dtype == torch.float32 and token_ids.dtype == torch.int64
    assert token_ids.tolist() == [[1, 3], [2, 3]]
    assert values.tolist() == [[3.0, 2.0], [4.0, 2.0]]
    assert top_k(logits[0], 10)[1].tolist() == [1, 3, 0, 2]  # k above the vocabulary: all of it
    with pytest.raises(InvalidArgument, match="k >= 1"):
        top_k(logits, 0)


def test_ranked_top_k_packs_float32_bits_and_ids_with_ties_to_the_lower_id() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0], [0.5, 0.25, 4.0, 0.25, 0.25, 8.0]], dtype=torch.float16)
    packed = ranked_top_k(logits, 4)
    assert packed.dtype == torch.int32 and packed.shape == (2, 8)
    values, ids = packed[:, :4].view(torch.float32), packed[:, 4:]
    assert values.tolist() == [[3.0, 3.0, 3.0, 2.0], [8.0, 4.0, 0.5, 0.25]]
    assert ids[0].tolist() == [1, 2, 4, 3] and ids[1, :3].tolist() == [5, 2, 0]
