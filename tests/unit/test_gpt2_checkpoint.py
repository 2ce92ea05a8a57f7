"""load_checkpoint: local folders with and without the transformer. prefix, every way a checkpoint is bad."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from services.common.gpt2.checkpoint import (
    EMBEDDING_NAMES,
    FINAL_NAMES,
    expected_shapes,
    layer_tensor_names,
    load_checkpoint,
    stage_tensor_names,
)
from services.common.gpt2.config import GPT2Config
from tests.checkpoints import load_reference, make_random_checkpoint

WEIGHTS = "model.safetensors"


def rewrite_weights(folder: Path, change) -> None:
    """Apply change(tensors) to a checkpoint's stored tensors and save them back."""
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, {"format": "pt"})


@pytest.mark.parametrize("with_prefix", [True, False])
def test_loads_canonical_tensors_equal_to_the_transformers_model(tmp_path, with_prefix: bool) -> None:
    folder = make_random_checkpoint(tmp_path, n_layer=3, n_head=2, n_embd=32, with_prefix=with_prefix)
    checkpoint = load_checkpoint(folder, progress=False)
    config = checkpoint.config
    assert config == GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
    assert checkpoint.model_id == folder.name
    assert list(checkpoint.tensors) == list(expected_shapes(config))
    reference = load_reference(folder).state_dict()
    for name, tensor in checkpoint.tensors.items():
        assert isinstance(tensor, np.ndarray), name  # numpy: the sharder runs without torch
        assert np.array_equal(tensor, reference[f"transformer.{name}"].numpy()), name
    assert checkpoint.tensors["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert checkpoint.tensors["h.2.mlp.c_proj.weight"].shape == (128, 32)


def test_accepts_a_string_path_buffers_and_a_tied_lm_head(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path / "model", with_prefix=False)

    def add_buffers_and_head(tensors: dict) -> None:
        tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        tensors["h.1.attn.masked_bias"] = torch.tensor(-1e4)
        tensors["lm_head.weight"] = tensors["wte.weight"].clone()

    rewrite_weights(folder, add_buffers_and_head)
    checkpoint = load_checkpoint(str(folder), progress=False)
    assert set(checkpoint.tensors) == set(expected_shapes(checkpoint.config))


def test_rejects_an_lm_head_that_is_not_tied(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}))
    with pytest.raises(InvalidArgument, match=re.escape("lm_head.weight differs from wte.weight")):
        load_checkpoint(folder)


def test_names_a_missing_tensor(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    rewrite_weights(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(InvalidArgument, match=r"missing tensor 'h.1.mlp.c_fc.bias' \(expected shape \[128\]\)"):
        load_checkpoint(folder)


def test_names_a_tensor_with_the_wrong_shape(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    rewrite_weights(
        folder, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(96, 32)})
    )  # the nn.Linear layout instead of Conv1D
    with pytest.raises(InvalidArgument, match=r"'h.0.attn.c_attn.weight' has shape \[96, 32\], expected \[32, 96\]"):
        load_checkpoint(folder)


def test_rejects_tensors_of_layers_the_config_does_not_have(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    rewrite_weights(folder, lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(32)}))
    with pytest.raises(InvalidArgument, match=re.escape("unexpected tensor 'transformer.h.2.ln_1.weight'")):
        load_checkpoint(folder)


def test_keeps_float16_widens_bfloat16_and_rejects_integer_tensors(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    rewrite_weights(folder, lambda t: t.update({name: x.half() for name, x in t.items()}))
    assert load_checkpoint(folder).tensors["wte.weight"].dtype == np.float16
    rewrite_weights(folder, lambda t: t.update({name: x.bfloat16() for name, x in t.items()}))
    widened = load_checkpoint(folder).tensors["wte.weight"]  # numpy has no bfloat16: exactly the same values
    assert widened.dtype == np.float32
    assert np.array_equal(widened, load_file(folder / WEIGHTS)["transformer.wte.weight"].float().numpy())
    rewrite_weights(folder, lambda t: t.update({"transformer.ln_f.bias": torch.zeros(32, dtype=torch.int32)}))
    with pytest.raises(InvalidArgument, match=re.escape("'ln_f.bias' has dtype int32")):
        load_checkpoint(folder)
    rewrite_weights(folder, lambda t: t.update({"transformer.ln_f.bias": torch.zeros(32, dtype=torch.float8_e4m3fn)}))
    with pytest.raises(DataLoss, match=re.escape("'transformer.ln_f.bias' has dtype F8_E4M3")):
        load_checkpoint(folder)


def test_nan_weights_are_data_loss(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    rewrite_weights(folder, lambda t: t["transformer.wpe.weight"].__setitem__((3, 4), float("nan")))
    with pytest.raises(DataLoss, match=re.escape("'wpe.weight' holds NaN")):
        load_checkpoint(folder)


def test_truncated_weights_are_data_loss_naming_the_file(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DataLoss, match=r"model\.safetensors is truncated or corrupt"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "header",
    [b"", b"\x05\x00", (40).to_bytes(8, "little") + b"{this is not json}" + b" " * 22, b"\xff" * 64],
)
def test_corrupt_header_is_data_loss(tmp_path, header: bytes) -> None:
    folder = make_random_checkpoint(tmp_path)
    (folder / WEIGHTS).write_bytes(header)
    with pytest.raises(DataLoss, match=re.escape(str(folder / WEIGHTS))):
        load_checkpoint(folder)


def test_non_gpt2_config_is_rejected(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="not a GPT-2 config"):
        load_checkpoint(folder)


def test_unreadable_config_is_data_loss(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    (folder / "config.json").write_text('{"n_layer": 2,')
    with pytest.raises(DataLoss, match=r"config\.json is not valid JSON"):
        load_checkpoint(folder)


def test_missing_files_and_paths_are_not_found(tmp_path) -> None:
    with pytest.raises(NotFound, match=re.escape("config.json does not exist")):
        load_checkpoint(tmp_path)
    folder = make_random_checkpoint(tmp_path / "model")
    (folder / WEIGHTS).unlink()
    with pytest.raises(NotFound, match=re.escape("model.safetensors does not exist")):
        load_checkpoint(folder)
    for missing in (tmp_path / "nowhere", str(tmp_path / "nowhere"), "./nowhere", "../models/gpt2"):
        with pytest.raises(NotFound, match="no checkpoint folder"):
            load_checkpoint(missing)


def test_a_file_instead_of_a_folder_is_invalid(tmp_path) -> None:
    folder = make_random_checkpoint(tmp_path)
    with pytest.raises(InvalidArgument, match="pass the folder"):
        load_checkpoint(folder / WEIGHTS)


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2-medium"])
def test_hub_name_while_offline_is_unavailable_and_suggests_a_local_folder(tmp_path, monkeypatch, name: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(
        Unavailable, match=re.escape("local folder holding config.json and model.safetensors")
    ) as caught:
        load_checkpoint(name, progress=False, cache_dir=tmp_path / "hub-cache")
    assert f"could not reach the Hugging Face hub to fetch {name!r}" in str(caught.value)


def test_hub_name_with_the_hub_unreachable_is_unavailable(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(Unavailable, match=re.escape("pass a local folder holding config.json")):
        load_checkpoint("gpt2", progress=False, cache_dir=tmp_path / "hub-cache")


def test_tensor_name_helpers_cover_the_model_exactly_once() -> None:
    config = GPT2Config(n_layer=4, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
    shapes = expected_shapes(config)
    assert len(shapes) == 2 + 12 * 4 + 2
    assert layer_tensor_names(config, 3)[:2] == ["h.3.ln_1.weight", "h.3.ln_1.bias"]
    assert shapes["h.3.mlp.c_fc.weight"] == (32, 128)
    by_layers = [
        *EMBEDDING_NAMES,
        *(n for i in range(4) for n in layer_tensor_names(config, i)),
        *FINAL_NAMES,
    ]
    assert sorted(by_layers) == sorted(shapes)
    with pytest.raises(InvalidArgument, match="layer 4 is outside"):
        layer_tensor_names(config, 4)


def test_stage_tensor_names_give_the_last_stage_the_tied_embedding() -> None:
    config = GPT2Config(n_layer=4, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
    first, middle, last = (stage_tensor_names(config, a, b) for a, b in ((0, 1), (1, 3), (3, 4)))
    assert first == [*EMBEDDING_NAMES, *layer_tensor_names(config, 0)]
    assert middle == layer_tensor_names(config, 1) + layer_tensor_names(config, 2)
    assert last == [*layer_tensor_names(config, 3), *FINAL_NAMES, "wte.weight"]
    whole = stage_tensor_names(config, 0, 4)
    assert sorted(whole) == sorted(expected_shapes(config))
    with pytest.raises(InvalidArgument, match="layer range"):
        stage_tensor_names(config, 2, 2)
