"""Property-based fuzzing of the SYN1 decoder: whatever the bytes, it decodes or raises FrameError, and it never
allocates more than what it was given (a header's claim is checked before anything is sized by it).

Bounded and derandomized so the suite stays fast and repeatable; tests/fuzz/fuzz_syn1.py runs the same
properties under atheris for as long as you like.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.wire import syn1
from services.wire.syn1 import FrameError

VECTORS = Path(__file__).parents[1] / "vectors" / "syn1"
INDEX = json.loads((VECTORS / "index.json").read_text())
VALID = [(VECTORS / vector["file"]).read_bytes() for vector in INDEX["valid"]]
INVALID = [(VECTORS / vector["file"]).read_bytes() for vector in INDEX["invalid"]]
HEADER = struct.Struct("<4sBBBBIIII")
FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# Python objects per decoded byte: a 28-byte TOKENS frame becomes a Frame and its views, ~600 bytes.
OBJECT_BYTES_PER_BYTE = 32
FIXED_BYTES = 16 * 1024

U32 = st.integers(0, 2**32 - 1)
SHAPE = st.one_of(st.integers(0, 4), st.integers(0, 70000), U32, st.sampled_from([2**31, 2**32 - 1, 4096, 4097]))


def decode_checked(data: bytes) -> list[syn1.Frame] | None:
    """decode_frames, which must decode or raise FrameError, within an allocation budget set by len(data)."""
    tracemalloc.start()
    try:
        frames = syn1.decode_frames(data)
    except FrameError:
        frames = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= FIXED_BYTES + OBJECT_BYTES_PER_BYTE * len(data), f"{peak} bytes for a {len(data)}-byte message"
    if frames is not None:  # what decoded re-encodes to the same bytes: nothing was misread
        assert syn1.encode_frames(frames) == data
    return frames


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A header with every field drawn: real and unknown types, dtypes, flags, lying shapes, wrong magic."""
    magic = draw(st.one_of(st.just(b"SYN1"), st.just(b"1NYS"), st.binary(min_size=4, max_size=4)))
    fields = [draw(st.integers(0, 7)), draw(st.sampled_from([0, 1, 2, 4, 8, 16, 255])), draw(st.integers(0, 6))]
    reserved = draw(st.sampled_from([0, 0, 0, 1]))
    return HEADER.pack(magic, *fields, reserved, draw(U32), draw(U32), draw(SHAPE), draw(SHAPE))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes set, cut short, or with bytes added."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


@st.composite
def lying_sizes(draw: st.DrawFn) -> bytes:
    """A valid message whose rows or cols claim more (or less) than the bytes that follow."""
    data = bytearray(draw(st.sampled_from(VALID)))
    struct.pack_into("<I", data, draw(st.sampled_from([16, 20])), draw(SHAPE))
    return bytes(data)


@st.composite
def spliced(draw: st.DrawFn) -> bytes:
    """Frames in any order and mix: valid and invalid messages back to back, a header with random bytes after."""
    parts = draw(st.lists(st.one_of(st.sampled_from(VALID), st.sampled_from(INVALID), headers()), max_size=5))
    return b"".join(parts) + draw(st.binary(max_size=16))


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decode_checked(data)


@pytest.mark.timeout(120)
@FUZZ
@given(st.tuples(headers(), st.binary(max_size=256)).map(b"".join))
def test_drawn_headers_with_random_payloads(data: bytes) -> None:
    decode_checked(data)


@pytest.mark.timeout(120)
@FUZZ
@given(mutated())
def test_mutated_and_truncated_vectors(data: bytes) -> None:
    decode_checked(data)


@pytest.mark.timeout(120)
@FUZZ
@given(lying_sizes())
def test_lying_size_fields_never_decode_unless_true(data: bytes) -> None:
    frames = decode_checked(data)
    if frames is not None:
        assert sum(syn1.read_header(data, offset).frame_size for offset, _ in syn1.headers(data)) == len(data)


@pytest.mark.timeout(120)
@FUZZ
@given(spliced())
def test_frames_in_any_order_and_mix(data: bytes) -> None:
    decode_checked(data)


@pytest.mark.timeout(120)
@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_read_header_and_headers_agree_with_decode(data: bytes, rows: int, cols: int) -> None:
    """Header-only routing (the gateway's path) accepts exactly what full decoding accepts."""
    lied = bytearray(data)
    struct.pack_into("<II", lied, 16, rows, cols)
    for message in (data, bytes(lied)):
        try:
            walked = list(syn1.headers(message))
        except FrameError:
            walked = None
        assert (walked is None) == (decode_checked(message) is None)


def test_headers_that_claim_the_limit_or_more_allocate_nothing_for_it() -> None:
    """The worst claims, each sent as a bare 24-byte header: refused within a few KiB."""
    act, f32, i8 = int(syn1.MessageType.ACTIVATION), int(syn1.DType.F32), int(syn1.DType.I8)
    limit_rows = syn1.DEFAULT_MAX_PAYLOAD_BYTES // (4 * 4096)  # exactly the payload limit at 4096 cols
    claims = [(act, 0, f32, limit_rows, 4096), (act, 0, f32, 2**32 - 1, 2**32 - 1), (act, 1, i8, 2**32 - 1, 1)]
    for msg_type, flags, dtype, rows, cols in claims:
        data = HEADER.pack(b"SYN1", msg_type, flags, dtype, 0, 0, 1, rows, cols)
        tracemalloc.start()
        with pytest.raises(FrameError, match=r"truncated frame|exceeds the limit"):
            syn1.decode_frames(data + bytes(1000))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < FIXED_BYTES, (rows, cols, peak)


def test_a_message_of_many_tiny_frames_is_refused_after_the_limit() -> None:
    """2.4 million 28-byte frames fit in 64 MiB; the walk stops at max_frames instead of at the end."""
    token = syn1.encode(syn1.Frame.tokens(1, 0, [464]))
    assert len(syn1.decode_frames(token * syn1.DEFAULT_MAX_FRAMES)) == syn1.DEFAULT_MAX_FRAMES
    with pytest.raises(FrameError, match="a message holds at most 1024 frames"):
        syn1.decode_frames(token * (syn1.DEFAULT_MAX_PAYLOAD_BYTES // len(token)))
    with pytest.raises(FrameError, match="at most 2 frames"):
        list(syn1.headers(token * 3, max_frames=2))
