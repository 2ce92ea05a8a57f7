"""What a node may answer to a step: a frame per request it was sent, in order, with the position, rows,
width and dtype its stage implies, and finite values. Anything else is misbehaviour, never forwarded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.errors import SynapseError
from services.wire import syn1


class Misbehaviour(SynapseError):
    """A node answered for work it was not given, or with numbers no honest stage computes."""


@dataclass(frozen=True)
class StageShape:
    """What the gateway expects of a node's answers: from its assignment and the model's shape."""

    n_embd: int
    vocab_size: int
    is_last: bool
    top_k: int  # candidates per token on the last stage; 0 = full logits
    activation_dtype: syn1.DType  # the wire dtype of activations the node was told to send

    def expected(self, given: syn1.Header) -> tuple[syn1.MessageType, int, int, int]:
        """(type, position, rows, cols) of the answer to one input frame."""
        if not self.is_last:
            return syn1.MessageType.ACTIVATION, given.position, given.rows, self.n_embd
        # The last stage answers each request's newest position, or every position of a speculative draft.
        if given.flags & syn1.Flag.PREDICTED:
            position, rows = given.position, given.rows
        else:
            position, rows = given.position + given.rows - 1, 1
        if self.top_k:
            return syn1.MessageType.OUTPUT, position, rows, min(self.top_k, self.vocab_size)
        return syn1.MessageType.LOGITS, position, rows, self.vocab_size


def check_answer(sent: bytes, answer: bytes, shape: StageShape, max_payload_bytes: int) -> None:
    """Raises Misbehaviour (or FrameError, for bytes that do not parse) unless `answer` is what an honest node
    running `shape` sends back for the input message `sent`."""
    given = [header for _, header in syn1.headers(sent, max_payload_bytes=max_payload_bytes)]
    frames = syn1.decode_frames(answer, max_payload_bytes=max_payload_bytes)
    if len(frames) != len(given):
        raise Misbehaviour(f"answered {len(frames)} frames to a step of {len(given)} requests")
    for index, (header, frame) in enumerate(zip(given, frames, strict=True)):
        _check_frame(index, header, frame, shape)


def _check_frame(index: int, given: syn1.Header, frame: syn1.Frame, shape: StageShape) -> None:
    msg_type, position, rows, cols = shape.expected(given)
    got = (frame.msg_type, frame.request_id, frame.position, frame.rows, frame.cols)
    want = (msg_type, given.request_id, position, rows, cols)
    if got != want:
        raise Misbehaviour(f"frame {index}: answered {_describe(*got)} where {_describe(*want)} was due")
    if msg_type is syn1.MessageType.ACTIVATION and frame.dtype is not shape.activation_dtype:
        raise Misbehaviour(f"frame {index}: activations in {frame.dtype.name}, assigned {shape.activation_dtype.name}")
    if msg_type is syn1.MessageType.ACTIVATION and frame.predicted != bool(given.flags & syn1.Flag.PREDICTED):
        raise Misbehaviour(f"frame {index}: the PREDICTED flag of request {frame.request_id} was not passed on")
    values = frame.scales if frame.scales is not None else frame.array
    if not np.isfinite(values).all():
        raise Misbehaviour(f"frame {index}: {frame.msg_type.name} of request {frame.request_id} holds NaN or Inf")
    if frame.token_ids is not None and (frame.token_ids.min() < 0 or frame.token_ids.max() >= shape.vocab_size):
        raise Misbehaviour(f"frame {index}: token ids outside [0, {shape.vocab_size})")


def _describe(msg_type: syn1.MessageType, request_id: int, position: int, rows: int, cols: int) -> str:
    return f"{msg_type.name} request {request_id} position {position} shape ({rows}, {cols})"
