"""A Ray actor that serves one scorer model to every story worker, with request batching.

The actor is generic over the scorer protocols of docs/interfaces.md: `factory()` builds
the model object inside the actor (a CLIP `ImageEmbedder`, or an `ImageScorer` such as the
aesthetic predictor or HPSv3), and the actor exposes the protocol methods as async actor
methods. Requests from different stories are grouped by `RequestBatcher`; the model then
runs over the concatenated frames in forwards of at most `max_batch_size` images.

This module is also imported by the HPSv3 actor, which runs under the HPS environment's
interpreter (older transformers, no open_clip): keep its imports to numpy, ray and the
standard library.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from actors.request_batcher import RequestBatcher

logger = logging.getLogger("storymem.scorer_actor")

EMBED_IMAGES = "embed_images"
EMBED_TEXTS = "embed_texts"
SCORE_IMAGES = "score_images"
SCORE_EMBEDDINGS = "score_embeddings"


class ScorerActor:
    """Holds one scorer model; wrap with `ray.remote(...)` (see `scorer_pool.py`)."""

    def __init__(self, factory: Callable[[], Any], *, role: str, max_batch_size: int = 32,
                 max_wait_s: float = 0.05, torch_threads: int | None = 1,
                 expected_clients: int | None = None):
        if torch_threads:
            _limit_threads(torch_threads)
        started = time.monotonic()
        built = factory()
        # A factory may return (model, extra info) - e.g. the gate and its threshold.
        self._model, self._extra = built if isinstance(built, tuple) else (built, {})
        self.role = role
        self.name = str(getattr(self._model, "name", type(self._model).__name__))
        self.max_batch_size = int(max_batch_size)
        self._batcher = RequestBatcher(
            self._run_batch, max_batch_size=max_batch_size, max_wait_s=max_wait_s,
            expected_clients=expected_clients)
        self._load_s = time.monotonic() - started
        logger.info("scorer actor %s (%s) ready in %.2fs, pid %d",
                    role, self.name, self._load_s, os.getpid())

    # ---- protocol methods, called remotely by the proxies in scorer_proxies.py ----
    # `client` names the calling story worker: a batch runs as soon as every expected
    # client has a request in it (see RequestBatcher).
    async def embed_images(self, images: np.ndarray, client: str | None = None) -> np.ndarray:
        images = _check_images(images)
        return await self._batcher.submit(EMBED_IMAGES, images, len(images), client)

    async def embed_texts(self, texts: Sequence[str], client: str | None = None) -> np.ndarray:
        texts = [str(t) for t in texts]
        return await self._batcher.submit(EMBED_TEXTS, texts, len(texts), client)

    async def score_embeddings(self, embeddings: np.ndarray,
                               client: str | None = None) -> np.ndarray:
        """Gate scores from CLIP embeddings (a gate whose model has `score_embeddings`,
        e.g. the aesthetic head on the CLIP pool's own model): no second image forward."""
        if not hasattr(self._model, "score_embeddings"):
            raise ValueError(f"scorer {self.name} cannot score embeddings; send images")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D); got shape {embeddings.shape}")
        return await self._batcher.submit(SCORE_EMBEDDINGS, embeddings, len(embeddings),
                                          client)

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
        key = (SCORE_IMAGES, prompts is not None)
        return await self._batcher.submit(key, (images, prompts), len(images), client)

    async def set_expected_clients(self, expected_clients: int | None) -> None:
        """How many story workers call this actor now (see RequestBatcher); async, so it
        runs on the event loop that owns the batcher."""
        self._batcher.set_expected_clients(expected_clients)

    # ---- introspection ----
    def info(self) -> dict:
        return {"role": self.role, "name": self.name, "pid": os.getpid(),
                "python": sys.executable, "load_s": self._load_s, **self._extra}

    def stats(self) -> dict:
        merged: dict[str, dict] = {}
        for key, stats in self._batcher.stats.items():
            label = key if isinstance(key, str) else key[0]
            merged[label] = stats.as_dict()
        return {"role": self.role, "name": self.name, "pid": os.getpid(), "methods": merged}

    # ---- the batch handler (runs in the batcher's worker thread) ----
    # Every forward has exactly `max_batch_size` rows (the last one padded with black
    # frames / empty texts): kernels are chosen by shape, so a fixed shape makes a frame's
    # numbers independent of what it was batched with - a resumed or re-run story gets
    # byte-identical embeddings and scores.
    def _run_batch(self, key: Hashable, payloads: Sequence[Any]) -> list:
        method = key if isinstance(key, str) else key[0]
        if method == EMBED_TEXTS:
            texts = [t for payload in payloads for t in payload]
            out = self._forward(lambda rows: self._model.embed_texts(rows), texts, "")
            return _split(out, [len(p) for p in payloads])
        if method == EMBED_IMAGES:
            frames = np.concatenate(list(payloads), axis=0)
            out = self._forward(lambda rows: self._model.embed_images(rows), frames, 0)
            return _split(out, [len(p) for p in payloads])
        if method == SCORE_EMBEDDINGS:
            rows = np.concatenate(list(payloads), axis=0)
            # padding rows: any unit vector (the head is row-wise; they are dropped)
            filler = np.zeros(rows.shape[1], dtype=np.float32)
            filler[0] = 1.0
            out = self._forward(lambda chunk: self._model.score_embeddings(chunk), rows, filler)
            return _split(out, [len(p) for p in payloads])
        if method == SCORE_IMAGES:
            frames = np.concatenate([images for images, _ in payloads], axis=0)
            if payloads[0][1] is None:
                out = self._forward(lambda rows: self._model.score_images(rows), frames, 0)
            else:
                prompts = [p for _, ps in payloads for p in ps]
                pairs = list(zip(frames, prompts))
                out = self._forward(lambda rows: self._model.score_images(
                    np.stack([f for f, _ in rows]), [p for _, p in rows]), pairs,
                    (np.zeros_like(frames[0]), ""))
            return _split(out, [len(images) for images, _ in payloads])
        raise ValueError(f"unknown scorer method {method!r}")

    def _forward(self, call: Callable[[Any], Any], rows, filler) -> np.ndarray:
        """`call` over `rows` in forwards of exactly max_batch_size rows."""
        size = self.max_batch_size
        parts = []
        for lo in range(0, len(rows), size):
            chunk = rows[lo:lo + size]
            real = len(chunk)
            if real < size:
                if isinstance(chunk, np.ndarray):
                    pad = np.full((size - real, *chunk.shape[1:]), filler, dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad], axis=0)
                else:
                    chunk = list(chunk) + [filler] * (size - real)
            parts.append(np.asarray(call(chunk))[:real])
        if not parts:
            return np.asarray(call(rows))
        return np.concatenate(parts, axis=0)


def _check_images(images: Any) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"images must be a uint8 array (N, H, W, 3); got dtype {array.dtype}, "
            f"shape {array.shape}")
    return array


def _split(out: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    if len(out) != sum(sizes):
        raise RuntimeError(f"scorer returned {len(out)} rows for {sum(sizes)} inputs")
    bounds = np.cumsum([0] + sizes)
    return [out[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _limit_threads(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(int(threads))
    except ImportError:  # a scorer without torch needs no limit
        pass
