"""Start the shared scorer actor pools of a batch and hand workers proxies to them.

Pools (each `n` actors of `actors.scorer_actor.ScorerActor`, shared by every story worker):
- `clip`: the CLIP `ImageEmbedder` (keyframe similarity, prompt-aware memory, consistency);
- `gate`: the keyframe quality gate - the aesthetic predictor, or HPSv3 when
  `HPSOptions` are given. The HPSv3 actors run under the HPS environment's interpreter
  (`runtime_env={"py_executable": ...}`, built by `make hps-env` into .hps-venv), because
  the hpsv3 package pins an older transformers than the main environment.

Scorer calls are idempotent, so actors restart on a crash and calls are retried
(`max_restarts`, `max_task_retries`).

Batching: story worker i always calls actor i % n of each pool (`client_index` of the
proxies), so each actor knows how many workers send to it (`clients_per_actor`) and runs a
batch as soon as all of them wait, else after `max_wait_s`: with one worker nothing waits.
"""
from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from actors import scorer_factories
from actors.scorer_actor import ScorerActor
from actors.scorer_proxies import keyframe_scorers_from_pools

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HPS_PYTHON = PROJECT_ROOT / ".hps-venv" / "bin" / "python"
SCORER_MAX_RESTARTS = 3
SCORER_MAX_TASK_RETRIES = 2


class ScorerPoolError(RuntimeError):
    """A scorer pool that cannot start (bad option, missing HPS environment, load error)."""


@dataclass(frozen=True)
class ScorerPoolOptions:
    clip_actors: int = 1
    gate_actors: int = 1
    max_batch_size: int = 32  # images per forward (fixed: every forward is padded to it)
    max_wait_s: float = 0.05  # how long a request may wait for others to fill the batch
    cpus_per_actor: float = 0.25
    gpus_per_actor: float = 0.0
    torch_threads: int = 1


@dataclass(frozen=True)
class HPSOptions:
    """Use HPSv3 as the keyframe gate (the reference's choice)."""

    checkpoint: str
    base_model: str  # Qwen2-VL folder
    python: str = str(DEFAULT_HPS_PYTHON)
    threshold: float | None = None
    dtype: str | None = None


@dataclass
class ScorerPools:
    clip: list
    gate: list
    gate_threshold: float
    clip_name: str
    gate_name: str
    info: dict = field(default_factory=dict)

    def keyframe_scorers(self, timeout_s: float | None = 600.0,
                         client_index: int | None = None):
        """KeyframeScorers made of proxies to the pools (what the story runner takes)."""
        return keyframe_scorers_from_pools(self.clip, self.gate, timeout_s, client_index)

    def wait_ready(self) -> None:
        """Block until every actor has loaded its model; fills the names and threshold."""
        import ray

        try:
            infos = ray.get([h.info.remote() for h in self.clip + self.gate])
        except ray.exceptions.RayActorError as exc:
            self.kill()
            raise ScorerPoolError(f"a scorer actor could not load its model: {exc}") from exc
        clip_info, gate_info = infos[0], infos[len(self.clip)]
        self.clip_name = clip_info["name"]
        self.gate_name = gate_info["name"]
        self.gate_threshold = float(gate_info["gate_threshold"])
        self.info = {"clip": infos[:len(self.clip)], "gate": infos[len(self.clip):]}

    def set_clients(self, client_indices) -> None:
        """Tell every actor how many of the live workers `client_indices` call it (after a
        worker is gone for good, so the others' requests stop waiting for it)."""
        indices = list(client_indices)
        for handles in (self.clip, self.gate):
            for handle, count in zip(handles, clients_per_actor(indices, len(handles))):
                handle.set_expected_clients.remote(count)

    def actors(self) -> list:
        return [*self.clip, *self.gate]

    def stats(self) -> dict:
        """Batching counters per pool, summed over its actors."""
        import ray

        out = {}
        for pool_name, handles in (("clip", self.clip), ("gate", self.gate)):
            merged: dict[str, dict] = {}
            try:
                per_actor = ray.get([h.stats.remote() for h in handles], timeout=60)
            except Exception as exc:  # a dead scorer actor must not lose the run tables
                out[pool_name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            for actor_stats in per_actor:
                for method, s in actor_stats["methods"].items():
                    m = merged.setdefault(method, {"batches": 0, "requests": 0, "items": 0,
                                                   "max_requests_per_batch": 0,
                                                   "max_items_per_batch": 0, "busy_s": 0.0})
                    for key in ("batches", "requests", "items", "busy_s"):
                        m[key] += s[key]
                    for key in ("max_requests_per_batch", "max_items_per_batch"):
                        m[key] = max(m[key], s[key])
            for m in merged.values():
                m["mean_requests_per_batch"] = m["requests"] / m["batches"] if m["batches"] else 0.0
                m["mean_items_per_batch"] = m["items"] / m["batches"] if m["batches"] else 0.0
            name = self.clip_name if pool_name == "clip" else self.gate_name
            out[pool_name] = {"name": name, "actors": len(handles), "methods": merged}
        return out

    def kill(self) -> None:
        import ray

        for handle in self.actors():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass


def clients_per_actor(clients: int | Iterable[int] | None, actors: int) -> list[int | None]:
    """How many story workers call each of `actors` actors (worker i calls actor
    i % actors): `clients` is the number of workers (indices 0..clients-1) or the indices
    of the live ones; at least 1 per actor (an actor nobody calls never waits); None
    (unknown callers) for every actor when `clients` is None."""
    if clients is None:
        return [None] * actors
    indices = set(range(clients) if isinstance(clients, int) else (int(i) for i in clients))
    return [max(1, sum(1 for i in indices if i % actors == j)) for j in range(actors)]


def start_scorer_pools(model_args: argparse.Namespace, options: ScorerPoolOptions,
                       hps: HPSOptions | None = None, name_prefix: str = "storymem",
                       wait: bool = True, clients: int | None = None) -> ScorerPools:
    """Create both pools; with `wait`, block until every actor has loaded its model (else
    call `wait_ready()` later: the models load while the caller does other work).
    `clients`: the number of story workers, which pass `client_index` 0..clients-1 to
    their proxies (None: callers unknown, batches wait for size or max wait)."""
    import ray

    if options.clip_actors < 1 or options.gate_actors < 1:
        raise ScorerPoolError("scorer pools need at least one actor each "
                              f"(clip {options.clip_actors}, gate {options.gate_actors})")
    if hps is not None and not Path(hps.python).exists():
        raise ScorerPoolError(
            f"the HPS environment's interpreter {hps.python} does not exist: build it with "
            f"`make hps-env` (or pass its path)")
    remote = ray.remote(ScorerActor)
    common = dict(num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor,
                  max_restarts=SCORER_MAX_RESTARTS, max_task_retries=SCORER_MAX_TASK_RETRIES,
                  max_concurrency=1000)
    batching = dict(max_batch_size=options.max_batch_size, max_wait_s=options.max_wait_s,
                    torch_threads=options.torch_threads)
    clip_clients = clients_per_actor(clients, options.clip_actors)
    gate_clients = clients_per_actor(clients, options.gate_actors)
    clip = [remote.options(name=f"{name_prefix}-clip-{i}", **common).remote(
        functools.partial(scorer_factories.build_embedder, model_args), role="clip",
        expected_clients=clip_clients[i], **batching)
        for i in range(options.clip_actors)]
    if hps is not None:
        runtime_env = {"py_executable": str(hps.python),
                       "env_vars": {"PYTHONPATH": _pythonpath()}}
        factory = functools.partial(scorer_factories.build_hps_gate, hps.checkpoint,
                                    hps.base_model, hps.threshold, hps.dtype)
        gate = [remote.options(name=f"{name_prefix}-hps-{i}", runtime_env=runtime_env,
                               **common).remote(factory, role="hps",
                                                expected_clients=gate_clients[i], **batching)
                for i in range(options.gate_actors)]
    else:
        factory = functools.partial(scorer_factories.build_aesthetic_gate, model_args)
        gate = [remote.options(name=f"{name_prefix}-aesthetic-{i}", **common).remote(
            factory, role="aesthetic", expected_clients=gate_clients[i], **batching)
            for i in range(options.gate_actors)]
    pools = ScorerPools(clip=clip, gate=gate, gate_threshold=0.0, clip_name="", gate_name="")
    if wait:
        pools.wait_ready()
    return pools


def _pythonpath() -> str:
    parts = [str(PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)
