"""Keyframe selection after each shot: the reference algorithm (docs/method.md#keyframes) on cached numbers.

The reference re-embeds two frames with CLIP for every comparison, re-scores frames one at
a time with HPSv3 and repeats the whole scan each time it lowers the threshold. Here every
frame of the shot is embedded and scored exactly once, in batches (`extract_keyframes`),
and the threshold loop runs on the cached similarity matrix (`select_keyframes`). Given the
same embeddings and scores it picks exactly the frames the reference picks:

1. the first keyframe is the first frame whose gate score passes (`score >= min_score`);
   no frame passes -> no keyframes;
2. frames from index `scan_start` on (the reference starts at 2, skipping frame 1) become
   keyframes when their cosine similarity to the last keyframe is below `threshold` and
   their score passes;
3. while more than `max_keyframes` are found, `threshold -= step` and the scan repeats;
4. a keyframe whose similarity to any memory frame exceeds `duplicate_threshold` is not
   stored (the reference compares with every keyframe stored earlier in the story).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storymem_model.scorers.base import KeyframeScorers, check_image_batch

REFERENCE_THRESHOLD = 0.9
REFERENCE_STEP = 0.01
REFERENCE_MAX_KEYFRAMES = 3
REFERENCE_DUPLICATE_THRESHOLD = 0.9
REFERENCE_SCAN_START = 2


class KeyframeSelectionError(ValueError):
    """Inputs to keyframe selection that cannot be used (names the problem)."""


@dataclass(frozen=True)
class ShotKeyframes:
    """Result of `extract_keyframes`: the chosen frame indices and the cached numbers."""

    indices: list[int]
    embeddings: np.ndarray  # (N, D) float32, one per frame of the shot
    scores: np.ndarray      # (N,) float32 gate scores
    candidates: list[int]   # keyframes before the memory-duplicate check


def _normalised(embeddings, what: str) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2:
        raise KeyframeSelectionError(f"{what}: expected shape (N, D), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise KeyframeSelectionError(f"{what}: contains NaN or infinity")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise KeyframeSelectionError(f"{what}: a zero vector has no direction")
    return array / norms


def candidate_keyframes(embeddings, scores, *, min_score: float,
                        threshold: float = REFERENCE_THRESHOLD, step: float = REFERENCE_STEP,
                        max_keyframes: int = REFERENCE_MAX_KEYFRAMES,
                        scan_start: int = REFERENCE_SCAN_START) -> list[int]:
    """Steps 1-3 of the reference algorithm (before the memory-duplicate check)."""
    frames = _normalised(embeddings, "embeddings")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(frames),):
        raise KeyframeSelectionError(
            f"scores: expected shape ({len(frames)},) to match the embeddings, got {scores.shape}")
    if np.any(np.isnan(scores)):
        raise KeyframeSelectionError("scores: contains NaN")
    if not step > 0:
        raise KeyframeSelectionError(f"step must be > 0 (the threshold loop must end), got {step}")
    if max_keyframes < 1:
        raise KeyframeSelectionError(f"max_keyframes must be >= 1, got {max_keyframes}")
    if scan_start < 1:
        raise KeyframeSelectionError(f"scan_start must be >= 1, got {scan_start}")
    passes = scores >= min_score
    if not passes.any():
        return []
    first = int(np.argmax(passes))
    similarity = frames @ frames.T  # every pair once; the loop below only looks things up
    while True:
        chosen = [first]
        position = scan_start
        while position < len(frames):
            row = similarity[chosen[-1], position:]
            hits = np.flatnonzero((row < threshold) & passes[position:])
            if hits.size == 0:
                break
            chosen.append(position + int(hits[0]))
            position = chosen[-1] + 1
        if len(chosen) <= max_keyframes:
            return chosen
        threshold -= step  # accumulated like the reference, not recomputed from a count


def select_keyframes(embeddings, scores, memory_embeddings=None, *,
                     threshold: float = REFERENCE_THRESHOLD, step: float = REFERENCE_STEP,
                     max_keyframes: int = REFERENCE_MAX_KEYFRAMES, min_score: float,
                     duplicate_threshold: float = REFERENCE_DUPLICATE_THRESHOLD,
                     scan_start: int = REFERENCE_SCAN_START) -> list[int]:
    """Frame indices to store as new keyframes (reference algorithm, docs/method.md#keyframes).

    `embeddings` (N, D) and `scores` (N,) are the shot's frames, computed once;
    `memory_embeddings` (M, D) or None are the frames already stored in the story.
    """
    chosen = candidate_keyframes(embeddings, scores, min_score=min_score, threshold=threshold,
                                 step=step, max_keyframes=max_keyframes, scan_start=scan_start)
    return drop_memory_duplicates(embeddings, chosen, memory_embeddings,
                                  duplicate_threshold=duplicate_threshold)


def drop_memory_duplicates(embeddings, chosen: list[int], memory_embeddings, *,
                           duplicate_threshold: float = REFERENCE_DUPLICATE_THRESHOLD
                           ) -> list[int]:
    """Keep the chosen frames whose similarity to every memory frame is <= the threshold."""
    if not chosen or memory_embeddings is None or len(memory_embeddings) == 0:
        return list(chosen)
    frames = _normalised(embeddings, "embeddings")
    memory = _normalised(memory_embeddings, "memory_embeddings")
    if memory.shape[1] != frames.shape[1]:
        raise KeyframeSelectionError(
            f"memory_embeddings have dimension {memory.shape[1]}, frame embeddings "
            f"{frames.shape[1]}: they must come from the same CLIP")
    best = (frames[chosen] @ memory.T).max(axis=1)
    return [index for index, value in zip(chosen, best) if not value > duplicate_threshold]


def extract_keyframes(frames, scorers: KeyframeScorers, memory_embeddings=None,
                      preprocess: str = "direct", **selection) -> ShotKeyframes:
    """Embed and gate-score every frame once (batched), then select keyframes.

    `frames` (N, H, W, 3) uint8; `memory_embeddings` as for `select_keyframes` (use
    `MemoryBank.stored_embeddings()`); `preprocess`: how the gate and CLIP see the frames
    ("reference": smart-resized first, see keyframe_preprocess.py; "direct"); other
    keywords go to `select_keyframes`. The gate scores frames with the empty prompt, as
    the reference does.
    """
    from storymem_model.keyframe_preprocess import frames_for_scoring

    batch = frames_for_scoring(check_image_batch(frames, "shot frames"), preprocess)
    embeddings = np.asarray(scorers.embedder.embed_images(batch), dtype=np.float32)
    if scorers.gate_scores_embeddings:
        scores = scorers.gate.score_embeddings(embeddings)  # gate on the same CLIP: embed once
    else:
        scores = scorers.gate.score_images(batch, None)
    scores = np.asarray(scores, dtype=np.float32)
    if embeddings.shape[0] != len(batch) or scores.shape != (len(batch),):
        raise KeyframeSelectionError(
            f"scorers returned {embeddings.shape} embeddings and {scores.shape} scores "
            f"for {len(batch)} frames")
    selection.setdefault("min_score", scorers.gate_threshold)
    candidates = candidate_keyframes(
        embeddings, scores, **{k: v for k, v in selection.items()
                               if k != "duplicate_threshold"})
    indices = drop_memory_duplicates(
        embeddings, candidates, memory_embeddings,
        duplicate_threshold=selection.get("duplicate_threshold", REFERENCE_DUPLICATE_THRESHOLD))
    return ShotKeyframes(indices=indices, embeddings=embeddings, scores=scores,
                         candidates=candidates)
