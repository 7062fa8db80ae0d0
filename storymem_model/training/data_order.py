"""The order training reads the prepared rows in, and each sample's own random generator.

Sample number `g` of an expert's run (counted over all ranks and micro-steps: rank r of W
takes g = samples_seen + micro * W + r) reads row `permutation_e[g mod N]` of the N prepared
clips, where epoch e = g div N has its own seeded permutation. Its draws (variant, memory,
noise level, noise) come from a generator seeded by (seed, expert, g). A checkpoint that
records `samples_seen` therefore fixes every later sample: a resumed run reads and draws
exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch), 0x5107]).permutation(num_rows)


def row_for(sample: int, num_rows: int, seed: int) -> int:
    """The prepared row of sample number `sample`."""
    if num_rows < 1:
        raise ValueError("no prepared rows to train on")
    epoch, position = divmod(int(sample), num_rows)
    return int(epoch_permutation(num_rows, seed, epoch)[position])


def sample_generator(seed: int, expert: str, sample: int) -> torch.Generator:
    """The generator of every random draw of sample number `sample` of `expert`'s run."""
    digest = hashlib.sha256(f"storymem-train:{seed}:{expert}:{sample}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def rank_samples(samples_seen: int, rank: int, world: int, grad_accum: int) -> list[int]:
    """The sample numbers rank `rank` of `world` trains on in the step after `samples_seen`."""
    return [samples_seen + micro * world + rank for micro in range(grad_accum)]
