"""Per-shot seeds: deterministic, and never repeated inside a story.

The reference seeds each shot with `base_seed + shot index within its scene`, so shot 1 of
every scene gets the same noise. `shot_seed` instead packs (scene, shot) into the low 32
bits and a 31-bit digest of the story seed into the bits above, then scrambles the 63-bit
word with a bijection. Distinct (scene, shot) pairs of one story therefore always give
distinct seeds, and every seed fits torch, numpy and Python's `random`.
"""
from __future__ import annotations

import hashlib

_BITS = 63
_MASK = (1 << _BITS) - 1
_ODD_MULTIPLIERS = (0x5851F42D4C957F2D, 0x14057B7EF767814F)  # odd => invertible mod 2**63
_MAX_INDEX = 0xFFFF


def _check_index(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"shot_seed: {name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= _MAX_INDEX:
        raise ValueError(f"shot_seed: {name} must be in 1..{_MAX_INDEX} (numbered from 1), got {value}")
    return value


def _story_digest(story_seed: int) -> int:
    if isinstance(story_seed, bool) or not isinstance(story_seed, int):
        raise TypeError(f"shot_seed: story_seed must be an int, got {type(story_seed).__name__}")
    if story_seed < 0:
        raise ValueError(f"shot_seed: story_seed must be >= 0, got {story_seed}")
    if story_seed < (1 << 31):
        return story_seed
    digest = hashlib.sha256(str(story_seed).encode()).digest()
    return int.from_bytes(digest[:4], "big") & ((1 << 31) - 1)


def _scramble(word: int) -> int:
    """A bijection of 63-bit words (xor-shifts and odd multiplications mod 2**63)."""
    for multiplier in _ODD_MULTIPLIERS:
        word ^= word >> 31
        word = (word * multiplier) & _MASK
    word ^= word >> 29
    return word


def shot_seed(story_seed: int, scene: int, shot: int) -> int:
    """Seed for shot `shot` (from 1) of scene `scene` (from 1) of a story seeded `story_seed`."""
    packed = (_story_digest(story_seed) << 32) | (_check_index("scene", scene) << 16) | _check_index("shot", shot)
    return _scramble(packed)
