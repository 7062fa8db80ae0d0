"""Keyframe selection: the optimised version equals a plain frame-by-frame implementation
of the reference algorithm (docs/method.md#keyframes), the gate and the memory-duplicate check work, every
frame is embedded and scored once, and a normal tiny story exercises every path."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from storymem_model.keyframe_selection import (KeyframeSelectionError, candidate_keyframes,
                                               extract_keyframes, select_keyframes)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ---- a plain transcription of the reference algorithm, frame by frame ------------------
def _cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _reference_scan(embeddings, scores, threshold, min_score):
    """One scan, as the reference does it for one threshold."""
    first = 0
    while scores[first] < min_score:  # "is low quality"
        first += 1
        if first >= len(scores):
            return []
    chosen = [first]
    last = embeddings[first]
    for i in range(2, len(scores)):  # the reference starts at 2 (skips frame 1)
        if _cosine(last, embeddings[i]) < threshold and not scores[i] < min_score:
            chosen.append(i)
            last = embeddings[i]
    return chosen


def reference_select(embeddings, scores, memory, min_score, threshold=0.9):
    while True:
        chosen = _reference_scan(embeddings, scores, threshold, min_score)
        if len(chosen) > 3:
            threshold -= 0.01
        else:
            break
    stored = []
    for i in chosen:
        if any(_cosine(embeddings[i], m) > 0.9 for m in memory):
            continue
        stored.append(i)
    return stored


def _random_shot(rng, frames, dim):
    """Embeddings drifting like a video (similarities spread around 0.9), with cuts."""
    step = rng.uniform(0.05, 0.6)
    current = rng.standard_normal(dim)
    out = []
    for _ in range(frames):
        if rng.random() < 0.08:
            current = rng.standard_normal(dim)  # a cut inside the shot
        current = current + step * rng.standard_normal(dim) / np.sqrt(dim) * 3
        out.append(current.copy())
    return np.asarray(out, dtype=np.float32)


def test_optimised_selection_equals_reference_over_many_seeds():
    interesting = {"loop": 0, "gate": 0, "duplicate": 0, "empty": 0}
    for seed in range(150):
        rng = np.random.default_rng(seed)
        frames = int(rng.integers(1, 30))
        dim = int(rng.choice([4, 8, 32]))
        embeddings = _random_shot(rng, frames, dim)
        scores = rng.normal(3.5, 1.0, frames).astype(np.float32)
        min_score = float(rng.choice([-np.inf, 3.0, 3.5]))
        memory = []
        if rng.random() < 0.6:
            memory = [embeddings[int(i)] + 0.05 * rng.standard_normal(dim).astype(np.float32)
                      for i in rng.integers(0, frames, int(rng.integers(1, 6)))]
            memory += list(rng.standard_normal((int(rng.integers(0, 4)), dim)).astype(np.float32))
        expected = reference_select(embeddings, scores, memory, min_score)
        got = select_keyframes(embeddings, scores, np.asarray(memory) if memory else None,
                               min_score=min_score)
        assert got == expected, f"seed {seed}"
        candidates = candidate_keyframes(embeddings, scores, min_score=min_score)
        interesting["loop"] += len(_reference_scan(embeddings, scores, 0.9, min_score)) > 3
        interesting["gate"] += bool(np.any(scores < min_score))
        interesting["duplicate"] += len(got) < len(candidates)
        interesting["empty"] += not got
    # the random cases really cover the threshold loop, the gate and the duplicate check
    assert min(interesting.values()) >= 10, interesting


def test_gate_drops_low_score_frames():
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((20, 16)).astype(np.float32)  # all mutually different
    scores = np.full(20, 5.0, dtype=np.float32)
    low = [0, 3, 4, 9]
    scores[low] = 1.0
    got = select_keyframes(embeddings, scores, None, min_score=3.0)
    assert got and not set(got) & set(low)
    assert got[0] == 1  # the first frame that passes the gate
    assert select_keyframes(embeddings, np.zeros(20, np.float32), None, min_score=3.0) == []


def test_first_passing_frame_after_the_scan_start_is_not_chosen_twice():
    embeddings = np.eye(6, dtype=np.float32)
    scores = np.array([0, 0, 0, 5, 5, 5], dtype=np.float32)
    assert select_keyframes(embeddings, scores, min_score=1.0) == [3, 4, 5]


def test_threshold_drops_until_at_most_three_keyframes():
    angles = np.linspace(0, 2.5, 30)  # slowly turning: neighbours similar, ends far apart
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    scores = np.ones(30, dtype=np.float32)
    at_reference = candidate_keyframes(embeddings, scores, min_score=0.0, max_keyframes=100)
    assert len(at_reference) > 3
    got = select_keyframes(embeddings, scores, None, min_score=0.0)
    assert 1 < len(got) <= 3 and got[0] == 0


def test_no_keyframe_duplicates_memory():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.eye(3, 32), 4, axis=0)  # three scenes of four near-equal frames
    embeddings = (groups + 0.01 * rng.standard_normal((12, 32))).astype(np.float32)
    scores = np.ones(12, dtype=np.float32)
    chosen = select_keyframes(embeddings, scores, None, min_score=0.0)
    assert chosen == [0, 4, 8]
    memory = embeddings[[chosen[0]]] * 2.0 + 0.01  # a near copy, scaled: cosine ~1
    got = select_keyframes(embeddings, scores, memory, min_score=0.0)
    assert got == chosen[1:]
    assert select_keyframes(embeddings, scores, embeddings, min_score=0.0) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"scores": np.ones(3)}, "scores: expected shape (4,)"),
    ({"embeddings": np.ones(4)}, "expected shape (N, D)"),
    ({"embeddings": np.full((4, 2), np.nan)}, "NaN"),
    ({"embeddings": np.zeros((4, 2))}, "zero vector"),
    ({"step": 0.0}, "step must be > 0"),
    ({"max_keyframes": 0}, "max_keyframes must be >= 1"),
    ({"memory_embeddings": np.ones((2, 3))}, "same CLIP"),
])
def test_bad_input_is_named(kwargs, message):
    args = {"embeddings": np.eye(4, 2, dtype=np.float32) + 0.1, "scores": np.ones(4),
            "memory_embeddings": None, "min_score": 0.0}
    args.update(kwargs)
    with pytest.raises(KeyframeSelectionError, match=message.replace("(", r"\(")
                       .replace(")", r"\)")):
        select_keyframes(args.pop("embeddings"), args.pop("scores"), **args)


class _Counting:
    """Wraps a scorer and records every batch it is asked for."""

    def __init__(self, inner, method):
        self.inner, self.method, self.batches = inner, method, []
        self.name = inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _record(self, images, *args):
        self.batches.append(len(images))
        return getattr(self.inner, self.method)(images, *args)

    def embed_images(self, images):
        return self._record(images)

    def score_images(self, images, prompts=None):
        return self._record(images, prompts)


@pytest.fixture(scope="module")
def tiny_scorers():
    from storymem_model.scorers import build_scorers
    return build_scorers("tiny")


def test_extract_embeds_and_scores_every_frame_once(tiny_scorers):
    from storymem_model.scorers import KeyframeScorers

    embedder = _Counting(tiny_scorers.embedder, "embed_images")
    gate = _Counting(tiny_scorers.gate, "score_images")
    scorers = KeyframeScorers(embedder, gate, tiny_scorers.gate_threshold)
    frames = np.random.default_rng(3).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8)
    result = extract_keyframes(frames, scorers)
    assert embedder.batches == [17] and gate.batches == [17]
    assert result.embeddings.shape == (17, 64) and result.scores.shape == (17,)
    assert result.indices == select_keyframes(result.embeddings, result.scores,
                                              min_score=tiny_scorers.gate_threshold)
    assert result.indices == reference_select(result.embeddings, result.scores, [],
                                              tiny_scorers.gate_threshold)


def test_reference_mode_gives_the_gate_and_clip_the_smart_resized_frames(tiny_scorers):
    """With `reference` preprocessing a gate that scores images (HPSv3, the aesthetic
    predictor) gets every frame smart-resized (64 x 64 -> 56 x 56, multiples of 28) with
    the empty prompt, as the reference does, and the embedder gets the same frames."""
    from storymem_model.keyframe_preprocess import reference_frames
    from storymem_model.scorers import KeyframeScorers

    seen = {}

    class Recording(_Counting):
        def _record(self, images, *args):
            seen.setdefault(self.method, []).append((np.asarray(images).copy(), args))
            return super()._record(images, *args)

    scorers = KeyframeScorers(Recording(tiny_scorers.embedder, "embed_images"),
                              Recording(tiny_scorers.gate, "score_images"),
                              tiny_scorers.gate_threshold)
    assert not scorers.gate_scores_embeddings  # the image-scoring path
    frames = np.random.default_rng(4).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8)
    extract_keyframes(frames, scorers, preprocess="reference")
    [(gated, gate_args)] = seen["score_images"]
    [(embedded, _)] = seen["embed_images"]
    assert gated.shape == (17, 56, 56, 3) and gate_args == (None,)
    np.testing.assert_array_equal(gated, reference_frames(frames))
    np.testing.assert_array_equal(embedded, gated)
    seen.clear()
    extract_keyframes(frames, scorers, preprocess="direct")
    assert seen["score_images"][0][0].shape == (17, 64, 64, 3)


def test_normal_tiny_story_exercises_every_path(tiny_scorers):
    """Tiny renders of the demo story through selection and the bank: keyframes are
    stored, the gate rejects frames, duplicates of memory are dropped, the window fills and
    slides. Guards the documented tiny thresholds against drift of the tiny models."""
    import torch

    import storymem_model
    from storymem_model.memory_bank import KeyframeEntry, MemoryBank
    from storymem_model.story_script import load_script

    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(1)
    pipeline = storymem_model.load_pipeline("tiny")
    script = load_script(str(EXAMPLES / "lighthouse_keeper.json"))
    bank = MemoryBank(max_size=10, sink=3)
    gate_rejected = duplicates = 0
    memories = []
    for spec in script.shots:
        latents = (bank.latents(pipeline.encode_keyframes, 64, 64) if bank.entries else None)
        frames = pipeline.generate_shot(spec.prompt, memory_latents=latents,
                                        seed=7 + spec.shot_index)
        memory = bank.stored_embeddings() if bank.stored else None
        result = extract_keyframes(frames, tiny_scorers, memory)
        gate_rejected += int(np.sum(result.scores < tiny_scorers.gate_threshold))
        duplicates += len(result.candidates) - len(result.indices)
        bank.add(KeyframeEntry.from_shot(frames, result.indices, story_id=script.story_id,
                                         scene=spec.scene, shot=spec.shot, prompt=spec.prompt,
                                         embeddings=result.embeddings, scores=result.scores))
        memories.append([e.keyframe_id for e in bank.entries])
    assert gate_rejected > 0
    assert duplicates > 0
    assert len(bank.stored) > bank.max_size  # the window filled and then slid
    assert max(len(m) for m in memories) == 10
    sink = [e.keyframe_id for e in bank.stored[:3]]
    assert all(m[:3] == sink for m in memories if len(m) >= 3)
    assert memories[-1][3:] == [e.keyframe_id for e in bank.stored[-7:]]
