"""Forwards of a fixed number of rows, so a row's result never depends on its batch mates.

Kernels are picked by tensor shape; the same frame embedded in a batch of 17 or of 32 can
differ in the last bits, and a keyframe threshold can then fall the other way. Every scorer
forward therefore has exactly `size` rows: inputs are cut into chunks of `size` and the
last chunk is padded with `filler` rows whose results are dropped. The in-process runner,
the Ray scorer actors (which group several stories' requests into one call) and the Serve
scorer deployments all call the same scorer objects, so a frame gets byte-identical numbers
wherever it is scored - what byte-identical resume across hosts relies on.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

DEFAULT_ROWS = 32  # an 81-frame shot pads to 96 rows


def run_fixed(call: Callable[[Any], Any], rows, size: int, filler) -> np.ndarray:
    """`call` over `rows` (an array or a list) in forwards of exactly `size` rows; the
    results of the real rows, concatenated."""
    if size < 1:
        raise ValueError(f"fixed batch size must be >= 1, got {size}")
    parts = []
    for lo in range(0, len(rows), size):
        chunk = rows[lo:lo + size]
        real = len(chunk)
        if real < size:
            if isinstance(chunk, np.ndarray):
                pad = np.empty((size - real, *chunk.shape[1:]), dtype=chunk.dtype)
                pad[...] = filler
                chunk = np.concatenate([chunk, pad], axis=0)
            else:
                chunk = list(chunk) + [filler] * (size - real)
        parts.append(np.asarray(call(chunk))[:real])
    if not parts:
        return np.asarray(call(rows))
    return np.concatenate(parts, axis=0)
