"""SYN1 binary tensor frames: the bytes of every tensor between gateway and nodes (docs/wire-protocol.md).

A frame is a 24-byte header and a little-endian payload padded with zeros to a multiple of 4 bytes,
so frames sent back to back in one WebSocket message stay 4-byte aligned (typed-array views in the
browser need that). webnode/syn1.js is the JavaScript twin; tests/vectors/syn1/ proves they agree,
error messages included. Decoding is zero-copy: arrays are views of the received buffer.
Longer than most modules on purpose: the whole format in one file, checks in the order the doc lists.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

import numpy as np

from services.common.errors import InvalidArgument

MAGIC = b"SYN1"  # the ASCII bytes in this order: a hex dump reads 53 59 4e 31
HEADER_SIZE = 24
ALIGNMENT = 4
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
# Frames in one message: a step carries one per request in its batch. Walking 2.4 million 28-byte
# frames (a 64 MiB message) took a minute of the gateway's event loop; 1024 take a few milliseconds.
DEFAULT_MAX_FRAMES = 1024
_U32_MAX = 0xFFFF_FFFF
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
# magic, type u8, flags u8, dtype u8, reserved u8, position u32, request id u32, rows u32, cols u32
_HEADER = struct.Struct("<4sBBBBIIII")


class FrameError(InvalidArgument):
    """A SYN1 frame is malformed (decoding) or cannot be represented (encoding); the message says why."""


class MessageType(IntEnum):
    ACTIVATION = 1  # hidden states between stages, (positions, n_embd)
    TOKENS = 2  # token ids into the first stage, (positions, 1)
    OUTPUT = 3  # top-K of the last stage's logits: (positions, K) ids, then (positions, K) values
    LOGITS = 4  # full logits of the last stage, (positions, vocab)
    STATS = 5  # a node's timings for one step, (1, n) f32 ms; opens every step reply (docs/wire-protocol.md)


class DType(IntEnum):
    F32 = 1
    F16 = 2
    I8 = 3  # symmetric per-row int8: rows f32 scales, then rows*cols int8
    I32 = 4


class Flag(IntFlag):
    NONE = 0
    QUANTIZED = 1  # set exactly when dtype is I8
    COMPRESSED = 2  # reserved: rejected until a compression scheme is specified
    DELTA = 4  # reserved
    PREDICTED = 8  # TOKENS/ACTIVATION: rows after the first are a speculative draft; the last stage answers each


_KNOWN_FLAGS = 0x0F
_RESERVED_FLAGS = (Flag.COMPRESSED, Flag.DELTA)
_PREDICTABLE = (MessageType.TOKENS, MessageType.ACTIVATION)
_ALLOWED_DTYPES = {
    MessageType.ACTIVATION: (DType.F32, DType.F16, DType.I8),
    MessageType.TOKENS: (DType.I32,),
    MessageType.OUTPUT: (DType.F32, DType.F16),  # dtype of the values; ids are always i32
    MessageType.LOGITS: (DType.F32, DType.F16),
    MessageType.STATS: (DType.F32,),
}
# The activation dtypes a router may ask for (control.ActivationDType) and their SYN1 dtype.
ACTIVATION_DTYPES: dict[str, DType] = {"float16": DType.F16, "float32": DType.F32, "int8": DType.I8}
_WIRE_DTYPE = {DType.F32: "<f4", DType.F16: "<f2", DType.I8: "i1", DType.I32: "<i4"}
_ITEM_SIZE = {DType.F32: 4, DType.F16: 2, DType.I8: 1, DType.I32: 4}
_DTYPE_OF = {("f", 4): DType.F32, ("f", 2): DType.F16, ("i", 1): DType.I8, ("i", 4): DType.I32}


def payload_size(msg_type: MessageType, dtype: DType, rows: int, cols: int) -> int:
    """Payload bytes before padding: what rows, cols, type and dtype imply (the header has no length)."""
    size = rows * cols * _ITEM_SIZE[dtype]
    if dtype is DType.I8:
        size += 4 * rows  # one f32 scale per row
    if msg_type is MessageType.OUTPUT:
        size += 4 * rows * cols  # one i32 token id per value
    return size


class Header(NamedTuple):
    """The 24 header bytes, parsed and checked; enough for a gateway to route a frame unread.

    A NamedTuple: a gateway reads a header for every frame it forwards, and this builds in a third of a
    frozen dataclass's time."""

    msg_type: MessageType
    flags: Flag
    dtype: DType
    position: int  # sequence position of row 0; row i is position + i
    request_id: int
    rows: int
    cols: int

    @property
    def payload_size(self) -> int:
        return payload_size(self.msg_type, self.dtype, self.rows, self.cols)

    @property
    def frame_size(self) -> int:
        """Header + payload + zero padding to a multiple of 4 bytes."""
        return HEADER_SIZE + -(-self.payload_size // ALIGNMENT) * ALIGNMENT

    def pack(self) -> bytes:
        fields = (self.position, self.request_id, self.rows, self.cols)
        return _HEADER.pack(MAGIC, self.msg_type, self.flags, self.dtype, 0, *fields)


def read_header(
    buf: bytes | memoryview, offset: int = 0, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> Header:
    """Parse and check the header at `offset`; the payload is not looked at."""
    have = len(buf) - offset
    if have < HEADER_SIZE:
        raise FrameError(f"truncated header: need {HEADER_SIZE} bytes, got {have}")
    magic, msg_type, flags, dtype, reserved, position, request_id, rows, cols = _HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        hint = " (byte-swapped: write the ASCII bytes S Y N 1 in order)" if magic == MAGIC[::-1] else ""
        raise FrameError(f'bad magic {magic.hex()}: expected 53594e31 ("SYN1"){hint}')
    if reserved != 0:
        raise FrameError(f"reserved header byte at offset 7 is {reserved}, must be 0")
    header = Header(_message_type(msg_type), _flags(flags), _dtype(dtype), position, request_id, rows, cols)
    _check_header(header, max_payload_bytes)
    return header


# Lookups instead of enum construction: IntFlag(value) alone costs more than unpacking the whole header.
_TYPE_OF = {member.value: member for member in MessageType}
_DTYPE_OF_CODE = {member.value: member for member in DType}
_FLAG_OF = {value: Flag(value) for value in range(_KNOWN_FLAGS + 1) if not any(value & f for f in _RESERVED_FLAGS)}


def _message_type(value: int) -> MessageType:
    member = _TYPE_OF.get(value)
    if member is None:
        raise FrameError(
            f"unknown message type {value}: expected 1 (ACTIVATION), 2 (TOKENS), 3 (OUTPUT), 4 (LOGITS) or 5 (STATS)"
        )
    return member


def _dtype(value: int) -> DType:
    member = _DTYPE_OF_CODE.get(value)
    if member is None:
        raise FrameError(f"unknown dtype {value}: expected 1 (F32), 2 (F16), 3 (I8) or 4 (I32)")
    return member


def _flags(value: int) -> Flag:
    member = _FLAG_OF.get(value)
    if member is not None:
        return member
    if value & ~_KNOWN_FLAGS:
        raise FrameError(f"unknown flag bits 0x{value & ~_KNOWN_FLAGS:02x}: only bits 0-3 are defined")
    reserved = next(flag for flag in _RESERVED_FLAGS if value & flag)
    raise FrameError(f"flag {reserved.name} is reserved and not supported yet: send frames without it")


def _check_header(header: Header, max_payload_bytes: int | None) -> None:
    msg_type, dtype, rows, cols = header.msg_type, header.dtype, header.rows, header.cols
    allowed = _ALLOWED_DTYPES[msg_type]
    if dtype not in allowed:
        names = " or ".join(d.name for d in allowed)
        raise FrameError(f"dtype {dtype.name} is not allowed for {msg_type.name} frames: expected {names}")
    flags = int(header.flags)  # int arithmetic: IntFlag's operators build new members, slowly
    if bool(flags & 1) != (dtype is DType.I8):  # QUANTIZED
        raise FrameError(
            f"flag QUANTIZED must be set exactly when dtype is I8 (flags 0x{flags:02x}, dtype {dtype.name})"
        )
    if flags & 8 and msg_type not in _PREDICTABLE:  # PREDICTED
        raise FrameError(f"flag PREDICTED is for TOKENS and ACTIVATION frames, not {msg_type.name}")
    if rows < 1 or cols < 1:
        raise FrameError(f"empty shape ({rows}, {cols}): rows and cols must both be at least 1")
    if msg_type is MessageType.TOKENS and cols != 1:
        raise FrameError(f"TOKENS frame has cols={cols}, must be 1 (one token id per position)")
    size = header.payload_size
    if max_payload_bytes is not None and size > max_payload_bytes:
        raise FrameError(
            f"payload of {size} bytes for shape ({rows}, {cols}) exceeds the limit of {max_payload_bytes} bytes"
        )


@dataclass(frozen=True, eq=False)
class Frame:
    """One tensor on the wire. `array` is (rows, cols): f32/f16 values, int8 with `scales`, or i32 ids."""

    msg_type: MessageType
    request_id: int
    position: int  # sequence position of row 0
    array: np.ndarray  # (rows, cols)
    flags: Flag = Flag.NONE  # QUANTIZED is recomputed by encode from the dtype it writes
    token_ids: np.ndarray | None = None  # (rows, K) int32, OUTPUT only: the id of each value
    scales: np.ndarray | None = None  # (rows,) f32, only with an int8 array

    def __post_init__(self) -> None:
        msg_type = _message_type(int(self.msg_type))
        object.__setattr__(self, "msg_type", msg_type)
        object.__setattr__(self, "flags", Flag(int(self.flags)))
        for name in ("request_id", "position"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or not 0 <= value <= _U32_MAX:
                raise FrameError(f"{name} {value!r} does not fit in a u32")
            object.__setattr__(self, name, int(value))
        if msg_type is MessageType.TOKENS:
            object.__setattr__(self, "array", _as_int32(self.array, "token ids"))
        else:
            int8_ok = msg_type is MessageType.ACTIVATION and self.scales is not None
            object.__setattr__(self, "array", _as_float(self.array, int8_ok))
        if self.array.ndim != 2:
            raise FrameError(f"array must be 2-D (rows, cols), got shape {self.array.shape}")
        if (self.token_ids is not None) != (msg_type is MessageType.OUTPUT):
            raise FrameError("token_ids go with OUTPUT frames and only with them")
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", _as_int32(self.token_ids, "token_ids"))
            if self.token_ids.shape != self.array.shape:
                raise FrameError(f"token_ids shape {self.token_ids.shape} != values shape {self.array.shape}")
        if (self.scales is not None) != (self.array.dtype == np.int8):
            raise FrameError("scales go with an int8 array and only with it")
        if self.scales is not None:
            object.__setattr__(self, "scales", np.asarray(self.scales, dtype=np.float32))
            if self.scales.shape != (self.array.shape[0],):
                raise FrameError(f"scales shape {self.scales.shape} != (rows,) = ({self.array.shape[0]},)")

    @classmethod
    def checked(
        cls, header: Header, array: np.ndarray, token_ids: np.ndarray | None, scales: np.ndarray | None
    ) -> Frame:
        """A frame from a header read_header checked and the arrays it implies: __post_init__'s checks hold
        by construction, so they are skipped (decoding every frame of every step pays for them otherwise)."""
        frame = object.__new__(cls)
        for name, value in (
            ("msg_type", header.msg_type),
            ("request_id", header.request_id),
            ("position", header.position),
            ("array", array),
            ("flags", header.flags),
            ("token_ids", token_ids),
            ("scales", scales),
        ):
            object.__setattr__(frame, name, value)
        return frame

    @classmethod
    def activation(
        cls,
        request_id: int,
        position: int,
        hidden: np.ndarray,
        scales: np.ndarray | None = None,
        *,
        predicted: bool = False,
    ) -> Frame:
        """Hidden states (positions, n_embd); pass int8 `hidden` with its (positions,) `scales`. `predicted`
        carries a draft's flag on from the TOKENS frame the activations came from."""
        flags = Flag.PREDICTED if predicted else Flag.NONE
        return cls(MessageType.ACTIVATION, request_id, position, hidden, flags, scales=scales)

    @classmethod
    def tokens(
        cls, request_id: int, position: int, token_ids: np.ndarray | Iterable[int], *, predicted: bool = False
    ) -> Frame:
        """Token ids (positions,) into the first stage; stored as (positions, 1). `predicted`: the ids after
        the first are a speculative draft, and the last stage answers every row (Flag.PREDICTED)."""
        flags = Flag.PREDICTED if predicted else Flag.NONE
        return cls(MessageType.TOKENS, request_id, position, np.asarray(token_ids).reshape(-1, 1), flags)

    @classmethod
    def output(cls, request_id: int, position: int, values: np.ndarray, token_ids: np.ndarray) -> Frame:
        """Top-K of the last stage: (positions, K) logit values and their (positions, K) token ids."""
        return cls(MessageType.OUTPUT, request_id, position, values, token_ids=token_ids)

    @classmethod
    def logits(cls, request_id: int, position: int, logits: np.ndarray) -> Frame:
        """Full logits (positions, vocab)."""
        return cls(MessageType.LOGITS, request_id, position, logits)

    @classmethod
    def stats(cls, values: np.ndarray) -> Frame:
        """A node's step timings (1, n) f32 milliseconds; request id and position are 0."""
        return cls(MessageType.STATS, 0, 0, np.asarray(values, dtype=np.float32).reshape(1, -1))

    @property
    def rows(self) -> int:
        return self.array.shape[0]

    @property
    def predicted(self) -> bool:
        return bool(self.flags & Flag.PREDICTED)

    @property
    def cols(self) -> int:
        return self.array.shape[1]

    @property
    def dtype(self) -> DType:
        """The wire dtype this frame's array has as it stands."""
        return _DTYPE_OF[(self.array.dtype.kind, self.array.dtype.itemsize)]

    def to_float32(self) -> np.ndarray:
        """Values as f32 (rows, cols): int8 dequantized, f16 widened, f32 returned as is."""
        if self.scales is not None:
            return dequantize_int8(self.array, self.scales)
        return self.array.astype(np.float32, copy=False)


def _as_float(array: np.ndarray, int8_ok: bool) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype in (np.float32, np.float16) or (int8_ok and array.dtype == np.int8):
        return array
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    raise FrameError(f"values must be floating point (or int8 with scales), got {array.dtype}")


def _as_int32(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.int32:
        return array
    if array.dtype.kind not in "iu" or (array.size and (array.min() < _I32_MIN or array.max() > _I32_MAX)):
        raise FrameError(f"{what} must be integers that fit in an i32, got {array.dtype}")
    return array.astype(np.int32)


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: scale = max|x| / 127 (f32), q = round_half_even(x / scale) in [-127, 127].

    (rows, cols) f32 -> ((rows, cols) int8, (rows,) f32). An all-zero row gets scale 0 and zeros.
    """
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise FrameError("cannot quantize non-finite values (inf or nan) to int8")
    scales = (np.abs(values).max(axis=1) / np.float32(127)).astype(np.float32)
    divisor = np.where(scales > 0, scales, np.float32(1))[:, None]
    quantized = np.clip(np.rint(values / divisor), -127, 127).astype(np.int8)
    return quantized, scales


def dequantize_int8(quantized: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(rows, cols) int8 and (rows,) f32 scales -> (rows, cols) f32 = q * scale."""
    return quantized.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def encode(frame: Frame, dtype: DType | None = None) -> bytes:
    """Frame -> bytes. `dtype` converts on the way (f32 -> F16 or I8); None keeps the array's own."""
    target = frame.dtype if dtype is None else _dtype(int(dtype))
    flags = _flags((int(frame.flags) & ~1) | (1 if target is DType.I8 else 0))  # QUANTIZED follows the dtype
    rows, cols = frame.array.shape
    if rows > _U32_MAX or cols > _U32_MAX:
        raise FrameError(f"shape ({rows}, {cols}) does not fit in u32 rows and cols")
    header = Header(frame.msg_type, flags, target, frame.position, frame.request_id, rows, cols)
    _check_header(header, max_payload_bytes=None)  # the receiver's limit is the one that counts
    parts = [header.pack()]
    if frame.msg_type is MessageType.OUTPUT:
        parts.append(frame.token_ids.astype("<i4", copy=False).tobytes())
    if target is DType.I8:
        quantized, scales = (frame.array, frame.scales) if frame.scales is not None else quantize_int8(frame.array)
        parts += [scales.astype("<f4", copy=False).tobytes(), quantized.tobytes()]
    elif target is DType.I32:
        parts.append(frame.array.astype("<i4", copy=False).tobytes())
    else:
        values = frame.array if frame.scales is None else frame.to_float32()
        with np.errstate(over="ignore"):  # f16: finite values past ±65504 become ±inf, as IEEE rounds
            parts.append(values.astype(_WIRE_DTYPE[target], copy=False).tobytes())
    parts.append(bytes(header.frame_size - HEADER_SIZE - header.payload_size))
    return b"".join(parts)


def decode(buf: bytes | memoryview, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Frame:
    """Bytes holding exactly one frame -> Frame whose arrays are read-only views of `buf`."""
    view = _byte_view(buf)
    header = read_header(view, 0, max_payload_bytes=max_payload_bytes)
    _check_whole(view, 0, header)
    if header.frame_size != len(view):
        raise FrameError(f"{len(view) - header.frame_size} trailing bytes after a {header.frame_size}-byte frame")
    return _frame_at(view, 0, header)


def encode_frames(frames: Iterable[Frame], dtype: DType | None = None) -> bytes:
    """Several frames back to back in one message (a batch for one step); `dtype` applies to each."""
    encoded = [encode(frame, dtype) for frame in frames]
    if not encoded:
        raise FrameError("empty message: it holds no frames")
    return b"".join(encoded)


def headers(
    buf: bytes | memoryview,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> Iterator[tuple[int, Header]]:
    """(offset, header) of every frame of a message, in order: each header checked and its frame whole.

    The one walk over a message's headers; payloads stay unread (a gateway routes frames this way).
    Any defect raises FrameError naming the frame's index and byte offset.
    """
    view = _byte_view(buf)
    if len(view) == 0:
        raise FrameError("empty message: it holds no frames")
    offset = index = 0
    while offset < len(view):
        if index == max_frames:
            raise FrameError(f"frame {index} at byte {offset}: a message holds at most {max_frames} frames")
        try:
            header = read_header(view, offset, max_payload_bytes=max_payload_bytes)
            _check_whole(view, offset, header)
        except FrameError as error:
            raise FrameError(f"frame {index} at byte {offset}: {error}") from None
        yield offset, header
        offset += header.frame_size
        index += 1


def decode_frames(
    buf: bytes | memoryview,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> list[Frame]:
    """A message of one or more frames back to back -> frames in order; any defect fails the message."""
    view = _byte_view(buf)
    frames: list[Frame] = []
    for offset, header in headers(view, max_payload_bytes=max_payload_bytes, max_frames=max_frames):
        try:
            frames.append(_frame_at(view, offset, header))
        except FrameError as error:
            raise FrameError(f"frame {len(frames)} at byte {offset}: {error}") from None
    return frames


def message_rows(buf: bytes | memoryview) -> int:
    """Total rows (token positions) of the frames in a message, from their headers alone."""
    return sum(header.rows for _, header in headers(buf))


def _byte_view(buf: bytes | memoryview) -> memoryview:
    try:
        view = memoryview(buf)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as error:
        raise FrameError(f"expected contiguous bytes, got {type(buf).__name__}: {error}") from None


def _check_whole(view: memoryview, offset: int, header: Header) -> None:
    if len(view) - offset < header.frame_size:
        raise FrameError(f"truncated frame: header declares {header.frame_size} bytes, got {len(view) - offset}")


def _frame_at(view: memoryview, offset: int, header: Header) -> Frame:
    """The frame whose checked header sits at `offset`: padding checked, arrays viewed in place."""
    end = offset + header.frame_size
    payload_end = offset + HEADER_SIZE + header.payload_size
    if any(view[payload_end:end]):
        index = next(i for i in range(payload_end, end) if view[i])
        raise FrameError(f"nonzero padding byte at offset {index - offset}")
    rows, cols, count = header.rows, header.cols, header.rows * header.cols
    at = offset + HEADER_SIZE
    token_ids = scales = None
    if header.msg_type is MessageType.OUTPUT:
        token_ids = np.frombuffer(view, "<i4", count, at).reshape(rows, cols)
        at += 4 * count
    if header.dtype is DType.I8:
        scales = np.frombuffer(view, "<f4", rows, at)
        at += 4 * rows
    array = np.frombuffer(view, _WIRE_DTYPE[header.dtype], count, at).reshape(rows, cols)
    return Frame.checked(header, array, token_ids, scales)
