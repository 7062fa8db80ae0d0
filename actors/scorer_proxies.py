"""Local stand-ins for the shared scorer actors, following the scorer protocols.

The story runner takes any objects implementing `ImageEmbedder` / `ImageScorer`
(docs/interfaces.md). A story worker gives it these proxies: each call is sent to one actor
of the shared pool and waits for its answer, so the runner code is the same in-process and
on Ray. Proxies are picklable (they hold only actor handles).

Routing: a proxy made for story worker `client_index` always calls actor
`client_index % len(pool)` and names itself in each request, so every scorer actor knows
which workers send to it and runs a batch as soon as all of them are waiting
(`scorer_pools.clients_per_actor`). Without a client index calls go round robin and
batches wait for the batch size or the max wait.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import ray


class ScorerMismatchError(RuntimeError):
    """A scorer actor serves another model than the render spec names."""


@dataclass(frozen=True)
class ScorerPoolHandles:
    """What a story worker needs to reach the shared scorers: both pools' actor handles,
    the scorer ids and threshold its config was resolved with, and its own index."""

    clip: tuple
    gate: tuple
    embedder_id: str
    gate_id: str
    gate_threshold: float
    client_index: int | None = None


class _PoolProxy:
    def __init__(self, handles: Sequence, name: str, timeout_s: float | None = 600.0,
                 client_index: int | None = None):
        if not handles:
            raise ValueError("a scorer proxy needs at least one scorer actor")
        self._handles = list(handles)
        self.name = name
        self.timeout_s = timeout_s
        self.client_index = client_index
        self._client = None if client_index is None else f"worker-{client_index}"
        self._turn = itertools.count()

    def _next(self):
        if self.client_index is not None:
            return self._handles[self.client_index % len(self._handles)]
        return self._handles[next(self._turn) % len(self._handles)]

    def _get(self, ref):
        return ray.get(ref, timeout=self.timeout_s)

    def __getstate__(self):
        return {"handles": self._handles, "name": self.name, "timeout_s": self.timeout_s,
                "client_index": self.client_index}

    def __setstate__(self, state):
        self.__init__(state["handles"], state["name"], state["timeout_s"],
                      state.get("client_index"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, actors={len(self._handles)})"


class EmbedderProxy(_PoolProxy):
    """`ImageEmbedder` backed by a pool of scorer actors holding the CLIP model."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return self._get(self._next().embed_images.remote(np.asarray(images),
                                                          client=self._client))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._get(self._next().embed_texts.remote(list(texts), client=self._client))


class ImageScorerProxy(_PoolProxy):
    """`ImageScorer` backed by a pool of scorer actors (aesthetic predictor or HPSv3)."""

    def score_images(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        prompts = list(prompts) if prompts is not None else None
        return self._get(self._next().score_images.remote(np.asarray(images), prompts,
                                                          client=self._client))


class EmbeddingGateProxy(ImageScorerProxy):
    """A gate whose actors score CLIP embeddings of the CLIP pool's own model (the tiny
    preset's aesthetic head, as `build_keyframe_scorers` shares it in process): keyframe
    selection embeds each frame once and sends only the embeddings to the gate."""

    def __init__(self, handles: Sequence, name: str, timeout_s: float | None = 600.0,
                 client_index: int | None = None, embedder: EmbedderProxy | None = None):
        super().__init__(handles, name, timeout_s, client_index)
        self.embedder = embedder

    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return self._get(self._next().score_embeddings.remote(
            np.asarray(embeddings, dtype=np.float32), client=self._client))

    def __getstate__(self):
        return {**super().__getstate__(), "embedder": self.embedder}

    def __setstate__(self, state):
        self.__init__(state["handles"], state["name"], state["timeout_s"],
                      state.get("client_index"), state.get("embedder"))


def keyframe_scorers_from_pools(pools: ScorerPoolHandles, timeout_s: float | None = 600.0):
    """KeyframeScorers of proxies over the CLIP and gate pools. Waits until the pools'
    first actors have loaded their models and checks that they serve the scorers the
    config names (ScorerMismatchError otherwise)."""
    from storymem_model.scorers.base import KeyframeScorers

    clip_info, gate_info = ray.get([pools.clip[0].info.remote(), pools.gate[0].info.remote()])
    for info, wanted in ((clip_info, pools.embedder_id), (gate_info, pools.gate_id)):
        if info.name != wanted:
            raise ScorerMismatchError(f"the {info.role} scorer actor serves {info.name}, the "
                                      f"render spec names {wanted}")
    embedder = EmbedderProxy(pools.clip, clip_info.name, timeout_s, pools.client_index)
    if gate_info.embeds_with == clip_info.name:
        gate = EmbeddingGateProxy(pools.gate, gate_info.name, timeout_s, pools.client_index,
                                  embedder=embedder)
    else:
        gate = ImageScorerProxy(pools.gate, gate_info.name, timeout_s, pools.client_index)
    return KeyframeScorers(embedder=embedder, gate=gate,
                           gate_threshold=float(pools.gate_threshold))
