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

Replaced actors: a scorer actor that died past its Ray restarts is replaced by the driver
with a new actor under the same name (`pipelines.scorer_pools.ScorerPools.supervise`). A
call that finds its actor dead for good (`ActorDiedError`) looks the name up until the
replacement is there (at most `REPLACEMENT_WAIT_S`) and is sent again (scorer calls are
idempotent); the worker and its story go on.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import ray


log = logging.getLogger("storymem.scorer_proxies")

REPLACEMENT_WAIT_S = 600.0  # how long a call waits for a dead actor's replacement to appear
REPLACEMENT_POLL_S = 0.5
CALL_REPLACEMENTS = 3  # how many replacements one call goes through before it fails


class ScorerMismatchError(RuntimeError):
    """A scorer actor serves another model than the render spec names."""


class ScorerUnavailable(RuntimeError):
    """A scorer actor died for good and no replacement appeared in time."""


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
    clip_names: tuple = ()  # the actors' names (a replacement takes the same name)
    gate_names: tuple = ()


class _PoolProxy:
    def __init__(self, handles: Sequence, name: str, timeout_s: float | None = 600.0,
                 client_index: int | None = None, names: Sequence[str] = ()):
        if not handles:
            raise ValueError("a scorer proxy needs at least one scorer actor")
        self._handles = list(handles)
        self._names = list(names)
        self.name = name
        self.timeout_s = timeout_s
        self.client_index = client_index
        self._client = None if client_index is None else f"worker-{client_index}"
        self._turn = itertools.count()

    def _index(self) -> int:
        if self.client_index is not None:
            return self.client_index % len(self._handles)
        return next(self._turn) % len(self._handles)

    def _call(self, method: str, *args, index: int | None = None, **kwargs):
        """`method` on the chosen actor; through a replacement when it died for good."""
        index = self._index() if index is None else index
        for replaced in range(CALL_REPLACEMENTS + 1):
            handle = self._handles[index]
            try:
                return ray.get(getattr(handle, method).remote(*args, **kwargs),
                               timeout=self.timeout_s)
            except ray.exceptions.ActorDiedError:
                if replaced == CALL_REPLACEMENTS or index >= len(self._names):
                    raise
                self._handles[index] = _replacement(self._names[index], handle)

    def __getstate__(self):
        return {"handles": self._handles, "name": self.name, "timeout_s": self.timeout_s,
                "client_index": self.client_index, "names": self._names}

    def __setstate__(self, state):
        self.__init__(state["handles"], state["name"], state["timeout_s"],
                      state.get("client_index"), state.get("names", ()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, actors={len(self._handles)})"


def _replacement(name: str, dead, wait_s: float | None = None):
    """The actor now registered under `name`, once it is another than `dead`."""
    wait_s = REPLACEMENT_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    log.warning("scorer actor %s died for good; waiting for its replacement", name)
    while True:
        try:
            handle = ray.get_actor(name)
            if handle._actor_id != dead._actor_id:
                return handle
        except ValueError:  # between the old actor's removal and the new one's creation
            pass
        if time.monotonic() > deadline:
            raise ScorerUnavailable(f"scorer actor {name} died and no replacement appeared "
                                    f"within {wait_s:.0f} s")
        time.sleep(REPLACEMENT_POLL_S)


class EmbedderProxy(_PoolProxy):
    """`ImageEmbedder` backed by a pool of scorer actors holding the CLIP model."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return self._call("embed_images", np.asarray(images), client=self._client)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._call("embed_texts", list(texts), client=self._client)


class ImageScorerProxy(_PoolProxy):
    """`ImageScorer` backed by a pool of scorer actors (aesthetic predictor or HPSv3)."""

    def score_images(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        prompts = list(prompts) if prompts is not None else None
        return self._call("score_images", np.asarray(images), prompts, client=self._client)


class EmbeddingGateProxy(ImageScorerProxy):
    """A gate whose actors score CLIP embeddings of the CLIP pool's own model (the tiny
    preset's aesthetic head, as `build_keyframe_scorers` shares it in process): keyframe
    selection embeds each frame once and sends only the embeddings to the gate."""

    def __init__(self, handles: Sequence, name: str, timeout_s: float | None = 600.0,
                 client_index: int | None = None, names: Sequence[str] = (),
                 embedder: EmbedderProxy | None = None):
        super().__init__(handles, name, timeout_s, client_index, names)
        self.embedder = embedder

    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return self._call("score_embeddings", np.asarray(embeddings, dtype=np.float32),
                          client=self._client)

    def __getstate__(self):
        return {**super().__getstate__(), "embedder": self.embedder}

    def __setstate__(self, state):
        self.__init__(state["handles"], state["name"], state["timeout_s"],
                      state.get("client_index"), state.get("names", ()),
                      state.get("embedder"))


def keyframe_scorers_from_pools(pools: ScorerPoolHandles, timeout_s: float | None = 600.0):
    """KeyframeScorers of proxies over the CLIP and gate pools. Waits until the pools'
    first actors have loaded their models and checks that they serve the scorers the
    config names (ScorerMismatchError otherwise)."""
    from storymem_model.scorers.base import KeyframeScorers

    embedder = EmbedderProxy(pools.clip, pools.embedder_id, timeout_s, pools.client_index,
                             pools.clip_names)
    clip_info = embedder._call("info", index=0)
    probe = ImageScorerProxy(pools.gate, pools.gate_id, timeout_s, pools.client_index,
                             pools.gate_names)
    gate_info = probe._call("info", index=0)
    for info, wanted in ((clip_info, pools.embedder_id), (gate_info, pools.gate_id)):
        if info.name != wanted:
            raise ScorerMismatchError(f"the {info.role} scorer actor serves {info.name}, the "
                                      f"render spec names {wanted}")
    if gate_info.embeds_with == clip_info.name:
        gate = EmbeddingGateProxy(pools.gate, gate_info.name, timeout_s, pools.client_index,
                                  pools.gate_names, embedder=embedder)
    else:
        gate = probe
    return KeyframeScorers(embedder=embedder, gate=gate,
                           gate_threshold=float(pools.gate_threshold))
