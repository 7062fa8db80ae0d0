"""Shared scorer deployments of the Serve app, and proxies that make them look local.

The CLIP embedder and the quality gate (aesthetic or HPSv3) each run as one Serve
deployment shared by every generation replica. Requests from different shots arriving
close together are batched with `@serve.batch` (same-size images are concatenated into one
forward pass, then split back), so the scorer models run full batches.

`ServeImageEmbedder` / `ServeImageScorer` implement the scorer protocols of
`storymem_model.scorers.base` on top of deployment handles, so the story runner uses them
unchanged. Their methods block (`DeploymentResponse.result()`), so they must be called from
a worker thread, never from a replica's event loop - the generation deployment runs all
model work in a thread.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from ray import serve

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.01


def _run_grouped(function, batches: list[np.ndarray]) -> list[np.ndarray]:
    """Run `function` once per image size over the concatenated requests, split back."""
    results: list = [None] * len(batches)
    by_shape: dict[tuple, list[int]] = {}
    for index, batch in enumerate(batches):
        by_shape.setdefault(tuple(batch.shape[1:]), []).append(index)
    for indices in by_shape.values():
        joined = np.concatenate([batches[i] for i in indices]) if len(indices) > 1 else batches[indices[0]]
        out = np.asarray(function(joined))
        start = 0
        for i in indices:
            count = batches[i].shape[0]
            results[i] = out[start:start + count]
            start += count
    return results


def _as_batch(images) -> np.ndarray:
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    return np.ascontiguousarray(batch, dtype=np.uint8)


@serve.deployment(name="image_embedder", ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=64)
class ImageEmbedderDeployment:
    """The CLIP image/text embedder, loaded once per replica, shared by all generators."""

    def __init__(self, build_scorers: Callable, torch_threads: int | None = None):
        _limit_threads(torch_threads)
        scorers = build_scorers()
        self.embedder = scorers.embedder
        self.batches_served: list[int] = []

    async def name(self) -> str:
        return str(getattr(self.embedder, "name", ""))

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def embed_images(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        self.batches_served.append(len(requests))
        return _run_grouped(self.embedder.embed_images, [_as_batch(r) for r in requests])

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embedder.embed_texts(list(texts)))

    async def stats(self) -> dict:
        return _batch_stats(self.batches_served)


@serve.deployment(name="image_gate", ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=64)
class ImageGateDeployment:
    """The keyframe quality gate (aesthetic or HPSv3 scorer), shared by all generators."""

    def __init__(self, build_scorers: Callable, torch_threads: int | None = None):
        _limit_threads(torch_threads)
        scorers = build_scorers()
        self.gate = scorers.gate
        self.threshold = float(scorers.gate_threshold)
        self.batches_served: list[int] = []

    async def describe(self) -> dict:
        return {"name": str(getattr(self.gate, "name", "")), "threshold": self.threshold}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def score_images(self, requests: list[tuple]) -> list[np.ndarray]:
        self.batches_served.append(len(requests))
        results: list = [None] * len(requests)
        # Prompted and unprompted requests cannot share one call; group each kind.
        plain = [i for i, (_, prompts) in enumerate(requests) if prompts is None]
        for i, out in zip(plain, _run_grouped(self.gate.score_images,
                                              [_as_batch(requests[i][0]) for i in plain])):
            results[i] = out
        for i, (images, prompts) in enumerate(requests):
            if prompts is not None:
                results[i] = np.asarray(self.gate.score_images(_as_batch(images), list(prompts)))
        return results

    async def stats(self) -> dict:
        return _batch_stats(self.batches_served)


def _batch_stats(batch_sizes: list[int]) -> dict:
    """How a deployment's requests were batched."""
    return {"batches": len(batch_sizes), "requests": sum(batch_sizes),
            "max_requests_per_batch": max(batch_sizes, default=0)}


def _limit_threads(torch_threads: int | None) -> None:
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))


class ServeImageEmbedder:
    """`ImageEmbedder` protocol over the shared embedder deployment (blocking calls)."""

    def __init__(self, handle, name: str):
        self._handle = handle
        self.name = name

    def embed_images(self, images) -> np.ndarray:
        return np.asarray(self._handle.embed_images.remote(_as_batch(images)).result(),
                          dtype=np.float32)

    def embed_texts(self, texts) -> np.ndarray:
        return np.asarray(self._handle.embed_texts.remote(list(texts)).result(),
                          dtype=np.float32)


class ServeImageScorer:
    """`ImageScorer` protocol over the shared gate deployment (blocking calls)."""

    def __init__(self, handle, name: str):
        self._handle = handle
        self.name = name

    def score_images(self, images, prompts=None) -> np.ndarray:
        prompts = None if prompts is None else list(prompts)
        return np.asarray(self._handle.score_images.remote((_as_batch(images), prompts)).result(),
                          dtype=np.float32)
