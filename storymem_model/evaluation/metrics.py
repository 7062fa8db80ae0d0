"""The paper's ST-Bench metrics (StoryMem, Table 1) as pure functions on numbers.

Nothing here touches a model: every function takes embeddings or scores that an encoder
already produced, so the math can be checked by hand and reused anywhere (evaluation,
batch tables, notebooks). docs/method.md#st-bench-and-its-metrics has the paper's
definitions and numbers.

Choices (documented once, here):
- Similarities are cosine similarities: rows are L2-normalised here (float64) whatever the
  caller passed, so un-normalised embeddings give the same numbers.
- Aesthetic quality: the LAION aesthetic predictor scores frames on a 1-10 scale; the
  paper reports it on 0-1 (0.6133 for StoryMem), as VBench does: score / 10. A shot's value
  is the mean over its scored frames; a story's value the mean over all its scored frames.
- Prompt following: cosine of a video embedding and a text embedding from the same
  video-text encoder (ViCLIP in the paper). "Single-shot" for a story = mean over its shots
  of cos(shot video, shot prompt); "global" = cos(whole story video, story text), see
  `story_eval` for what the story video and text are.
- Cross-shot consistency: the cosine similarity of every pair of distinct shots (i < j) of
  one story. "All pairs" = their mean; "top-10" = the mean of the 10 largest. A story with
  fewer than 10 pairs (fewer than 5 shots) averages all the pairs it has, so top-10 equals
  all-pairs there. A one-shot story has no pair: both are NaN (undefined, not 0 or 1),
  and benchmark means skip NaN.
- Benchmark numbers are means over stories (each story weighs the same), NaN skipped.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

TOP_K_PAIRS = 10
AESTHETIC_SCALE = 10.0

# Table 1 column names, in the paper's order; used by the evaluation table and report.
TABLE1_COLUMNS = (
    "aesthetic_quality",
    "prompt_following_global",
    "prompt_following_single_shot",
    "consistency_all_pairs",
    "consistency_top10",
)
TABLE1_HEADERS = {
    "aesthetic_quality": "Aesthetic Quality",
    "prompt_following_global": "Prompt Following (Global)",
    "prompt_following_single_shot": "Prompt Following (Single-Shot)",
    "consistency_all_pairs": "Cross-shot Consistency (All)",
    "consistency_top10": "Cross-shot Consistency (Top-10)",
}
PAPER_STORIES = 30  # ST-Bench stories behind the paper's numbers

# The paper's Table 1 rows (real weights, ST-Bench), for side-by-side reference only.
PAPER_TABLE1 = {
    "StoryMem (paper)": (0.6133, 0.2289, 0.2313, 0.5065, 0.5337),
    "Wan2.2 independent (paper)": (0.6097, 0.2114, 0.2335, 0.3934, 0.4357),
    "HoloCine (paper)": (0.5471, 0.2104, 0.2155, 0.4631, 0.5122),
}


class MetricInputError(ValueError):
    """Embeddings or scores that a metric cannot use, with the reason."""


def _as_matrix(embeddings, name: str = "embeddings") -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2:
        raise MetricInputError(f"{name} must be a 2-D array (N, D), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise MetricInputError(f"{name} contain NaN or infinite values")
    return array


def normalize_rows(embeddings, name: str = "embeddings") -> np.ndarray:
    """L2-normalise each row (float64). A zero row cannot be normalised: error."""
    array = _as_matrix(embeddings, name)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if array.shape[0] and np.any(norms == 0):
        bad = np.flatnonzero(norms[:, 0] == 0).tolist()
        raise MetricInputError(f"{name} rows {bad} are all zeros; cosine similarity is undefined")
    return array / norms if array.shape[0] else array


def similarity_matrix(embeddings) -> np.ndarray:
    """(N, N) cosine similarities of the rows of `embeddings` (N, D)."""
    unit = normalize_rows(embeddings)
    matrix = unit @ unit.T
    return np.clip(matrix, -1.0, 1.0)


def shot_pair_similarities(embeddings) -> np.ndarray:
    """Cosine similarity of every pair i < j, in row-major order of (i, j)."""
    matrix = similarity_matrix(embeddings)
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    return matrix[rows, cols]


def consistency_all_pairs(embeddings) -> float:
    """Mean cosine similarity over all pairs of distinct shots; NaN with fewer than 2 shots."""
    pairs = shot_pair_similarities(embeddings)
    return float(pairs.mean()) if pairs.size else math.nan


def consistency_top_k(embeddings, k: int = TOP_K_PAIRS) -> float:
    """Mean of the `k` largest pair similarities (all pairs when there are fewer than k)."""
    if int(k) < 1:
        raise MetricInputError(f"top-k needs k >= 1, got {k}")
    pairs = shot_pair_similarities(embeddings)
    if not pairs.size:
        return math.nan
    top = np.sort(pairs)[::-1][: int(k)]
    return float(top.mean())


def story_consistency(shot_embeddings, top_k: int = TOP_K_PAIRS) -> dict:
    """Per-story cross-shot consistency, ready to add as columns to any table.

    `shot_embeddings`: (num_shots, D) video embeddings of one story's shots, in order.
    Returns {"consistency_all_pairs": float, "consistency_top10": float,
    "num_shot_pairs": int}; the floats are NaN for a one-shot story. The key
    "consistency_top10" keeps its name for any `top_k` (the paper's column); pass a
    different top_k only for experiments.
    """
    matrix = _as_matrix(shot_embeddings, "shot_embeddings")
    num_pairs = matrix.shape[0] * (matrix.shape[0] - 1) // 2
    return {
        "consistency_all_pairs": consistency_all_pairs(matrix),
        "consistency_top10": consistency_top_k(matrix, top_k),
        "num_shot_pairs": int(num_pairs),
    }


def prompt_following(video_embeddings, text_embeddings) -> np.ndarray:
    """Row-wise cosine of video i with text i: (N,) for (N, D) and (N, D) inputs."""
    videos = normalize_rows(video_embeddings, "video_embeddings")
    texts = normalize_rows(text_embeddings, "text_embeddings")
    if videos.shape != texts.shape:
        raise MetricInputError(
            f"video and text embeddings must pair up row by row, got {videos.shape} and {texts.shape}")
    return np.clip(np.sum(videos * texts, axis=1), -1.0, 1.0)


def aesthetic_quality(frame_scores, scale: float = AESTHETIC_SCALE) -> float:
    """Mean aesthetic predictor score over frames, divided by `scale` (10: the paper's 0-1)."""
    scores = np.asarray(frame_scores, dtype=np.float64).reshape(-1)
    if not scores.size:
        raise MetricInputError("aesthetic quality needs at least one scored frame")
    if not np.all(np.isfinite(scores)):
        raise MetricInputError("aesthetic scores contain NaN or infinite values")
    return float(scores.mean() / float(scale))


def benchmark_mean(values: Iterable[float]) -> float:
    """Mean over stories, skipping NaN (one-shot stories have no consistency); NaN if empty."""
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(array.mean()) if array.size else math.nan


def format_number(value) -> str:
    """A metric as the paper prints it (4 decimals); '-' for a missing (None/NaN) value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.4f}"
