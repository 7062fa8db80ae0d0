"""Clips -> pseudo-stories (docs/training.md#groups).

The paper simulates stories by grouping visually similar single-shot clips; the keyframes
of a group's other clips stand in as the memory of each clip. Here:

* clips with a `group_id` keep it (the dataset flow's rows: their story), ordered by their
  `order` (the shot index), then by input position;
* the other clips are grouped greedily by the cosine similarity of their CLIP embeddings
  (the mean of the frame embeddings the keyframe selection computed): in input order, a clip
  not yet grouped opens a group, and the most similar ungrouped clips with similarity at
  least `threshold` to it join, up to `max_group_size`; the group is ordered by input
  position and named `sim-{clip_id of its first clip}`.

A group of one clip is allowed: its samples have no memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupedClip:
    clip_id: str
    group_id: str
    order: int  # position of the clip in its group, 0-based


def normalised_mean(embeddings: np.ndarray) -> np.ndarray:
    """The unit-length mean of unit-length frame embeddings (N, D) -> (D,)."""
    array = np.asarray(embeddings, dtype=np.float64)
    array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
    mean = array.mean(axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def group_clips(clip_ids: list[str], positions: list[int], given_groups: list[str | None],
                given_orders: list[int | None], embeddings: np.ndarray, *, threshold: float,
                max_group_size: int) -> list[GroupedClip]:
    """One `GroupedClip` per input clip, in input order (see the module docstring)."""
    count = len(clip_ids)
    if not (len(positions) == len(given_groups) == len(given_orders) == count):
        raise ValueError("group_clips: every list must have one entry per clip")
    embeddings = np.asarray(embeddings, dtype=np.float64).reshape(count, -1) if count else \
        np.zeros((0, 1))
    group_of: dict[int, str] = {}
    members: dict[str, list[int]] = {}
    for i in range(count):
        if given_groups[i] is not None:
            group_of[i] = given_groups[i]
            members.setdefault(given_groups[i], []).append(i)
    free = [i for i in sorted(range(count), key=lambda k: positions[k]) if i not in group_of]
    if free:
        unit = embeddings[free] / np.maximum(np.linalg.norm(embeddings[free], axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        taken = np.zeros(len(free), dtype=bool)
        for a in range(len(free)):
            if taken[a]:
                continue
            taken[a] = True
            candidates = [b for b in np.argsort(-similarity[a], kind="stable")
                          if not taken[b] and similarity[a, b] >= threshold][: max_group_size - 1]
            chosen = sorted([a, *candidates], key=lambda k: positions[free[k]])
            name = f"sim-{clip_ids[free[a]]}"
            for b in chosen:
                taken[b] = True
                group_of[free[b]] = name
            members[name] = [free[b] for b in chosen]
    out: dict[int, GroupedClip] = {}
    for name, indices in members.items():
        ordered = sorted(indices, key=lambda k: (given_orders[k] if given_orders[k] is not None else 0,
                                                 positions[k]))
        for rank, i in enumerate(ordered):
            out[i] = GroupedClip(clip_id=clip_ids[i], group_id=name, order=rank)
    return [out[i] for i in range(count)]


def shard_groups(group_sizes: dict[str, int], rows_per_shard: int) -> list[list[str]]:
    """Groups (sorted by name) packed into shards of about `rows_per_shard` clips; a group is
    never split (a group larger than a shard gets a shard of its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    rows = 0
    for name in sorted(group_sizes):
        size = group_sizes[name]
        if current and rows + size > rows_per_shard:
            shards.append(current)
            current, rows = [], 0
        current.append(name)
        rows += size
    if current:
        shards.append(current)
    return shards
