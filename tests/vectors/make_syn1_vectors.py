"""Writes the shared SYN1 test vectors (tests/vectors/syn1/): .bin messages and index.json describing them.

Deterministic: same bytes on every run. Run `python -m tests.vectors.make_syn1_vectors` after a
deliberate format change; tests/unit/test_syn1.py fails when the committed files are stale.
Both test suites (pytest and `node --test tests/webnode/`) read only what this writes.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np

from services.wire import syn1
from services.wire.syn1 import DType, Frame, MessageType

OUT_DIR = Path(__file__).parent / "syn1"
ACT, TOK, OUT, LOG = MessageType.ACTIVATION, MessageType.TOKENS, MessageType.OUTPUT, MessageType.LOGITS
F32, F16, I8, I32 = DType.F32, DType.F16, DType.I8, DType.I32


def _floats(array: np.ndarray) -> list:
    """Nested lists of numbers; JSON has no inf/nan, so those become the strings "inf", "-inf", "nan"."""
    return [
        [v if np.isfinite(v) else ("nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")) for v in row]
        for row in array.astype(np.float64).tolist()
    ]


def _expected(frame: Frame, source: np.ndarray | None) -> dict:
    """Header fields and decoded contents of one frame, as the index records them."""
    ints = frame.dtype in (I8, I32)
    return {
        "msg_type": int(frame.msg_type),
        "flags": int(frame.flags),
        "dtype": int(frame.dtype),
        "position": frame.position,
        "request_id": frame.request_id,
        "rows": frame.rows,
        "cols": frame.cols,
        "values": frame.array.tolist() if ints else _floats(frame.array),
        "token_ids": None if frame.token_ids is None else frame.token_ids.tolist(),
        "scales": None if frame.scales is None else _floats(frame.scales[None])[0],
        "source_f32": None if source is None else _floats(source),
    }


def _sample(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) * 2).astype(np.float32)


def _f16_specials() -> np.ndarray:
    """f32 inputs that exercise f32 -> f16 rounding: ties, subnormals, overflow, signed zero."""
    values = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 1e5, -1e5, 2**-14, 2**-24, 2**-25]
    values += [1.5 * 2**-25, 1 + 2**-11, 1 + 3 * 2**-11, 3.14159265, -2.718281828, 1e-8, 0.1]
    return np.array([values], dtype=np.float32)


def _top_k(rng: np.random.Generator, rows: int, k: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    values = -np.sort(-(rng.standard_normal((rows, k)) * 3), axis=1).astype(dtype)
    ids = np.stack([rng.choice(50257, size=k, replace=False) for _ in range(rows)]).astype(np.int32)
    return values, ids


def _logits_f16(rng: np.random.Generator, rid: int, pos: int, rows: int, cols: int):
    source = _sample(rng, rows, cols)
    return Frame.logits(rid, pos, source), F16, source


def valid_messages() -> list[tuple[str, str, list[tuple[Frame, DType | None, np.ndarray | None]]]]:
    """(name, description, frames) where each frame is (frame, dtype to encode with, f32 source or None)."""
    rng = np.random.default_rng(20240601)

    def act(rid: int, pos: int, rows: int, cols: int, dtype: DType, specials: np.ndarray | None = None):
        source = _sample(rng, rows, cols) if specials is None else specials
        if dtype is I8 and rows >= 3:
            source[1] = 0  # an all-zero row: scale 0
        frame = Frame.activation(rid, pos, source)
        return frame, dtype, (None if dtype is F32 else source)

    out16 = _top_k(rng, 1, 64, np.float16)
    out32 = _top_k(rng, 2, 5, np.float32)
    out16_small = _top_k(rng, 1, 5, np.float16)
    return [
        ("activation_f32_1x48", "one position, f32", [act(1, 0, 1, 48, F32)]),
        ("activation_f32_3x97", "several positions, odd cols", [act(2, 10, 3, 97, F32)]),
        ("activation_f16_1x768", "GPT-2 124M decode hop at f16: 1560 bytes", [act(3, 41, 1, 768, F16)]),
        ("activation_f16_1x97", "f16 with 2 padding bytes", [act(4, 7, 1, 97, F16)]),
        (
            "activation_f16_specials",
            "f32 -> f16 rounding edge cases",
            [act(5, 0, 1, 19, F16, _f16_specials())],
        ),
        ("activation_i8_3x48", "int8 with per-row scales, one zero row", [act(6, 100, 3, 48, I8)]),
        ("activation_i8_1x97", "int8 with 3 padding bytes", [act(7, 3, 1, 97, I8)]),
        ("activation_i8_1x768", "GPT-2 124M decode hop at int8: 796 bytes", [act(8, 41, 1, 768, I8)]),
        ("tokens_1", "one decode token", [(Frame.tokens(9, 41, [464]), None, None)]),
        ("tokens_5", "a prompt for prefill", [(Frame.tokens(10, 0, [15496, 11, 995, 0, 50256]), None, None)]),
        (
            "tokens_predicted_3",
            "a decode token and a 2-token speculative draft (flag PREDICTED)",
            [(Frame.tokens(11, 42, [262, 3290, 13], predicted=True), None, None)],
        ),
        ("output_f16_1x64", "top-64 at f16: 408 bytes", [(Frame.output(11, 41, *out16), None, None)]),
        ("output_f32_2x5", "top-5 at f32, two positions", [(Frame.output(12, 8, *out32), None, None)]),
        ("logits_f32_1x48", "full logits, f32", [(Frame.logits(13, 2, _sample(rng, 1, 48)), None, None)]),
        ("logits_f16_2x97", "full logits, f16 from f32", [_logits_f16(rng, 14, 5, 2, 97)]),
        ("wide_fields", "position past 16 bits, request id 2**32-1", [act(0xFFFF_FFFF, 70000, 1, 4, F32)]),
        (
            "multi_frame_batch",
            "one step for three requests: three f16 frames, each padded",
            [act(20 + i, 30 + i, 1, 97, F16) for i in range(3)],
        ),
        (
            "multi_frame_mixed",
            "int8 activation, tokens, f16 top-5 back to back",
            [
                act(30, 12, 1, 97, I8),
                (Frame.tokens(31, 5, [318]), None, None),
                (Frame.output(32, 6, *out16_small), None, None),
            ],
        ),
    ]


def _header(msg_type: int, flags: int, dtype: int, rows: int, cols: int, magic: bytes = b"SYN1") -> bytes:
    return struct.pack("<4sBBBBIIII", magic, msg_type, flags, dtype, 0, 0, 1, rows, cols)


def invalid_messages() -> list[tuple[str, str, bytes]]:
    """(name, decoder, bytes); the expected error is whatever the Python decoder says, pinned in the index."""
    good = syn1.encode(Frame.activation(1, 0, np.linspace(-1, 1, 48, dtype=np.float32)[None]))
    f16 = syn1.encode(Frame.activation(1, 0, np.ones((1, 97), np.float32)), DType.F16)
    reserved = bytearray(good)
    reserved[7] = 1
    padding = bytearray(f16)
    padding[-1] = 7
    token = syn1.encode(Frame.tokens(1, 0, [464]))
    return [
        ("empty", "decode_frames", b""),
        ("short_header", "decode", good[:10]),
        ("bad_magic", "decode", _header(ACT, 0, F32, 1, 1, b"SYN2") + bytes(4)),
        ("byte_swapped_magic", "decode", _header(ACT, 0, F32, 1, 1, b"1NYS") + bytes(4)),
        ("reserved_byte", "decode", bytes(reserved)),
        ("unknown_type_0", "decode", _header(0, 0, F32, 1, 1) + bytes(4)),
        ("unknown_type_9", "decode", _header(9, 0, F32, 1, 1) + bytes(4)),
        ("unknown_dtype", "decode", _header(ACT, 0, 7, 1, 1) + bytes(4)),
        ("unknown_flag_bit", "decode", _header(ACT, 0x10, F32, 1, 1) + bytes(4)),
        ("flag_compressed", "decode", _header(ACT, 2, F32, 1, 1) + bytes(4)),
        ("flag_delta", "decode", _header(ACT, 4, F32, 1, 1) + bytes(4)),
        ("flag_predicted_on_output", "decode", _header(OUT, 8, F32, 1, 1) + bytes(8)),
        ("quantized_flag_on_f32", "decode", _header(ACT, 1, F32, 1, 1) + bytes(4)),
        ("i8_without_quantized_flag", "decode", _header(ACT, 0, I8, 1, 4) + bytes(8)),
        ("output_i8", "decode", _header(OUT, 1, I8, 1, 4) + bytes(24)),
        ("output_i32", "decode", _header(OUT, 0, I32, 1, 1) + bytes(8)),
        ("tokens_f32", "decode", _header(TOK, 0, F32, 1, 1) + bytes(4)),
        ("logits_i8", "decode", _header(LOG, 1, I8, 1, 4) + bytes(8)),
        ("zero_rows", "decode", _header(ACT, 0, F32, 0, 768)),
        ("tokens_cols_2", "decode", _header(TOK, 0, I32, 1, 2) + bytes(8)),
        ("oversize", "decode", _header(ACT, 0, F32, 4096, 4097)),
        ("huge_shape", "decode", _header(ACT, 0, F32, 0xFFFF_FFFF, 0xFFFF_FFFF)),
        ("truncated_payload", "decode", good[:-1]),
        ("missing_padding", "decode", f16[:-2]),
        ("nonzero_padding", "decode", bytes(padding)),
        ("trailing_bytes", "decode", good + bytes(4)),
        ("multi_second_truncated", "decode_frames", good + f16[:100]),
        ("multi_garbage_tail", "decode_frames", good + f16 + b"hello"),
        ("multi_too_many_frames", "decode_frames", token * (syn1.DEFAULT_MAX_FRAMES + 1)),
    ]


def f16_conversion_table() -> dict:
    """f32 bit patterns and the f16 bits numpy rounds them to: specials, ties, and random ones in range."""
    rng = np.random.default_rng(7)
    exponents = rng.integers(96, 146, 2000, dtype=np.uint32)  # around the f16 range, both sides
    mantissas = rng.integers(0, 1 << 23, 2000, dtype=np.uint32)
    signs = rng.integers(0, 2, 2000, dtype=np.uint32) << 31
    ties = (mantissas[:200] & ~np.uint32(0x1FFF)) | np.uint32(0x1000)  # exactly halfway cases
    random_bits = np.concatenate([signs | (exponents << 23) | mantissas, (exponents[:200] << 23) | ties])
    specials = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FE00000, 0x00000001]
    specials += [0x477FE000, 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x387FC000, 0x38800000]
    f32_bits = np.concatenate([np.array(specials, np.uint32), random_bits.astype(np.uint32)])
    with np.errstate(over="ignore"):  # overflow to inf is one of the cases
        f16_bits = f32_bits.view(np.float32).astype(np.float16).view(np.uint16)
    return {"f32_bits": f32_bits.tolist(), "f16_bits": f16_bits.tolist()}


def build(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    valid = []
    for name, description, frames in valid_messages():
        data = b"".join(syn1.encode(frame, dtype) for frame, dtype, _ in frames)
        (out_dir / f"{name}.bin").write_bytes(data)
        decoded = syn1.decode_frames(data)
        expected = [_expected(frame, source) for frame, (_, _, source) in zip(decoded, frames, strict=True)]
        valid.append({"name": name, "file": f"{name}.bin", "description": description, "frames": expected})
    invalid = []
    for name, decoder, data in invalid_messages():
        (out_dir / f"{name}.bin").write_bytes(data)
        try:
            (syn1.decode if decoder == "decode" else syn1.decode_frames)(data)
        except syn1.FrameError as error:
            invalid.append({"name": name, "file": f"{name}.bin", "decoder": decoder, "error": str(error)})
        else:
            raise AssertionError(f"invalid vector {name} decoded without error")
    index = {
        "format": "SYN1 vectors (docs/wire-protocol.md), made by python -m tests.vectors.make_syn1_vectors",
        "max_payload_bytes": syn1.DEFAULT_MAX_PAYLOAD_BYTES,
        "max_frames": syn1.DEFAULT_MAX_FRAMES,
        "valid": valid,
        "invalid": invalid,
        "f16_conversion": f16_conversion_table(),
    }
    (out_dir / "index.json").write_text(_dump(index))


def _dump(index: dict) -> str:
    """Readable JSON: one vector per line, so a diff shows which vector changed."""
    lines = ["{"]
    for position, (key, value) in enumerate(index.items()):
        comma = "," if position < len(index) - 1 else ""
        if isinstance(value, list):
            items = ",\n".join(f"    {json.dumps(item)}" for item in value)
            lines.append(f'  "{key}": [\n{items}\n  ]{comma}')
        else:
            lines.append(f'  "{key}": {json.dumps(value)}{comma}')
    return "\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write (default: %(default)s)")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
