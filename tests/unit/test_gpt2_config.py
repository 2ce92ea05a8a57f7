"""GPT2Config: reading and validating Hugging Face config.json dicts, and writing them back."""

from __future__ import annotations

import json

import pytest
import transformers

from services.common.errors import InvalidArgument
from services.common.gpt2.config import GPT2Config
from tests.checkpoints import make_random_checkpoint

HUB_GPT2_CONFIG = {  # the fields of openai-community/gpt2's config.json that matter here
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
}


def test_from_dict_reads_the_hub_gpt2_config() -> None:
    config = GPT2Config.from_dict(HUB_GPT2_CONFIG)
    assert config == GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    assert config.head_dim == 64


def test_from_dict_reads_a_config_written_by_transformers(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path, n_layer=3, n_head=3, n_embd=48, vocab_size=101, n_positions=40)
    config = GPT2Config.from_dict(json.loads((folder / "config.json").read_text()))
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size) == (3, 3, 48, 101)
    assert config.n_positions == 40
    assert config.head_dim == 16


def test_to_dict_round_trips_and_transformers_accepts_it() -> None:
    config = GPT2Config(n_layer=5, n_head=3, n_embd=48, vocab_size=97, n_positions=64, layer_norm_epsilon=1e-6)
    written = config.to_dict()
    assert written["model_type"] == "gpt2"
    assert written["n_ctx"] == 64
    assert written["activation_function"] == "gelu_new"
    assert GPT2Config.from_dict(json.loads(json.dumps(written))) == config
    hf_config = transformers.GPT2Config(**written)
    assert (hf_config.n_layer, hf_config.n_head, hf_config.n_embd) == (5, 3, 48)
    assert hf_config.layer_norm_epsilon == 1e-6


def test_from_dict_accepts_architectures_without_model_type_and_n_ctx_without_n_positions() -> None:
    raw = {k: v for k, v in HUB_GPT2_CONFIG.items() if k not in ("model_type", "n_positions")}
    assert GPT2Config.from_dict(raw).n_positions == 1024


def test_layer_norm_epsilon_defaults_to_1e_5() -> None:
    raw = {k: v for k, v in HUB_GPT2_CONFIG.items() if k != "layer_norm_epsilon"}
    assert GPT2Config.from_dict(raw).layer_norm_epsilon == 1e-5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "not a GPT-2 config"),
        ({"n_embd": 770}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"n_head": -2}, "n_head must be a positive integer"),
        ({"vocab_size": "50257"}, "vocab_size must be a positive integer"),
        ({"n_positions": 10.0}, "n_positions must be a positive integer"),
        ({"n_layer": True}, "n_layer must be a positive integer"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"n_inner": 1000}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ],
)
def test_from_dict_rejects_what_it_cannot_run(change: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        GPT2Config.from_dict({**HUB_GPT2_CONFIG, **change})


def test_from_dict_names_missing_fields() -> None:
    raw = {k: v for k, v in HUB_GPT2_CONFIG.items() if k not in ("n_head", "vocab_size")}
    with pytest.raises(InvalidArgument, match="missing n_head, vocab_size"):
        GPT2Config.from_dict(raw)


def test_from_dict_rejects_a_non_object() -> None:
    with pytest.raises(InvalidArgument, match="JSON object"):
        GPT2Config.from_dict([1, 2, 3])  # type: ignore[arg-type]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidArgument, match="divisible"):
        GPT2Config(n_layer=2, n_head=3, n_embd=32, vocab_size=97, n_positions=64)


def test_config_is_frozen() -> None:
    config = GPT2Config.from_dict(HUB_GPT2_CONFIG)
    with pytest.raises(AttributeError):
        config.n_layer = 3  # type: ignore[misc]


@pytest.mark.parametrize(("start", "end"), [(0, 0), (-1, 3), (3, 2), (0, 13), (12, 12)])
def test_check_layer_range_rejects_empty_or_outside_ranges(start: int, end: int) -> None:
    config = GPT2Config.from_dict(HUB_GPT2_CONFIG)
    with pytest.raises(InvalidArgument, match=r"layer range"):
        config.check_layer_range(start, end)


def test_check_layer_range_accepts_whole_and_single_layer_ranges() -> None:
    config = GPT2Config.from_dict(HUB_GPT2_CONFIG)
    config.check_layer_range(0, 12)
    config.check_layer_range(11, 12)
