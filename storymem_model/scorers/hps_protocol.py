"""Wire format between `HPSScorer` (main env) and `hps_worker` (HPS env) over stdin/stdout.

One message = a JSON header and an optional numpy array, length-prefixed:

    uint32 big-endian  header length H
    H bytes            header, UTF-8 JSON object
    uint64 big-endian  body length B (0 = no array)
    B bytes            body, the array in .npy format (np.save, allow_pickle=False)

Requests: `{"op": "score", "prompts": [...] | null}` + images (N, H, W, 3) uint8;
`{"op": "ping"}`; `{"op": "close"}`. Replies: `{"ok": true, ...}` (+ scores (N,) float32 for
"score") or `{"ok": false, "error": "...", "error_type": "ScorerError" | ...}`. The worker
first sends `{"ok": true, "event": "ready", ...}` once the model is loaded (or an error and
exits). Only numpy and the standard library: imported on both sides.
"""
from __future__ import annotations

import io
import json
import struct
from typing import BinaryIO

import numpy as np

_HEADER_LEN = struct.Struct(">I")
_BODY_LEN = struct.Struct(">Q")
MAX_HEADER_BYTES = 16 * 1024 * 1024


class ProtocolError(RuntimeError):
    """The byte stream does not follow the framing (truncated, oversized, not JSON/npy)."""


def encode_message(header: dict, array: np.ndarray | None = None) -> bytes:
    """Header dict (+ optional array) -> framed bytes."""
    head = json.dumps(header).encode("utf-8")
    body = b""
    if array is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        body = buffer.getvalue()
    return _HEADER_LEN.pack(len(head)) + head + _BODY_LEN.pack(len(body)) + body


def write_message(stream: BinaryIO, header: dict, array: np.ndarray | None = None) -> None:
    stream.write(encode_message(header, array))
    stream.flush()


def _read_exact(stream: BinaryIO, count: int, allow_eof: bool = False) -> bytes | None:
    chunks, missing = [], count
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            if allow_eof and missing == count:
                return None
            raise ProtocolError(f"stream ended after {count - missing} of {count} bytes")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_message(stream: BinaryIO) -> tuple[dict, np.ndarray | None] | None:
    """Next (header, array-or-None) from the stream; None at a clean end of stream."""
    raw = _read_exact(stream, _HEADER_LEN.size, allow_eof=True)
    if raw is None:
        return None
    (head_len,) = _HEADER_LEN.unpack(raw)
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head_len} bytes is larger than {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_read_exact(stream, head_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"header is not UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    (body_len,) = _BODY_LEN.unpack(_read_exact(stream, _BODY_LEN.size))
    if body_len == 0:
        return header, None
    body = _read_exact(stream, body_len)
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ProtocolError(f"body is not a .npy array: {error}") from None
    return header, array
