"""services.wire.syn1 against the shared SYN1 vectors (tests/vectors/syn1/) and hostile input."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.wire import syn1
from services.wire.syn1 import DType, Flag, Frame, FrameError, MessageType
from tests.vectors import make_syn1_vectors

VECTORS = Path(__file__).parents[1] / "vectors" / "syn1"
INDEX = json.loads((VECTORS / "index.json").read_text())
_NUMPY = {DType.F32: np.float32, DType.F16: np.float16, DType.I8: np.int8, DType.I32: np.int32}


def _load(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def _floats(values: list) -> np.ndarray:
    """Index numbers (inf/nan written as strings) -> f32 array."""
    return np.array([[float(v) for v in row] for row in values], dtype=np.float32)


def _bits(array: np.ndarray) -> np.ndarray:
    """f32 bit patterns, so -0.0 and 0.0 differ in comparisons."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def _frame_from_index(entry: dict) -> Frame:
    dtype = DType(entry["dtype"])
    values = entry["values"]
    array = np.array(values, np.int64) if dtype in (DType.I8, DType.I32) else _floats(values)
    return Frame(
        MessageType(entry["msg_type"]),
        entry["request_id"],
        entry["position"],
        array.astype(_NUMPY[dtype]),
        Flag(entry["flags"]),
        token_ids=None if entry["token_ids"] is None else np.array(entry["token_ids"], np.int32),
        scales=None if entry["scales"] is None else _floats([entry["scales"]])[0],
    )


def _assert_matches(frame: Frame, entry: dict) -> None:
    fields = ("msg_type", "flags", "dtype", "position", "request_id", "rows", "cols")
    header = (frame.msg_type, frame.flags, frame.dtype, frame.position, frame.request_id)
    assert (*header, frame.rows, frame.cols) == tuple(entry[field] for field in fields)
    if frame.dtype in (DType.I8, DType.I32):
        assert frame.array.tolist() == entry["values"]
    else:
        np.testing.assert_array_equal(_bits(frame.array.astype(np.float32)), _bits(_floats(entry["values"])))
    if entry["scales"] is None:
        assert frame.scales is None
    else:
        np.testing.assert_array_equal(_bits(frame.scales), _bits(_floats([entry["scales"]])[0]))
    assert (None if frame.token_ids is None else frame.token_ids.tolist()) == entry["token_ids"]


def test_committed_vectors_match_the_generator(tmp_path: Path) -> None:
    make_syn1_vectors.build(tmp_path)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == sorted(path.name for path in VECTORS.iterdir())
    for name in written:
        assert (tmp_path / name).read_bytes() == _load(name), f"{name} is stale: rerun the generator"


@pytest.mark.parametrize("vector", INDEX["valid"], ids=lambda vector: vector["name"])
def test_valid_vector_decodes_to_the_index(vector: dict) -> None:
    data = _load(vector["file"])
    frames = syn1.decode_frames(data)
    assert len(frames) == len(vector["frames"])
    for frame, entry in zip(frames, vector["frames"], strict=True):
        _assert_matches(frame, entry)
    if len(frames) == 1:
        _assert_matches(syn1.decode(memoryview(data)), vector["frames"][0])


@pytest.mark.parametrize("vector", INDEX["valid"], ids=lambda vector: vector["name"])
def test_valid_vector_encodes_to_the_exact_bytes(vector: dict) -> None:
    data = _load(vector["file"])
    assert syn1.encode_frames([_frame_from_index(entry) for entry in vector["frames"]]) == data
    parts = []
    for entry in vector["frames"]:
        frame = _frame_from_index(entry)
        if entry["source_f32"] is not None:  # f16 rounding and int8 quantization from the f32 source
            frame = Frame(frame.msg_type, frame.request_id, frame.position, _floats(entry["source_f32"]))
        parts.append(syn1.encode(frame, DType(entry["dtype"])))
    assert b"".join(parts) == data


@pytest.mark.parametrize("vector", INDEX["invalid"], ids=lambda vector: vector["name"])
def test_invalid_vector_fails_with_the_pinned_message(vector: dict) -> None:
    decoder = syn1.decode if vector["decoder"] == "decode" else syn1.decode_frames
    with pytest.raises(FrameError) as caught:
        decoder(_load(vector["file"]))
    assert str(caught.value) == vector["error"]
    assert isinstance(caught.value, InvalidArgument)


def test_header_bytes_are_as_documented() -> None:
    """docs/wire-protocol.md's worked example: a GPT-2 decode hop at f16."""
    frame = Frame.activation(request_id=7, position=41, hidden=np.zeros((1, 768), np.float32))
    data = syn1.encode(frame, DType.F16)
    assert data[:24].hex(" ") == "53 59 4e 31 01 00 02 00 29 00 00 00 07 00 00 00 01 00 00 00 00 03 00 00"
    assert len(data) == 24 + 1536


def test_wire_sizes_for_gpt2_meet_the_design_targets() -> None:
    hidden = np.random.default_rng(0).standard_normal((1, 768)).astype(np.float32)
    activation = Frame.activation(1, 0, hidden)
    assert len(syn1.encode(activation, DType.F16)) == 1560 <= 1600
    assert len(syn1.encode(activation, DType.I8)) == 796 <= 850
    top_k = Frame.output(1, 0, np.zeros((1, 64), np.float16), np.arange(64, dtype=np.int32)[None])
    assert len(syn1.encode(top_k)) == 408 <= 500
    assert len(syn1.encode(top_k, DType.F32)) == 536  # over 0.5 KB: why OUTPUT defaults to f16
    assert len(syn1.encode(Frame.tokens(1, 0, [464]))) == 28


def test_decode_is_zero_copy_and_read_only() -> None:
    data = bytearray(_load("multi_frame_mixed.bin"))
    frames = syn1.decode_frames(data)
    buffer = np.frombuffer(data, np.uint8)
    assert all(np.shares_memory(frame.array, buffer) for frame in frames)
    assert frames[0].scales is not None and np.shares_memory(frames[0].scales, buffer)
    assert not syn1.decode_frames(bytes(data))[0].array.flags.writeable


def test_read_header_sizes_a_frame_without_its_payload() -> None:
    header = syn1.read_header(_load("output_f16_1x64.bin")[:24])
    assert (header.msg_type, header.dtype, header.rows, header.cols) == (MessageType.OUTPUT, DType.F16, 1, 64)
    assert (header.payload_size, header.frame_size) == (384, 408)


def test_max_payload_bytes_is_configurable() -> None:
    data = _load("activation_f16_1x768.bin")
    with pytest.raises(FrameError, match="exceeds the limit of 1000 bytes"):
        syn1.decode(data, max_payload_bytes=1000)
    assert syn1.decode(data, max_payload_bytes=1536).cols == 768


def test_every_truncation_fails_except_at_frame_boundaries() -> None:
    for vector in INDEX["valid"]:
        data = _load(vector["file"])
        boundaries, offset = set(), 0
        while offset < len(data):  # cut exactly between frames, a message is a valid shorter batch
            offset += syn1.read_header(data, offset).frame_size
            boundaries.add(offset)
        for length in range(len(data)):
            if length not in boundaries:
                with pytest.raises(FrameError):
                    syn1.decode_frames(data[:length])


def test_random_bytes_and_mutated_headers_raise_only_frame_error() -> None:
    rng = random.Random(1234)
    base = _load("activation_i8_1x97.bin")
    for trial in range(3000):
        if trial % 2:
            data = rng.randbytes(rng.randrange(64))
        else:
            mutated = bytearray(base)
            mutated[rng.randrange(4, 24)] = rng.randrange(256)
            data = bytes(mutated)
        with contextlib.suppress(FrameError):  # decoding is fine too; any other exception fails
            syn1.decode_frames(data)


def test_int8_round_trip_is_within_half_a_step() -> None:
    values = np.random.default_rng(1).standard_normal((4, 97)).astype(np.float32)
    values[2] *= 1e-3
    quantized, scales = syn1.quantize_int8(values)
    assert np.abs(quantized).max() == 127
    error = np.abs(syn1.dequantize_int8(quantized, scales) - values)
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    frame = syn1.decode(syn1.encode(Frame.activation(1, 0, values), DType.I8))
    np.testing.assert_array_equal(frame.to_float32(), syn1.dequantize_int8(quantized, scales))


def test_f16_conversion_table_is_numpy_rounding() -> None:
    table = INDEX["f16_conversion"]
    floats = np.array(table["f32_bits"], np.uint32).view(np.float32)
    with np.errstate(over="ignore"):
        assert floats.astype(np.float16).view(np.uint16).tolist() == table["f16_bits"]


def test_frame_converts_what_it_can_and_refuses_the_rest() -> None:
    assert Frame.activation(1, 0, np.ones((1, 4))).array.dtype == np.float32  # f64 -> f32
    assert Frame.tokens(1, 0, np.array([1, 2], np.int64)).array.shape == (2, 1)
    with pytest.raises(FrameError, match="2-D"):
        Frame.activation(1, 0, np.ones(4, np.float32))
    with pytest.raises(FrameError, match="int8 with scales"):
        Frame.activation(1, 0, np.ones((1, 4), np.int8))
    with pytest.raises(FrameError, match="token_ids shape"):
        Frame.output(1, 0, np.ones((1, 4), np.float16), np.ones((1, 3), np.int32))
    with pytest.raises(FrameError, match="request_id 4294967296 does not fit"):
        Frame.tokens(2**32, 0, [1])
    with pytest.raises(FrameError, match="fit in an i32"):
        Frame.tokens(1, 0, [2**40])
    with pytest.raises(FrameError, match="non-finite"):
        syn1.quantize_int8(np.array([[1.0, np.inf]], np.float32))


def test_encode_refuses_what_the_format_cannot_say() -> None:
    activation = Frame.activation(1, 0, np.ones((1, 4), np.float32))
    with pytest.raises(FrameError, match="flag DELTA is reserved"):
        syn1.encode(Frame(MessageType.ACTIVATION, 1, 0, activation.array, Flag.DELTA))
    with pytest.raises(FrameError, match="dtype I8 is not allowed for OUTPUT"):
        syn1.encode(Frame.output(1, 0, np.ones((1, 2), np.float32), np.ones((1, 2), np.int32)), DType.I8)
    with pytest.raises(FrameError, match="empty message"):
        syn1.encode_frames([])
    assert syn1.decode(syn1.encode(activation, DType.I8)).flags == Flag.QUANTIZED
