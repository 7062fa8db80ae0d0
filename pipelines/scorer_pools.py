"""Start the shared scorer actor pools of a batch and hand workers handles to them.

Pools (each `n` actors of `actors.scorer_actor.ScorerActor`, shared by every story worker),
built from the render's `ScorerSpec` by the one scorer factory:
- `clip`: the CLIP `ImageEmbedder` (keyframe similarity, prompt-aware memory, consistency);
- `gate`: the keyframe quality gate - the aesthetic predictor, or HPSv3 when the spec names
  it. The HPSv3 actors run under the HPS environment's interpreter
  (`runtime_env={"py_executable": ...}`, built by `make hps-env` into .hps-venv), because
  the hpsv3 package pins an older transformers than the main environment.

A pool's device follows the GPUs its actors get (`ScorerPoolOptions.gpus_per_actor`), not
the story workers'. Scorer calls are idempotent, so actors restart on a crash and calls are
retried (`max_restarts`, `max_task_retries`).

Batching: story worker i always calls actor i % n of each pool (`client_index` of the
proxies), so each actor knows how many workers send to it (`clients_per_actor`) and runs a
batch as soon as all of them wait, else after `max_wait_s`: with one worker nothing waits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from actors.scorer_actor import ScorerActor, ScorerRole
from actors.scorer_proxies import ScorerPoolHandles, keyframe_scorers_from_pools
from pipelines.batch.spec import ScorerPoolOptions
from storymem_model.model_identity import scorer_identity
from storymem_model.specs import ScorerSpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HPS_PYTHON = PROJECT_ROOT / ".hps-venv" / "bin" / "python"
SCORER_MAX_RESTARTS = 3
SCORER_MAX_TASK_RETRIES = 2


class ScorerPoolError(RuntimeError):
    """A scorer pool that cannot start (missing HPS environment, load error)."""


def hps_python(spec: ScorerSpec) -> Path:
    """The interpreter the HPSv3 gate actors run under."""
    return Path(spec.hps_python) if spec.hps_python else DEFAULT_HPS_PYTHON


@dataclass
class ScorerPools:
    """Both pools' actors and the scorer ids they must serve (from the spec)."""

    spec: ScorerSpec
    clip: list
    gate: list
    embedder_id: str
    gate_id: str
    gate_threshold: float
    info: dict = field(default_factory=dict)  # role -> [ScorerActorInfo], after wait_ready

    @property
    def clip_name(self) -> str:
        return self.embedder_id

    @property
    def gate_name(self) -> str:
        return self.gate_id

    def handles(self, client_index: int | None = None) -> ScorerPoolHandles:
        """What story worker `client_index` gets (sticky routing, see the module text)."""
        return ScorerPoolHandles(clip=tuple(self.clip), gate=tuple(self.gate),
                                 embedder_id=self.embedder_id, gate_id=self.gate_id,
                                 gate_threshold=self.gate_threshold,
                                 client_index=client_index)

    def keyframe_scorers(self, timeout_s: float | None = 600.0,
                         client_index: int | None = None):
        """KeyframeScorers made of proxies to the pools (what the story runner takes)."""
        return keyframe_scorers_from_pools(self.handles(client_index), timeout_s)

    def wait_ready(self) -> None:
        """Block until every actor has loaded its model; ScorerPoolError if one cannot."""
        import ray

        try:
            infos = ray.get([h.info.remote() for h in self.clip + self.gate])
        except ray.exceptions.RayActorError as exc:
            self.kill()
            raise ScorerPoolError(f"a scorer actor could not load its model: {exc}") from exc
        self.info = {ScorerRole.CLIP.value: infos[:len(self.clip)],
                     ScorerRole.GATE.value: infos[len(self.clip):]}

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
            name = self.embedder_id if pool_name == "clip" else self.gate_id
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


def start_scorer_pools(spec: ScorerSpec, options: ScorerPoolOptions,
                       name_prefix: str = "storymem", wait: bool = True,
                       clients: int | None = None) -> ScorerPools:
    """Create both pools for `spec`; with `wait`, block until every actor has loaded its
    model (else call `wait_ready()` later: the models load while the caller does other
    work). `clients`: the number of story workers, which pass `client_index`
    0..clients-1 to their proxies (None: callers unknown, batches wait for size or max
    wait)."""
    import ray

    problems = spec.problems_for_keyframes()
    if problems:
        raise ScorerPoolError("; ".join(problems))
    runtime_env = None
    if spec.uses_hps:
        python = hps_python(spec)
        if not python.exists():
            raise ScorerPoolError(
                f"the HPS environment's interpreter {python} does not exist: build it with "
                f"`make hps-env` (or pass its path)")
        runtime_env = {"py_executable": str(python),
                       "env_vars": {"PYTHONPATH": _pythonpath()}}
    identity = scorer_identity(spec)  # the ids the actors must report (file headers only)
    spec = spec.replace(device="cuda" if options.gpus_per_actor > 0 else "cpu")
    remote = ray.remote(ScorerActor)
    common = dict(num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor,
                  max_restarts=SCORER_MAX_RESTARTS, max_task_retries=SCORER_MAX_TASK_RETRIES,
                  max_concurrency=1000)
    batching = dict(max_batch_size=options.max_batch_size, max_wait_s=options.max_wait_s,
                    torch_threads=options.torch_threads)

    def pool(role: ScorerRole, count: int, label: str, env) -> list:
        expected = clients_per_actor(clients, count)
        extra = {"runtime_env": env} if env else {}
        return [remote.options(name=f"{name_prefix}-{label}-{i}", **common, **extra).remote(
            spec, role, expected_clients=expected[i], **batching) for i in range(count)]

    clip = pool(ScorerRole.CLIP, options.clip_actors, "clip", None)
    gate = pool(ScorerRole.GATE, options.gate_actors, "hps" if spec.uses_hps else "gate",
                runtime_env)
    pools = ScorerPools(spec=spec, clip=clip, gate=gate, embedder_id=identity.embedder_id,
                        gate_id=identity.gate_id, gate_threshold=identity.gate_threshold)
    if wait:
        pools.wait_ready()
    return pools


def _pythonpath() -> str:
    parts = [str(PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)
