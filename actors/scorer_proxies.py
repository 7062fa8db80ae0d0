"""Local stand-ins for the shared scorer actors, following the scorer protocols.

The story runner takes any objects implementing `ImageEmbedder` / `ImageScorer`
(docs/interfaces.md). A story worker gives it these proxies: each call is sent to one actor
of the shared pool (round robin) and waits for its answer, so the runner code is the same
in-process and on Ray. Proxies are picklable (they hold only actor handles).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import ray


class _PoolProxy:
    def __init__(self, handles: Sequence, name: str, timeout_s: float | None = 600.0):
        if not handles:
            raise ValueError("a scorer proxy needs at least one scorer actor")
        self._handles = list(handles)
        self.name = name
        self.timeout_s = timeout_s
        self._turn = itertools.count()

    def _next(self):
        return self._handles[next(self._turn) % len(self._handles)]

    def _get(self, ref):
        return ray.get(ref, timeout=self.timeout_s)

    def __getstate__(self):
        return {"handles": self._handles, "name": self.name, "timeout_s": self.timeout_s}

    def __setstate__(self, state):
        self.__init__(state["handles"], state["name"], state["timeout_s"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, actors={len(self._handles)})"


class EmbedderProxy(_PoolProxy):
    """`ImageEmbedder` backed by a pool of scorer actors holding the CLIP model."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return self._get(self._next().embed_images.remote(np.asarray(images)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._get(self._next().embed_texts.remote(list(texts)))


class ImageScorerProxy(_PoolProxy):
    """`ImageScorer` backed by a pool of scorer actors (aesthetic predictor or HPSv3)."""

    def score_images(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        prompts = list(prompts) if prompts is not None else None
        return self._get(self._next().score_images.remote(np.asarray(images), prompts))


def keyframe_scorers_from_pools(clip: Sequence, gate: Sequence, timeout_s: float | None = 600.0):
    """KeyframeScorers of proxies over the CLIP and gate pools; waits until the pools'
    first actors have loaded their models (their names and the gate threshold)."""
    from storymem_model.scorers.base import KeyframeScorers

    clip_info, gate_info = ray.get([clip[0].info.remote(), gate[0].info.remote()])
    return KeyframeScorers(
        embedder=EmbedderProxy(clip, clip_info["name"], timeout_s),
        gate=ImageScorerProxy(gate, gate_info["name"], timeout_s),
        gate_threshold=float(gate_info["gate_threshold"]))
