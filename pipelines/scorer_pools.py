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
retried (`ScorerPoolOptions.max_restarts`, `max_task_retries`).

Supervision: an actor that dies past its Ray restarts is replaced by a new actor under the
same name (`ScorerPools.supervise`, called by the batch driver every loop: each actor is
pinged every `PING_S`), up to `ScorerPoolOptions.replacement_limit` replacements per run;
the workers' proxies find the new actor by its name and send their calls again
(`actors.scorer_proxies`). Past the limit the run stops with one `ScorerPoolError` naming
the actor (a scorer that keeps dying would fail every later story).

Batching: story worker i always calls actor i % n of each pool (`client_index` of the
proxies), so each actor knows how many workers send to it (`clients_per_actor`) and runs a
batch as soon as all of them wait, else after `max_wait_s`: with one worker nothing waits.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from actors.scorer_actor import ScorerActor, ScorerRole
from actors.scorer_proxies import ScorerPoolHandles, keyframe_scorers_from_pools
from pipelines.batch.spec import ScorerPoolOptions
from storymem_model.model_identity import ScorerIdentity
from storymem_model.specs import ScorerSpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HPS_PYTHON = PROJECT_ROOT / ".hps-venv" / "bin" / "python"
SCORER_MAX_TASK_RETRIES = 2
PING_S = 1.0  # how often the driver asks each scorer actor whether it lives


class ScorerPoolError(RuntimeError):
    """A scorer pool that cannot start (missing HPS environment, load error)."""


def hps_python(spec: ScorerSpec) -> Path:
    """The interpreter the HPSv3 gate actors run under."""
    return Path(spec.hps_python) if spec.hps_python else DEFAULT_HPS_PYTHON


@dataclass
class ScorerPools:
    """Both pools' actors and the scorer ids they must serve (the render config's)."""

    clip: list
    gate: list
    embedder_id: str
    gate_id: str
    gate_threshold: float
    info: dict = field(default_factory=dict)  # role -> [ScorerActorInfo], after wait_ready
    clip_names: list = field(default_factory=list)
    gate_names: list = field(default_factory=list)
    start: Any = None  # (role, index, expected clients) -> a new actor under its name
    replacement_limit: int = 0
    replacements: int = 0
    _pings: dict = field(default_factory=dict)  # ObjectRef -> (role, index)
    _next_ping: dict = field(default_factory=dict)  # (role, index) -> monotonic time
    _clients: Any = None  # the live workers' indices (None: unknown)

    def handles(self, client_index: int | None = None) -> ScorerPoolHandles:
        """What story worker `client_index` gets (sticky routing, see the module text)."""
        return ScorerPoolHandles(clip=tuple(self.clip), gate=tuple(self.gate),
                                 embedder_id=self.embedder_id, gate_id=self.gate_id,
                                 gate_threshold=self.gate_threshold,
                                 client_index=client_index, clip_names=tuple(self.clip_names),
                                 gate_names=tuple(self.gate_names))

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
        self._clients = indices
        for handles in (self.clip, self.gate):
            for handle, count in zip(handles, clients_per_actor(indices, len(handles))):
                handle.set_expected_clients.remote(count)

    def actors(self) -> list:
        return [*self.clip, *self.gate]

    # -- supervision ---------------------------------------------------------------------
    def supervise(self) -> list[tuple[str, str]]:
        """Ping every actor every PING_S (never blocking); replace each one that died past
        its Ray restarts. Returns (actor name, reason) per replacement made now; raises
        ScorerPoolError naming the actor once the replacements are used up."""
        import ray

        replaced = []
        if self._pings:
            ready, _ = ray.wait(list(self._pings), num_returns=len(self._pings), timeout=0)
            for ref in ready:
                role, index = self._pings.pop(ref)
                self._next_ping[(role, index)] = time.monotonic() + PING_S
                try:
                    ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    continue  # Ray is restarting it (within max_restarts)
                except ray.exceptions.RayActorError as exc:
                    replaced.append(self._replace(role, index, exc))
        now = time.monotonic()
        pinged = set(self._pings.values())
        for role, handles in ((ScorerRole.CLIP, self.clip), (ScorerRole.GATE, self.gate)):
            for index, handle in enumerate(handles):
                key = (role, index)
                if key not in pinged and self._next_ping.get(key, 0.0) <= now:
                    self._pings[handle.info.remote()] = key
        return replaced

    def _replace(self, role: ScorerRole, index: int, exc: BaseException) -> tuple[str, str]:
        import ray

        handles, names = (self.clip, self.clip_names) if role is ScorerRole.CLIP else \
            (self.gate, self.gate_names)
        name = names[index]
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self.replacements >= self.replacement_limit:
            raise ScorerPoolError(
                f"scorer actor {name} died past its Ray restarts and the run's "
                f"{self.replacement_limit} scorer replacement(s) are used up; the batch "
                f"stops (every later story would fail): {reason}")
        try:  # frees the name for the replacement
            ray.kill(handles[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        expected = clients_per_actor(self._clients, len(handles))[index]
        handles[index] = self.start(role, index, expected)
        self.replacements += 1
        self._next_ping[(role, index)] = 0.0
        return name, reason

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


def start_scorer_pools(spec: ScorerSpec, identity: ScorerIdentity, options: ScorerPoolOptions,
                       name_prefix: str = "storymem", wait: bool = True,
                       clients: int | None = None) -> ScorerPools:
    """Create both pools for `spec`, whose actors must serve the scorer ids of `identity`
    (the resolved render config's: `model_identity.scorer_identity(spec)`); with `wait`,
    block until every actor has loaded its model (else call `wait_ready()` later: the
    models load while the caller does other work). `clients`: the number of story
    workers, which pass `client_index` 0..clients-1 to their proxies (None: callers
    unknown, batches wait for size or max wait)."""
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
    spec = spec.replace(device="cuda" if options.gpus_per_actor > 0 else "cpu")
    remote = ray.remote(ScorerActor)
    common = dict(num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor,
                  max_restarts=options.max_restarts, max_task_retries=SCORER_MAX_TASK_RETRIES,
                  max_concurrency=1000)
    batching = dict(max_batch_size=options.max_batch_size, max_wait_s=options.max_wait_s,
                    torch_threads=options.torch_threads)
    labels = {ScorerRole.CLIP: "clip", ScorerRole.GATE: "hps" if spec.uses_hps else "gate"}
    envs = {ScorerRole.CLIP: None, ScorerRole.GATE: runtime_env}

    def actor_name(role: ScorerRole, index: int) -> str:
        return f"{name_prefix}-{labels[role]}-{index}"

    def start(role: ScorerRole, index: int, expected: int | None):
        extra = {"runtime_env": envs[role]} if envs[role] else {}
        return remote.options(name=actor_name(role, index), **common, **extra).remote(
            spec, role, expected_clients=expected, **batching)

    def pool(role: ScorerRole, count: int) -> list:
        expected = clients_per_actor(clients, count)
        return [start(role, i, expected[i]) for i in range(count)]

    clip = pool(ScorerRole.CLIP, options.clip_actors)
    gate = pool(ScorerRole.GATE, options.gate_actors)
    pools = ScorerPools(clip=clip, gate=gate, embedder_id=identity.embedder_id,
                        gate_id=identity.gate_id, gate_threshold=identity.gate_threshold,
                        clip_names=[actor_name(ScorerRole.CLIP, i) for i in range(len(clip))],
                        gate_names=[actor_name(ScorerRole.GATE, i) for i in range(len(gate))],
                        start=start, replacement_limit=options.replacement_limit,
                        _clients=None if clients is None else list(range(clients)))
    if wait:
        pools.wait_ready()
    return pools


def _pythonpath() -> str:
    parts = [str(PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)
