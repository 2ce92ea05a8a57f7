"""`synapse shard` and `synapse plan` run through services.cli.main on a tiny random checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from safetensors.torch import load_file, save_file

from services.cli import main
from services.commands.plan import parse_memory
from services.common.gpt2.config import GPT2Config
from services.sharder.footprint import footprint
from services.sharder.placement import NodeCapacity, plan_placement
from services.sharder.random_weights import known_shape
from services.sharder.shards import read_index, read_manifest, read_shard
from tests.checkpoints import make_random_checkpoint

N_LAYER = 3
MODEL = "tiny-gpt2"


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, n_layer=N_LAYER)


@pytest.fixture(scope="module")
def overflowing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with one weight of the last layer too large for float16 (finite in float32)."""
    folder = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, n_layer=N_LAYER)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors[f"transformer.h.{N_LAYER - 1}.mlp.c_fc.weight"][0, 0] = 1e6
    save_file(tensors, weights, {"format": "pt"})
    return folder


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


# --- synapse shard ---------------------------------------------------------------------------


@pytest.mark.parametrize(("parts", "ranges"), [(1, [(0, 3)]), (2, [(0, 2), (2, 3)]), (3, [(0, 1), (1, 2), (2, 3)])])
def test_shard_writes_even_ranges_and_prints_a_summary(
    checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: int, ranges: list
) -> None:
    out = tmp_path / "shards"
    assert main(["shard", str(checkpoint_dir), "--parts", str(parts), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    index = read_index(out)
    assert [(m.layer_start, m.layer_end) for m in index.shards] == ranges
    for manifest in index.shards:
        assert manifest.dtype == "float16"
        read_shard(manifest, out)  # size, sha256 and tensors check out
        row = next(line for line in captured.out.splitlines() if line.startswith(manifest.shard_id))
        start, end = manifest.layer_start, manifest.layer_end
        assert row.split() == [
            manifest.shard_id,
            f"[{start},",
            f"{end})",
            f"{manifest.byte_size:,}",
            manifest.sha256[:12],
        ]
    total = sum(m.byte_size for m in index.shards)
    assert f"{parts} shard(s), {total:,} bytes, in {out}" in captured.out
    assert f"sharding {MODEL}" in captured.err  # the tqdm bar
    assert not [name for name in files_in(out) if name.endswith(".tmp")]


def test_shard_float32(checkpoint_dir: Path, tmp_path: Path) -> None:
    assert main(["shard", str(checkpoint_dir), "--parts", "2", "--out", str(tmp_path), "--dtype", "float32"]) == 0
    manifest = read_manifest(tmp_path / f"{MODEL}-L2-3-float32.json")
    assert manifest.dtype == "float32"
    assert {str(t.dtype) for t in read_shard(manifest, tmp_path).values()} == {"float32"}


def test_shard_of_an_offline_hub_name_exits_2_and_suggests_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    out = tmp_path / "shards"
    assert main(["shard", "gpt2", "--parts", "2", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "synapse shard: could not reach the Hugging Face hub to fetch 'gpt2'" in error
    assert "pass a local folder holding config.json and model.safetensors" in error
    assert not out.exists()


def test_shard_with_more_parts_than_layers_exits_2_before_writing(
    checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    assert main(["shard", str(checkpoint_dir), "--parts", "4", "--out", str(out)]) == 2
    assert "cannot split 3 layers into 4 parts; use 1 to 3 parts" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("parts", ["0", "-1", "two"])
def test_shard_rejects_a_bad_parts_count_as_a_usage_error(
    checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], parts: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["shard", str(checkpoint_dir), "--parts", parts, "--out", str(tmp_path / "shards")])
    assert exited.value.code == 2
    assert "argument --parts" in capsys.readouterr().err


def test_shard_of_a_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shard", str(tmp_path / "nowhere"), "--parts", "1", "--out", str(tmp_path / "out")]) == 2
    assert "no checkpoint folder at" in capsys.readouterr().err


def test_failed_shard_run_into_a_new_folder_leaves_nothing(
    overflowing_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "shards"
    # The first shard [0, 2) is written completely before the second one overflows float16.
    assert main(["shard", str(overflowing_dir), "--parts", "2", "--out", str(out)]) == 2
    assert f"tensor 'h.{N_LAYER - 1}.mlp.c_fc.weight' overflows float16; shard as float32" in (capsys.readouterr().err)
    assert not out.exists()
    assert main(["shard", str(overflowing_dir), "--parts", "2", "--out", str(out), "--dtype", "float32"]) == 0


def test_failed_shard_run_keeps_what_the_folder_held_and_adds_nothing(
    checkpoint_dir: Path, overflowing_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    assert main(["shard", str(checkpoint_dir), "--parts", "1", "--out", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    assert main(["shard", str(overflowing_dir), "--parts", "3", "--out", str(out)]) == 2
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before


def test_shard_into_another_models_folder_exits_2_and_changes_nothing(
    checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    other = shutil.copytree(checkpoint_dir, tmp_path / "other-model")
    assert main(["shard", str(other), "--parts", "1", "--out", str(out)]) == 0
    before = files_in(out)
    assert main(["shard", str(checkpoint_dir), "--parts", "2", "--out", str(out)]) == 2
    assert "already holds shards of 'other-model'" in capsys.readouterr().err
    assert files_in(out) == before


# --- synapse plan ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1234", 1234),
        ("512B", 512),
        ("2K", 2048),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("2Gi", 2 << 30),
        ("2GiB", 2 << 30),
        ("1.5G", 3 << 29),
        ("1T", 1 << 40),
        ("2GB", 2 * 10**9),
        ("600MB", 600 * 10**6),
        ("4kb", 4000),
    ],
)
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_memory(text) == size


def config_of(folder: Path) -> GPT2Config:
    return GPT2Config.from_dict(json.loads((folder / "config.json").read_text()))


def plan_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "node"])
    rows = []
    for line in lines[header + 1 :]:
        if not line.split()[0].isdigit():
            break
        rows.append(line.split())
    return rows


def test_plan_from_a_checkpoint_folder_matches_plan_placement(
    checkpoint_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = ["fast:1M:300", "slow:1M:100", "tiny:1K:1000"]
    assert main(["plan", str(checkpoint_dir), *[arg for node in nodes for arg in ("--node", node)]]) == 0
    output = capsys.readouterr().out
    config = config_of(checkpoint_dir)
    expected = plan_placement(
        footprint(config, "float16"),
        [
            NodeCapacity("fast", 1 << 20, 300.0),
            NodeCapacity("slow", 1 << 20, 100.0),
            NodeCapacity("tiny", 1024, 1000.0),
        ],
    )
    rows = plan_rows(output)
    assert [(row[1], row[2], row[3]) for row in rows] == [(a.node_id, f"[{a.start},", f"{a.end})") for a in expected]
    assert output.startswith(f"{MODEL}: {N_LAYER} layers, float16")
    assert "bottleneck: stage" in output
    assert "no layers: tiny (cannot hold one layer)" in output


def test_plan_from_a_config_file_and_from_a_hub_name_offline(
    checkpoint_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", str(checkpoint_dir / "config.json"), "--node", "a:1M:2"]) == 0
    model = footprint(config_of(checkpoint_dir), "float16")
    seconds = (N_LAYER + model.head_work_layers) / 2  # layers + LM head work, at 2 layers/s
    needed = model.total_bytes
    assert plan_rows(capsys.readouterr().out) == [
        [
            "0",
            "a",
            "[0,",
            "3)",
            f"{needed / 1024:.1f}",
            "KiB",
            "1.0",
            "MiB",
            f"{100 * needed / (1 << 20):.0f}%",
            f"{1000 * seconds:.2f}",
        ]
    ]
    nodes = ["--node", "laptop:4G:900", "--node", "phone:600MB:300", "--node", "spare:4G:900"]
    assert main(["plan", "gpt2", *nodes]) == 0
    output = capsys.readouterr().out
    expected = plan_placement(
        footprint(known_shape("gpt2"), "float16"),
        [
            NodeCapacity("laptop", 4 << 30, 900.0),
            NodeCapacity("phone", 600 * 10**6, 300.0),
            NodeCapacity("spare", 4 << 30, 900.0),
        ],
    )
    assert [row[1] for row in plan_rows(output)] == [a.node_id for a in expected]
    assert output.startswith("gpt2: 12 layers, float16")


def test_plan_counts_the_kv_cache_and_dtype(checkpoint_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", str(checkpoint_dir), "--node", "a:10M:1", "--dtype", "float32", "--kv-cache-tokens", "64"]
    assert main(args) == 0
    config = config_of(checkpoint_dir)
    needed = footprint(config, "float32", kv_cache_tokens=64).total_bytes
    assert plan_rows(capsys.readouterr().out)[0][4:6] == [f"{needed / 1024:.1f}", "KiB"]


def test_plan_without_nodes_exits_2_and_says_how_to_give_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt2"]) == 2
    assert "synapse plan: no nodes given; pass --node ID:MEMORY:SPEED" in capsys.readouterr().err


def test_plan_without_enough_memory_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt2", "--node", "a:100M:1", "--node", "b:90M:1"]) == 2
    error = capsys.readouterr().err
    assert "synapse plan: not enough memory to place the model: it needs 326.1 MB" in error
    assert "the 2 node(s) have 199.2 MB" in error


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("a:1G", "is not ID:MEMORY:SPEED"),
        (":1G:1", "is not ID:MEMORY:SPEED"),
        ("a:lots:1", "memory 'lots' is not a size"),
        ("a:5Q:1", "memory '5Q' is not a size"),
        ("a:0:1", "memory '0' is less than one byte"),
        ("a:1G:0", "speed '0' must be a number > 0"),
        ("a:1G:fast", "speed 'fast' must be a number > 0"),
        ("a:1G:nan", "speed 'nan' must be a number > 0"),
    ],
)
def test_plan_rejects_a_malformed_node_as_a_usage_error(
    node: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan", "gpt2", "--node", node])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_with_a_repeated_node_id_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt2", "--node", "a:1G:1", "--node", "a:2G:1"]) == 2
    assert "node 'a' is listed twice" in capsys.readouterr().err


def test_plan_of_an_unknown_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "someone/llama", "--node", "a:1G:1"]) == 2
    assert "'someone/llama' is not a folder, a config.json file or a known GPT-2 shape" in capsys.readouterr().err
    assert main(["plan", str(tmp_path), "--node", "a:1G:1"]) == 2
    assert f"{tmp_path / 'config.json'} does not exist" in capsys.readouterr().err
