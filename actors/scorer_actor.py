"""A Ray actor that serves one scorer model to every story worker, with request batching.

`ScorerActor(spec, role)` builds its model inside the actor with the one scorer factory
(`storymem_model.scorers.factory`): a CLIP actor `build_embedder(spec)`, a gate actor
`build_gate(spec)` (the aesthetic predictor, or HPSv3 - that actor runs under the HPS
environment's interpreter, where `build_gate` runs HPSv3 in process). The protocol methods
(docs/interfaces.md) are async actor methods; requests from different stories are grouped
by `RequestBatcher` and run as one call of the scorer object, which itself runs forwards of
a fixed row count (`storymem_model.scorers.fixed_batch`), so results never depend on
batch mates.

This module is also imported by the HPSv3 actor, under the HPS environment's interpreter
(older transformers, no open_clip): keep its imports to numpy, ray and the standard library.
"""
from __future__ import annotations

import enum
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from actors.request_batcher import BatchStats, RequestBatcher

logger = logging.getLogger("storymem.scorer_actor")

EMBED_IMAGES = "embed_images"
EMBED_TEXTS = "embed_texts"
SCORE_IMAGES = "score_images"
SCORE_EMBEDDINGS = "score_embeddings"


class ScorerRole(enum.StrEnum):
    CLIP = "clip"  # the CLIP ImageEmbedder
    GATE = "gate"  # the keyframe quality gate ImageScorer


@dataclass(frozen=True)
class ScorerActorInfo:
    """A loaded scorer actor: its model's content id and where it runs."""

    role: ScorerRole
    name: str  # the scorer's content id (model_identity), as in the config hash
    pid: int
    python: str
    load_s: float
    embeds_with: str | None = None  # a gate that is a head on this CLIP embedder (its id)
    transformers: str | None = None  # the transformers version of this interpreter


class ScorerActor:
    """Holds one scorer model; wrap with `ray.remote(...)` (see pipelines/scorer_pools.py)."""

    def __init__(self, spec, role: ScorerRole, *, max_batch_size: int = 32,
                 max_wait_s: float = 0.05, torch_threads: int | None = 1,
                 expected_clients: int | None = None):
        if torch_threads:
            _limit_threads(torch_threads)
        from storymem_model.scorers.factory import build_embedder, build_gate

        started = time.monotonic()
        self.role = ScorerRole(role)
        self._model = build_embedder(spec) if self.role is ScorerRole.CLIP else build_gate(spec)
        self.name = str(self._model.name)
        self._batcher = RequestBatcher(
            self._run_batch, max_batch_size=max_batch_size, max_wait_s=max_wait_s,
            expected_clients=expected_clients)
        self._load_s = time.monotonic() - started
        logger.info("scorer actor %s (%s) ready in %.2fs, pid %d",
                    self.role, self.name, self._load_s, os.getpid())

    # ---- protocol methods, called remotely by the proxies in scorer_proxies.py ----
    # `client` names the calling story worker: a batch runs as soon as every expected
    # client has a request in it (see RequestBatcher).
    # Requests are grouped per method and image size: one call concatenates its frames.
    async def embed_images(self, images: np.ndarray, client: str | None = None) -> np.ndarray:
        images = _check_images(images)
        return await self._batcher.submit((EMBED_IMAGES, images.shape[1:]), images,
                                          len(images), client)

    async def embed_texts(self, texts: Sequence[str], client: str | None = None) -> np.ndarray:
        texts = [str(t) for t in texts]
        return await self._batcher.submit((EMBED_TEXTS,), texts, len(texts), client)

    async def score_embeddings(self, embeddings: np.ndarray,
                               client: str | None = None) -> np.ndarray:
        """Gate scores from CLIP embeddings (a gate whose model has `score_embeddings`,
        e.g. the aesthetic head on the CLIP pool's own model): no second image forward."""
        if not hasattr(self._model, "score_embeddings"):
            raise ValueError(f"scorer {self.name} cannot score embeddings; send images")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D); got shape {embeddings.shape}")
        return await self._batcher.submit((SCORE_EMBEDDINGS, embeddings.shape[1:]),
                                          embeddings, len(embeddings), client)

    async def score_images(self, images: np.ndarray,
                           prompts: Sequence[str] | None = None,
                           client: str | None = None) -> np.ndarray:
        images = _check_images(images)
        if prompts is not None:
            prompts = [str(p) for p in prompts]
            if len(prompts) != len(images):
                raise ValueError(
                    f"score_images: {len(prompts)} prompts for {len(images)} images")
        # Requests with and without prompts are batched separately: the scorer's own
        # default for "no prompt" is kept exactly.
        key = (SCORE_IMAGES, images.shape[1:], prompts is not None)
        return await self._batcher.submit(key, (images, prompts), len(images), client)

    async def set_expected_clients(self, expected_clients: int | None) -> None:
        """How many story workers call this actor now (see RequestBatcher); async, so it
        runs on the event loop that owns the batcher."""
        self._batcher.set_expected_clients(expected_clients)

    # ---- introspection ----
    def info(self) -> ScorerActorInfo:
        embedder = getattr(self._model, "embedder", None)
        embeds_with = (str(embedder.name) if embedder is not None
                       and hasattr(self._model, "score_embeddings") else None)
        return ScorerActorInfo(role=self.role, name=self.name, pid=os.getpid(),
                               python=sys.executable, load_s=self._load_s,
                               embeds_with=embeds_with, transformers=_version("transformers"))

    def stats(self) -> dict:
        """Batching counters per method (over every image size)."""
        merged: dict[str, BatchStats] = {}
        for (method, *_), stats in self._batcher.stats.items():
            merged[method] = merged[method] + stats if method in merged else stats
        return {"role": self.role.value, "name": self.name, "pid": os.getpid(),
                "methods": {method: s.as_dict() for method, s in merged.items()}}

    # ---- the batch handler (runs in the batcher's worker thread) ----
    # One call of the scorer object per batch: it cuts the rows into fixed-size forwards.
    def _run_batch(self, key: tuple, payloads: Sequence[Any]) -> list:
        method = key[0]
        if method == EMBED_TEXTS:
            out = self._model.embed_texts([t for payload in payloads for t in payload])
            return _split(out, [len(p) for p in payloads])
        if method == EMBED_IMAGES:
            out = self._model.embed_images(np.concatenate(list(payloads), axis=0))
            return _split(out, [len(p) for p in payloads])
        if method == SCORE_EMBEDDINGS:
            out = self._model.score_embeddings(np.concatenate(list(payloads), axis=0))
            return _split(out, [len(p) for p in payloads])
        if method == SCORE_IMAGES:
            frames = np.concatenate([images for images, _ in payloads], axis=0)
            prompts = None if payloads[0][1] is None else [p for _, ps in payloads for p in ps]
            out = self._model.score_images(frames, prompts)
            return _split(out, [len(images) for images, _ in payloads])
        raise ValueError(f"unknown scorer method {method!r}")


def _check_images(images: Any) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"images must be a uint8 array (N, H, W, 3); got dtype {array.dtype}, "
            f"shape {array.shape}")
    return array


def _split(out, sizes: list[int]) -> list[np.ndarray]:
    out = np.asarray(out)
    if len(out) != sum(sizes):
        raise RuntimeError(f"scorer returned {len(out)} rows for {sum(sizes)} inputs")
    bounds = np.cumsum([0] + sizes)
    return [out[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _version(package: str) -> str | None:
    import importlib.metadata as metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _limit_threads(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(int(threads))
    except ImportError:  # a scorer without torch needs no limit
        pass
