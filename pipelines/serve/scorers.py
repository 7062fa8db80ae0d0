"""Shared scorer deployments of the Serve app, and proxies that make them look local.

The CLIP embedder and the quality gate each run as one Serve deployment shared by every
generation replica, each loading only what it serves, from the scorer factory every host
uses: `build_embedder(spec)` in `image_embedder`, `build_gate(spec)` in `image_gate` (the
aesthetic predictor on its own CLIP, the tiny head on its own tiny CLIP, or HPSv3). Requests
arriving close together are batched with `@serve.batch` (same-size images are concatenated
into one call, then split back), so the scorer models run full batches. The scorer objects
run every forward at a fixed number of rows (`storymem_model.scorers.fixed_batch`), so a
frame's numbers do not depend on what it was batched with here either - the same rule as
the in-process runner and the Ray batch (a test checks the bytes).

`ServeImageEmbedder` / `ServeImageScorer` implement the scorer protocols of
`storymem_model.scorers.base` on top of deployment handles, named by the content ids the
RenderConfig holds, so the story runner and `ShotStep` use them unchanged. Their methods
block (`DeploymentResponse.result()`), so they must be called from a worker thread, never
from a replica's event loop - the generation deployment runs all model work in a thread.
"""
from __future__ import annotations

import numpy as np
from ray import serve

from storymem_model.specs import ScorerSpec

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.01


def _run_grouped(function, batches: list[np.ndarray]) -> list[np.ndarray]:
    """Run `function` once per image size over the concatenated requests, split back."""
    results: list = [None] * len(batches)
    by_shape: dict[tuple, list[int]] = {}
    for index, batch in enumerate(batches):
        by_shape.setdefault(tuple(batch.shape[1:]), []).append(index)
    for indices in by_shape.values():
        joined = np.concatenate([batches[i] for i in indices])
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


def _limit_threads(torch_threads: int | None) -> None:
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))


class _BatchStats:
    """How a deployment's requests were batched."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def add(self, size: int) -> None:
        self.batch_sizes.append(size)

    def as_dict(self) -> dict:
        return {"batches": len(self.batch_sizes), "requests": sum(self.batch_sizes),
                "max_requests_per_batch": max(self.batch_sizes, default=0)}


@serve.deployment(name="image_embedder", ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=64)
class ImageEmbedderDeployment:
    """The CLIP image/text embedder, loaded once per replica, shared by all generators."""

    def __init__(self, spec: ScorerSpec, torch_threads: int | None = None):
        from storymem_model.scorers.factory import build_embedder

        _limit_threads(torch_threads)
        self.embedder = build_embedder(spec)
        self.served = _BatchStats()

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def embed_images(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        self.served.add(len(requests))
        return _run_grouped(self.embedder.embed_images, [_as_batch(r) for r in requests])

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embedder.embed_texts(list(texts)))

    async def stats(self) -> dict:
        return self.served.as_dict()


@serve.deployment(name="image_gate", ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=64)
class ImageGateDeployment:
    """The keyframe quality gate (aesthetic or HPSv3 scorer), shared by all generators."""

    def __init__(self, spec: ScorerSpec, torch_threads: int | None = None):
        from storymem_model.scorers.factory import build_gate

        _limit_threads(torch_threads)
        self.gate = build_gate(spec)
        self.served = _BatchStats()

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def score_images(self, requests: list[tuple]) -> list[np.ndarray]:
        self.served.add(len(requests))
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
        return self.served.as_dict()


# -- local stand-ins ------------------------------------------------------------------------
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


def serve_keyframe_scorers(config, embedder_handle, gate_handle):
    """KeyframeScorers over the scorer deployments, named by the ids and threshold the
    RenderConfig was resolved with (the deployments build exactly those scorers); None
    without scorer deployments (memory off)."""
    if embedder_handle is None or gate_handle is None:
        return None
    from storymem_model.scorers.base import KeyframeScorers

    return KeyframeScorers(embedder=ServeImageEmbedder(embedder_handle, config.embedder_id),
                           gate=ServeImageScorer(gate_handle, config.gate_id),
                           gate_threshold=float(config.gate_threshold))
