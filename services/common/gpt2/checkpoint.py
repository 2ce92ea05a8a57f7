"""Loading a Hugging Face GPT-2 checkpoint (local folder or hub name) into validated canonical numpy arrays.

No torch: the control plane (sharder, router, gateway) runs without it. bfloat16 weights are widened to float32.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from services.common.gpt2 import safetensors_file
from services.common.gpt2.config import GPT2Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMBEDDING_NAMES = ("wte.weight", "wpe.weight")
FINAL_NAMES = ("ln_f.weight", "ln_f.bias")
HF_PREFIX = "transformer."
TIED_HEAD_NAME = "lm_head.weight"
# Causal-mask buffers some exporters store with the weights; they are not parameters.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# What the weights may be stored as; bfloat16 arrives here already widened to float32 (numpy has none).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
CHUNK_ELEMENTS = 1 << 20  # finiteness is checked in chunks, so temporaries stay small next to a 154 MB embedding
# A hub repo id: "name" or "namespace/name" (letters, digits, '-', '_', '.'), not starting with '.'.
HUB_NAME = re.compile(r"^[\w\-][\w\-.]*(/[\w\-][\w\-.]*)?$")


@dataclass
class Checkpoint:
    """A GPT-2 model in memory: its config and every parameter under its canonical name.

    Names drop the Hugging Face "transformer." prefix; weights keep the Conv1D layout
    (c_attn.weight is (n_embd, 3 * n_embd), y = x @ W + b) and the dtype stored in the file (float32 or
    float16; bfloat16 is widened to float32). lm_head.weight is not kept: GPT-2 ties it to wte.weight.
    The native node turns arrays into torch tensors with torch.from_numpy (no copy).
    """

    model_id: str  # the hub name, or the local folder's name
    config: GPT2Config
    tensors: dict[str, np.ndarray]
    # sha256 of what the weights were read from (model.safetensors, then config.json): shards written from
    # this checkpoint carry it, so changed weights under the same name are never served from old shards.
    fingerprint: str = ""


def layer_tensor_names(config: GPT2Config, layer: int) -> list[str]:
    """Canonical names of the twelve tensors of transformer block `layer`."""
    if not 0 <= layer < config.n_layer:
        raise InvalidArgument(f"layer {layer} is outside [0, {config.n_layer})")
    prefix = f"h.{layer}."
    parts = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    return [f"{prefix}{part}.{kind}" for part in parts for kind in ("weight", "bias")]


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the model with its shape, in checkpoint order."""
    embd, inner = config.n_embd, 4 * config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, embd),
        "wpe.weight": (config.n_positions, embd),
    }
    block_shapes = (
        (embd,),
        (embd,),
        (embd, 3 * embd),
        (3 * embd,),
        (embd, embd),
        (embd,),
        (embd,),
        (embd,),
        (embd, inner),
        (inner,),
        (inner, embd),
        (embd,),
    )
    for layer in range(config.n_layer):
        shapes.update(zip(layer_tensor_names(config, layer), block_shapes, strict=True))
    shapes["ln_f.weight"] = (embd,)
    shapes["ln_f.bias"] = (embd,)
    return shapes


def stage_tensor_names(config: GPT2Config, start: int, end: int) -> list[str]:
    """Canonical tensors a stage running layers [start, end) needs.

    The first stage gets the embeddings, the last gets ln_f and also wte.weight (its tied LM head).
    """
    config.check_layer_range(start, end)
    names: list[str] = []
    if start == 0:
        names.extend(EMBEDDING_NAMES)
    for layer in range(start, end):
        names.extend(layer_tensor_names(config, layer))
    if end == config.n_layer:
        names.extend(FINAL_NAMES)
        if start != 0:
            names.append("wte.weight")
    return names


def load_checkpoint(source: str | Path, *, progress: bool = True, cache_dir: str | Path | None = None) -> Checkpoint:
    """Load and validate a GPT-2 checkpoint from a local folder or a Hugging Face hub name.

    A local folder holds config.json and model.safetensors. A hub name ("gpt2",
    "openai-community/gpt2-medium") is downloaded into the hub cache (cache_dir overrides it).
    """
    folder, model_id = _resolve_source(source, progress=progress, cache_dir=cache_dir)
    config = GPT2Config.from_dict(_read_config(folder / CONFIG_FILE))
    digest = hashlib.sha256()
    tensors = _read_tensors(folder / WEIGHTS_FILE, digest)
    digest.update((folder / CONFIG_FILE).read_bytes())
    return Checkpoint(
        model_id=model_id,
        config=config,
        tensors=_canonical_tensors(tensors, config),
        fingerprint=digest.hexdigest(),
    )


def _resolve_source(source: str | Path, *, progress: bool, cache_dir: str | Path | None) -> tuple[Path, str]:
    path = Path(source).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    if path.exists():
        raise InvalidArgument(f"{path} is a file; pass the folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    name = str(source)
    if isinstance(source, Path) or not HUB_NAME.match(name) or name.startswith("."):
        raise NotFound(f"no checkpoint folder at {path}")
    return _download(name, progress=progress, cache_dir=cache_dir), name


def _download(name: str, *, progress: bool, cache_dir: str | Path | None) -> Path:
    """Fetch config.json and model.safetensors of a hub repo; tqdm progress comes from huggingface_hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        folder = Path(snapshot_download(name, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE], cache_dir=cache_dir))
    except HFValidationError as error:
        raise InvalidArgument(f"{name!r} is neither a local folder nor a valid hub name: {error}") from error
    except RepositoryNotFoundError as error:
        raise NotFound(f"no model {name!r} on the Hugging Face hub (or no access to it); check the name") from error
    except _network_errors() as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise Unavailable(
            f"could not reach the Hugging Face hub to fetch {name!r} ({reason}); "
            f"pass a local folder holding {CONFIG_FILE} and {WEIGHTS_FILE} instead"
        ) from error
    finally:
        if silence:
            enable_progress_bars()
    if not (folder / WEIGHTS_FILE).is_file():
        raise InvalidArgument(f"hub model {name!r} has no {WEIGHTS_FILE}; only safetensors checkpoints are supported")
    return folder


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when offline (HF_HUB_OFFLINE) or when the hub cannot be reached."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [
        LocalEntryNotFoundError,  # offline or unreachable, and not in the cache
        OfflineModeIsEnabled,
        HfHubHTTPError,  # hub answered with an error status (5xx, rate limit)
        ConnectionError,
        TimeoutError,
    ]
    for http_module in ("httpx2", "httpx"):  # the HTTP client huggingface_hub uses, by version
        try:
            errors.append(__import__(http_module).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise NotFound(f"{path} does not exist; a checkpoint folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataLoss(f"{path} is not valid JSON: {error}") from error


def _read_tensors(path: Path, digest: Any = None) -> dict[str, np.ndarray]:
    """The file's tensors; `digest` (a hashlib object) is fed every byte as it is read."""
    if not path.is_file():
        raise NotFound(f"{path} does not exist; a checkpoint folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return safetensors_file.parse(safetensors_file.read_file(path, digest=digest), path)
    except DataLoss as error:
        raise DataLoss(f"{path} is truncated or corrupt: {error}") from error


def _canonical_tensors(raw: dict[str, np.ndarray], config: GPT2Config) -> dict[str, np.ndarray]:
    """Strip the prefix, drop buffers and the tied head, and check every name, shape and dtype."""
    shapes = expected_shapes(config)
    tensors: dict[str, np.ndarray] = {}
    head: np.ndarray | None = None
    for stored_name, tensor in raw.items():
        name = stored_name.removeprefix(HF_PREFIX)
        if name.endswith(BUFFER_SUFFIXES):
            continue
        if name == TIED_HEAD_NAME:
            head = tensor
            continue
        if name not in shapes:
            raise InvalidArgument(f"unexpected tensor {stored_name!r} for a {config.n_layer}-layer GPT-2")
        if name in tensors:
            raise InvalidArgument(f"tensor {name!r} is stored twice (with and without {HF_PREFIX!r})")
        tensors[name] = tensor
    for name, shape in shapes.items():
        if name not in tensors:
            raise InvalidArgument(f"checkpoint is missing tensor {name!r} (expected shape {list(shape)})")
        _check_tensor(name, tensors[name], shape)
    if head is not None and not np.array_equal(head, tensors["wte.weight"]):
        raise InvalidArgument(
            f"{TIED_HEAD_NAME} differs from wte.weight; GPT-2 ties the LM head to the token embedding"
        )
    return {name: tensors[name] for name in shapes}


def _check_tensor(name: str, tensor: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise InvalidArgument(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise InvalidArgument(f"tensor {name!r} has dtype {tensor.dtype}; expected float32, float16 or bfloat16")
    if not all_finite(tensor):
        raise DataLoss(f"tensor {name!r} holds NaN or infinite values")


def all_finite(tensor: np.ndarray) -> bool:
    """No NaN or infinity, checked in chunks of CHUNK_ELEMENTS."""
    flat = tensor.reshape(-1)
    return all(bool(np.isfinite(flat[i : i + CHUNK_ELEMENTS]).all()) for i in range(0, flat.size, CHUNK_ELEMENTS))
