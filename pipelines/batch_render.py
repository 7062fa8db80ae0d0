"""The Ray batch: render every script of a source once, nothing lost, workers kept busy.

`run_batch(scripts, out, model_args, workers=..., ...)` (and `storymem batch`):

1. Connect to Ray (embedded local cluster on 127.0.0.1 by default, or `ray_address`).
2. Start the shared scorer pools (CLIP, and the aesthetic or HPSv3 gate) and `workers`
   story worker actors (`actors.story_worker.StoryWorker`, `gpus_per_worker` each), each
   loading the pipeline once. Workers report the config hash they render with.
3. List the scripts lazily (`pipelines.script_source`); a script is read and validated only
   when a worker is free for it, so at most a few scripts are held at any time. Invalid
   scripts and duplicate story ids go to errors.parquet (stage "listing"); stories whose
   folder already holds `_COMMITTED.json` are skipped (checked in storage, not memory).
4. Each story runs on one worker through the story runner, which checkpoints after every
   shot. When a worker dies mid-story (process killed, actor crash, `ray.kill`), Ray
   restarts it (`worker_max_restarts`) or the driver starts a replacement, and the story
   is sent again and resumes from its last committed shot. A story is tried at most
   `max_attempts` times; then its last error goes to errors.parquet (stage "render") and
   the batch goes on. A story is only ever in flight on one worker at a time, and every
   file has a deterministic key, so there are no duplicate or partial outputs.
5. After the stories commit: `{out}/runs/{run_id}/stories.parquet`, `shots.parquet`,
   `errors.parquet`, `logs/{worker}.log`, then `summary.json` (see `pipelines.run_tables`).

Progress: a tqdm bar (stories done, shots, failures, shots/hour) on a terminal, log lines
otherwise; `on_event(event)` receives every event (used by tests and the Prefect flow).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as _dt
import itertools
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pipelines import run_tables
from pipelines.ray_runtime import ray_session
from pipelines.scorer_pools import (HPSOptions, ScorerPoolError, ScorerPoolOptions,
                                    start_scorer_pools)
from pipelines.script_source import ListingProblem, list_scripts, read_script
from storymem_model import storage

log = logging.getLogger("storymem.batch")

EventCallback = Callable[[dict], None]
POLL_S = 0.2


class BatchError(RuntimeError):
    """The batch as a whole cannot run (bad options, no worker can start)."""


@dataclass(frozen=True)
class BatchOptions:
    """Everything about how the batch runs (nothing here changes pixels)."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    max_attempts: int = 3  # per story
    worker_max_restarts: int = 2  # Ray restarts of one worker actor before it is replaced
    max_worker_replacements: int | None = None  # default: 2 * workers
    story_timeout_s: float | None = None  # a story running longer is killed and retried
    scorers: ScorerPoolOptions = field(default_factory=ScorerPoolOptions)
    hps: HPSOptions | None = None
    consistency: bool = False  # per-story consistency columns in stories.parquet
    torch_threads: int | None = 1  # per worker process
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise

    def problems(self) -> list[str]:
        out = []
        if self.workers < 1:
            out.append(f"workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            out.append(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker < 0:
            out.append(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.max_attempts < 1:
            out.append(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.worker_max_restarts < 0:
            out.append(f"worker_max_restarts must be >= 0, got {self.worker_max_restarts}")
        if self.story_timeout_s is not None and self.story_timeout_s <= 0:
            out.append(f"story_timeout_s must be positive, got {self.story_timeout_s}")
        if self.scorers.max_batch_size < 1:
            out.append(f"scorer max batch size must be >= 1, got {self.scorers.max_batch_size}")
        if self.scorers.max_wait_s < 0:
            out.append(f"scorer max wait must be >= 0, got {self.scorers.max_wait_s}")
        return out


# ---------------------------------------------------------------------------------------
def model_args_from(model_args: argparse.Namespace | list[str] | dict | None) -> argparse.Namespace:
    """Model flags as storymem render takes them: a parsed Namespace, a list of CLI flags
    (["--preset", "tiny", "--seed", "3"]) or a dict of flag destinations
    ({"preset": "tiny", "seed": 3}); None means --preset tiny."""
    from storymem_model.cli_render import add_model_arguments

    if isinstance(model_args, argparse.Namespace):
        return model_args
    parser = argparse.ArgumentParser(prog="storymem batch", add_help=False)
    add_model_arguments(parser)
    if model_args is None:
        return parser.parse_args(["--preset", "tiny"])
    if isinstance(model_args, (list, tuple)):
        try:
            return parser.parse_args(list(model_args))
        except SystemExit:
            raise BatchError(f"invalid model flags {list(model_args)}") from None
    if isinstance(model_args, dict):
        args = parser.parse_args([])
        unknown = sorted(set(model_args) - set(vars(args)))
        if unknown:
            raise BatchError(f"unknown model options {unknown}; known: {sorted(vars(args))}")
        for key, value in model_args.items():
            setattr(args, key, value)
        return args
    raise BatchError(f"model_args must be a Namespace, a list of flags or a dict, "
                     f"got {type(model_args).__name__}")


def new_run_id() -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def run_batch(scripts: str, out: str,
              model_args: argparse.Namespace | list[str] | dict | None = None, *,
              workers: int | None = None, gpus_per_worker: float | None = None,
              ray_address: str | None = None, run_id: str | None = None,
              options: BatchOptions | None = None,
              pipeline_factory: Callable[[argparse.Namespace], Any] | None = None,
              on_event: EventCallback | None = None) -> dict:
    """Render every story of `scripts` into `out`; returns the run summary (summary.json).

    `model_args`: the `storymem render` model flags (see `model_args_from`).
    `workers`, `gpus_per_worker`: shortcuts for the same fields of `options` (they win).
    `pipeline_factory(args)`: builds the pipeline in each worker (default
    `storymem_model.cli_render.pipeline_from_args`); a hook for wrappers and tests.
    Raises BatchError when the batch cannot run at all; a failing story never raises.
    """
    overrides = {k: v for k, v in (("workers", workers), ("gpus_per_worker", gpus_per_worker))
                 if v is not None}
    options = dataclasses.replace(options or BatchOptions(), **overrides)
    problems = options.problems()
    if problems:
        raise BatchError("; ".join(problems))
    args = model_args_from(model_args)
    if not getattr(args, "preset", None) and not getattr(args, "model_dir", None):
        raise BatchError("give --preset tiny or --model-dir DIR (model_args)")
    run_id = run_id or new_run_id()
    if not run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise BatchError(f"run_id {run_id!r}: use letters, digits, '-', '_' and '.' only")
    _check_model_flags(args)
    storage.filesystem(out)  # an unusable --out fails here, before any actor starts
    listing = _fail_fast(list_scripts(scripts, exclude=out))  # so does a bad --scripts
    with ray_session(ray_address):
        batch = _BatchRun(scripts, out, args, run_id, options, pipeline_factory, on_event,
                          listing)
        batch.ray_address = ray_address
        return batch.run()


def _check_model_flags(args: argparse.Namespace) -> None:
    """Unusable setting values fail in seconds, before any worker loads a model: the
    config is built once with the model's usual defaults standing in for the pipeline."""
    from types import SimpleNamespace

    from storymem_model.cli_render import config_from_args, references_from_args
    from storymem_model.presets import REAL_SHOT, TINY

    if getattr(args, "preset", None) != "tiny" and not getattr(args, "clip_checkpoint", None):
        raise BatchError("real models need real keyframe scorers: give --clip-checkpoint, "
                         "--aesthetic-head and --aesthetic-clip-checkpoint")
    shot = TINY.shot if getattr(args, "preset", None) == "tiny" else REAL_SHOT
    stand_in = SimpleNamespace(
        model_id="(not loaded yet)", default_height=shot.height, default_width=shot.width,
        default_num_frames=shot.num_frames, fps=shot.fps, default_sampling={})
    try:
        config_from_args(args, stand_in, None, references=references_from_args(args))
    except (ValueError, SystemExit) as exc:
        raise BatchError(f"invalid model settings: {exc}") from None


# ---------------------------------------------------------------------------------------
@dataclass
class _StoryTask:
    position: int
    source: str
    script: Any
    attempts: int = 0
    last_error: tuple[str, str] | None = None  # (type, message)
    started: float = 0.0


@dataclass
class _Slot:
    index: int
    generation: int = 0
    handle: Any = None
    name: str = ""
    state: str = "starting"  # starting | idle | busy | recovering
    task: _StoryTask | None = None
    pid: int | None = None
    timed_out: bool = False  # the driver killed it for --story-timeout


class _BatchRun:
    def __init__(self, scripts, out, args, run_id, options: BatchOptions, pipeline_factory,
                 on_event, listing: Iterator):
        self.scripts = scripts
        self.out = out.rstrip("/") if isinstance(out, str) else out
        self.args = args
        self.run_id = run_id
        self.options = options
        self.pipeline_factory = pipeline_factory
        self.on_event = on_event
        self.tables = run_tables.RunTables(self.out, run_id)
        self.config_hash: str | None = None
        self.config: dict | None = None
        self.seen_ids: dict[str, int] = {}
        self.retry_queue: collections.deque[_StoryTask] = collections.deque()
        self.listing = listing
        self.ray_address: str | None = None
        self.listing_done = False
        self.listed = 0
        self.refs: dict[Any, tuple[str, _Slot]] = {}
        self.slots: list[_Slot] = []
        self.replacements = 0
        self.restarts = 0
        self.retries = 0
        self.shots_rendered = 0
        self.shot_events: collections.Counter = collections.Counter()
        self.story_wall_s = 0.0
        self.log_dir = ""
        self.bar = None
        self.first_ready: float | None = None
        self.loop_end = 0.0

    # -- the whole run -----------------------------------------------------------------
    def run(self) -> dict:
        import ray

        self.started = time.time()
        self._check_resources()
        self.log_dir = tempfile.mkdtemp(prefix=f"storymem-batch-{self.run_id}-")
        prefix = f"storymem-{self.run_id}"
        # Scorer models and worker pipelines load at the same time; each worker waits for
        # the scorers only after its own model is loaded (a scorer that cannot load makes
        # the workers fail to start, with its error).
        self.pools = start_scorer_pools(self.args, self.options.scorers, self.options.hps,
                                        name_prefix=prefix, wait=False,
                                        clients=self.options.workers)
        from actors.progress_reporter import ProgressReporter
        self.progress = ray.remote(num_cpus=0)(ProgressReporter).options(
            name=f"{prefix}-progress").remote()
        self._open_bar()
        try:
            for index in range(self.options.workers):
                slot = _Slot(index)
                self.slots.append(slot)
                self._start_worker(slot)
            self._loop()
            self.loop_end = time.time()
            self._drain_progress()
            return self._finish()
        finally:
            self._close_bar()
            for slot in self.slots:
                if slot.handle is not None:
                    ray.kill(slot.handle, no_restart=True)
            self.pools.kill()
            ray.kill(self.progress, no_restart=True)
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _check_resources(self) -> None:
        import ray

        opts = self.options
        sc = opts.scorers
        need_cpu = opts.workers * opts.cpus_per_worker + (
            sc.clip_actors + sc.gate_actors) * sc.cpus_per_actor
        need_gpu = opts.workers * opts.gpus_per_worker + (
            sc.clip_actors + sc.gate_actors) * sc.gpus_per_actor
        have = ray.cluster_resources()
        short = []
        if need_cpu > have.get("CPU", 0) + 1e-9:
            short.append(f"{need_cpu:g} CPUs (cluster has {have.get('CPU', 0):g})")
        if need_gpu > have.get("GPU", 0) + 1e-9:
            short.append(f"{need_gpu:g} GPUs (cluster has {have.get('GPU', 0):g})")
        if short:
            message = (f"the batch needs {' and '.join(short)}: lower --workers, "
                       f"--cpus-per-worker or --gpus-per-worker")
            if self.ray_address:  # a cluster may scale up: wait for it
                log.warning("%s; waiting for the cluster to provide them", message)
            else:
                raise BatchError(message)

    # -- workers -------------------------------------------------------------------------
    def _start_worker(self, slot: _Slot) -> None:
        import ray

        from actors.story_worker import StoryWorker

        slot.generation += 1 if slot.handle is not None else 0
        slot.name = f"storymem-{self.run_id}-worker-{slot.index}" + (
            f".{slot.generation}" if slot.generation else "")
        remote = ray.remote(StoryWorker).options(
            name=slot.name, num_cpus=self.options.cpus_per_worker,
            num_gpus=self.options.gpus_per_worker,
            max_restarts=self.options.worker_max_restarts, max_task_retries=0)
        slot.handle = remote.remote(slot.name, self.args,
                                    {"clip": self.pools.clip, "gate": self.pools.gate,
                                     "client_index": slot.index},
                                    self.progress,
                                    self.pipeline_factory, self.options.torch_threads,
                                    self.options.consistency)
        slot.state = "starting"
        self.refs[slot.handle.ping.remote()] = ("ping", slot)

    def _loop(self) -> None:
        import ray

        while True:
            for slot in self.slots:
                if slot.state == "idle":
                    task = self._next_task()
                    if task is None:
                        break
                    self._submit(slot, task)
            busy = any(s.state == "busy" for s in self.slots)
            if not busy and not self.retry_queue and self.listing_done:
                return
            if not any(s.state in ("starting", "idle", "busy", "recovering")
                       for s in self.slots):
                raise BatchError("every story worker is gone (see the errors above)")
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=POLL_S)
            self._drain_progress()
            for ref in ready:
                kind, slot = self.refs.pop(ref)
                if kind == "ping":
                    self._on_ping(ref, slot)
                else:
                    self._on_story(ref, slot)
            self._check_timeouts()

    def _submit(self, slot: _Slot, task: _StoryTask) -> None:
        task.attempts += 1
        task.started = time.monotonic()
        if task.attempts > 1:
            self.retries += 1
        slot.state, slot.task = "busy", task
        ref = slot.handle.render_story.remote(task.script, self.out, task.attempts)
        self.refs[ref] = ("story", slot)
        self._emit({"kind": "story_submitted", "story_id": task.script.story_id,
                    "worker": slot.name, "attempt": task.attempts})

    def _on_ping(self, ref, slot: _Slot) -> None:
        import ray

        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                self._worker_lost(slot, f"story worker {slot.name} could not load the model: "
                                  f"{_short(exc)}", init_failed=True)
            else:
                self._worker_lost(slot, f"story worker {slot.name} died while starting: "
                                  f"{_short(exc)}")
            return
        if self.config_hash is None:
            self.config_hash, self.config = info["config_hash"], info["config"]
            self.first_ready = time.time()
            log.info("batch %s: config %s, %d worker(s)", self.run_id, self.config_hash,
                     self.options.workers)
        elif info["config_hash"] != self.config_hash:
            raise BatchError(f"worker {slot.name} renders with config {info['config_hash']}, "
                             f"the others with {self.config_hash}: the workers must agree")
        slot.pid = info["pid"]
        slot.state = "idle"
        self._emit({"kind": "worker_ready", "worker": slot.name, "pid": info["pid"],
                    "load_s": info["load_s"]})

    def _on_story(self, ref, slot: _Slot) -> None:
        import ray

        task = slot.task
        slot.task = None
        try:
            row = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            # The worker died under the story: Ray restarts it (or we replace it); the
            # story resumes from its last committed shot on the next attempt.
            self.restarts += 1
            if slot.timed_out:
                slot.timed_out = False
                self._story_failed(task, "StoryTimeout", (
                    f"no result after {self.options.story_timeout_s:g} s (--story-timeout) on "
                    f"worker {slot.name}; the worker was killed"))
            else:
                self._story_failed(task, "WorkerDied", f"worker {slot.name} died: {_short(exc)}")
            self._emit({"kind": "worker_died", "worker": slot.name,
                        "story_id": task.script.story_id, "attempt": task.attempts})
            slot.state = "recovering"
            self.refs[slot.handle.ping.remote()] = ("ping", slot)
            return
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self._story_failed(task, type(cause).__name__, str(cause))
            slot.state = "idle"
            return
        slot.state = "idle"
        # "skipped" on a retry means an earlier attempt of this run committed the story.
        status = "skipped" if row["status"] == "skipped" and task.attempts == 1 else "rendered"
        # Shots of attempts that died are known from their progress events.
        shots = max(int(row["shots_rendered"]), self.shot_events[row["story_id"]])
        self.shots_rendered += shots
        self.story_wall_s += float(row["wall_s"])
        self.tables.add_story(
            position=task.position, source=task.source, story_id=row["story_id"],
            story_name=task.script.story_name, status=status, num_shots=row["num_shots"],
            shots_rendered=shots, attempts=task.attempts,
            config_hash=row["config_hash"], story_uri=row["story_uri"],
            video_uri=row["video_uri"], worker=row["worker"], wall_s=row["wall_s"],
            consistency_all_pairs=row.get("consistency_all_pairs"),
            consistency_top10=row.get("consistency_top10"))
        self._emit({"kind": "story_done", "story_id": row["story_id"], "status": status,
                    "worker": row["worker"], "attempt": task.attempts,
                    "shots_rendered": row["shots_rendered"]})

    def _story_failed(self, task: _StoryTask, error_type: str, message: str) -> None:
        task.last_error = (error_type, message)
        story_id = task.script.story_id
        if task.attempts < self.options.max_attempts:
            log.warning("story %s: attempt %d failed (%s: %s); retrying", story_id,
                        task.attempts, error_type, message.splitlines()[0] if message else "")
            self.retry_queue.appendleft(task)
            self._emit({"kind": "story_retry", "story_id": story_id, "attempt": task.attempts,
                        "error_type": error_type, "message": message})
            return
        log.error("story %s failed after %d attempts: %s: %s", story_id, task.attempts,
                  error_type, message)
        self.tables.add_story(
            position=task.position, source=task.source, story_id=story_id,
            story_name=task.script.story_name, status="failed",
            num_shots=len(task.script.shots), shots_rendered=self.shot_events[story_id],
            attempts=task.attempts,
            config_hash=self.config_hash, error=f"{error_type}: {message}",
            story_uri=storage.join(self.out, story_id, self.config_hash))
        self.shots_rendered += self.shot_events[story_id]
        self.tables.add_error(position=task.position, stage="render", source=task.source,
                              story_id=story_id, error_type=error_type, message=message,
                              attempts=task.attempts)
        self._emit({"kind": "story_failed", "story_id": story_id, "attempts": task.attempts,
                    "error_type": error_type, "message": message})

    def _worker_lost(self, slot: _Slot, reason: str, init_failed: bool = False) -> None:
        limit = self.options.max_worker_replacements
        limit = 2 * self.options.workers if limit is None else limit
        log.error("%s", reason)
        self._emit({"kind": "worker_lost", "worker": slot.name, "reason": reason})
        if init_failed and self.config_hash is None and not any(
                s.state in ("idle", "busy") for s in self.slots if s is not slot):
            # No worker has ever started: the model itself cannot load. Stop now.
            raise BatchError(reason)
        if self.replacements >= limit:
            slot.state = "gone"
            slot.handle = None
            # the scorer actors stop waiting for this worker's requests
            self.pools.set_clients(s.index for s in self.slots if s.state != "gone")
            return
        self.replacements += 1
        try:  # make sure the old one is gone for good before its replacement starts
            import ray

            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        self._start_worker(slot)

    def _check_timeouts(self) -> None:
        import ray

        timeout = self.options.story_timeout_s
        if timeout is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "busy" and slot.task and now - slot.task.started > timeout:
                log.error("story %s: no result after %.0f s on %s; killing the worker",
                          slot.task.script.story_id, timeout, slot.name)
                slot.task.started = float("inf")  # kill once; the death retries the story
                slot.timed_out = True
                ray.kill(slot.handle, no_restart=False)

    # -- listing -------------------------------------------------------------------------
    def _next_task(self) -> _StoryTask | None:
        """The next story to render: a retry first, else the next listed script that is
        valid, not a duplicate and not committed yet (those are recorded on the way)."""
        if self.retry_queue:
            return self.retry_queue.popleft()
        while not self.listing_done:
            try:
                item = next(self.listing)
            except StopIteration:
                self.listing_done = True
                self._set_total()
                return None
            self.listed += 1
            self._set_total()
            if isinstance(item, ListingProblem):
                self._listing_error(item.position, item.origin, "ManifestRowError", item.message)
                continue
            try:
                script = read_script(item)
            except Exception as exc:  # ScriptError and anything storage raises
                message = str(exc)
                self._listing_error(item.position, item.origin, type(exc).__name__, message)
                continue
            first = self.seen_ids.get(script.story_id)
            if first is not None:
                self._listing_error(
                    item.position, item.origin, "DuplicateStory",
                    f"{item.origin}: same story id {script.story_id} as the script at "
                    f"position {first} (identical content); rendered once", script.story_id)
                continue
            self.seen_ids[script.story_id] = item.position
            from storymem_model.output_layout import story_uri

            uri = story_uri(self.out, script.story_id, self.config_hash)
            if storage.is_committed(uri):
                self._record_skipped(item, script, uri)
                continue
            return _StoryTask(item.position, item.origin, script)
        return None

    def _listing_error(self, position, source, error_type, message, story_id=None) -> None:
        log.error("%s", message)
        self.tables.add_error(position=position, stage="listing", source=source,
                              story_id=story_id, error_type=error_type, message=message,
                              attempts=0)
        self._emit({"kind": "script_invalid", "source": source, "error_type": error_type,
                    "message": message})

    def _record_skipped(self, item, script, uri: str) -> None:
        from storymem_model.output_layout import story_video_key

        self.tables.add_story(
            position=item.position, source=item.origin, story_id=script.story_id,
            story_name=script.story_name, status="skipped", num_shots=len(script.shots),
            shots_rendered=0, attempts=0, config_hash=self.config_hash, story_uri=uri,
            video_uri=storage.join(uri, story_video_key(script.story_id)))
        if self.options.consistency:
            log.info("story %s is already committed: no consistency computed", script.story_id)
        self._emit({"kind": "story_skipped", "story_id": script.story_id})

    # -- progress ------------------------------------------------------------------------
    def _drain_progress(self) -> None:
        import ray

        try:
            events = ray.get(self.progress.drain.remote(), timeout=30)
        except Exception as exc:  # progress is best effort, never fatal
            log.warning("progress events unavailable: %s", exc)
            return
        for event in events:
            self._emit(event)

    def _emit(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "shot_done":
            self.shot_events[event.get("story_id")] += 1
        if kind == "log":
            self._worker_log(event)
        else:
            self._worker_log({"worker": event.get("worker") or "driver", "level": "INFO",
                              "message": _describe(event), "time": event.get("time")})
        self._update_bar(event)
        if self.on_event is not None:
            self.on_event(event)

    def _worker_log(self, event: dict) -> None:
        worker = event.get("worker") or "driver"
        stamp = _dt.datetime.fromtimestamp(event.get("time") or time.time()).strftime(
            "%Y-%m-%d %H:%M:%S")
        path = os.path.join(self.log_dir, f"{worker}.log")
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {event.get('level', 'INFO')} {event.get('message', '')}\n")

    def _open_bar(self) -> None:
        from tqdm.auto import tqdm

        use_bar = self.options.progress is True or (
            self.options.progress is None and sys.stderr.isatty())
        self.bar = tqdm(total=None, unit="story", desc=f"batch {self.run_id}",
                        disable=not use_bar, dynamic_ncols=True)
        self.done_count = collections.Counter()

    def _set_total(self) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.total = self.listed if self.listing_done else None
            self.bar.refresh()

    def _update_bar(self, event: dict) -> None:
        kind = event.get("kind")
        finished = {"story_done": event.get("status"), "story_skipped": "skipped",
                    "story_failed": "failed", "script_invalid": "invalid"}.get(kind)
        if finished is None and kind != "shot_done":
            return
        if finished is not None:
            self.done_count[finished] += 1
        if kind == "shot_done":
            self.done_count["shots"] += 1
        elapsed_h = max(time.time() - self.started, 1e-6) / 3600
        stats = {"shots": self.done_count["shots"],
                 "failed": self.done_count["failed"] + self.done_count["invalid"],
                 "shots/h": f"{self.done_count['shots'] / elapsed_h:.0f}"}
        if self.bar is not None and not self.bar.disable:
            if finished is not None:
                self.bar.update(1)
            self.bar.set_postfix(stats, refresh=False)
        elif finished is not None:
            done = sum(v for k, v in self.done_count.items() if k != "shots")
            log.info("batch %s: %d stories done (%d rendered, %d skipped, %d failed), "
                     "%d shots", self.run_id, done, self.done_count["rendered"],
                     self.done_count["skipped"], stats["failed"], stats["shots"])

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # -- the run folder ------------------------------------------------------------------
    def _finish(self) -> dict:
        wall_s = time.time() - self.started
        try:  # names and threshold of the pools (the workers already waited for them)
            self.pools.wait_ready()
        except ScorerPoolError as exc:
            log.warning("scorer pool info unavailable: %s", exc)
        scorer_stats = self.pools.stats()
        stories_uri = self.tables.write_stories()
        shots_uri, shot_rows = self.tables.write_shots()
        errors_uri = self.tables.write_errors()
        log_uris = []
        for name in sorted(os.listdir(self.log_dir)):
            uri = storage.join(self.tables.uri, "logs", name)
            with open(os.path.join(self.log_dir, name), "rb") as handle:
                storage.write_bytes(uri, handle.read())
            log_uris.append(uri)
        counts = self.tables.counts()
        failed = counts["failed"] + counts["invalid"]
        requests = sum(m["requests"] for pool in scorer_stats.values()
                       for m in pool.get("methods", {}).values())
        batches = sum(m["batches"] for pool in scorer_stats.values()
                      for m in pool.get("methods", {}).values())
        hours = wall_s / 3600
        summary = {
            "run_id": self.run_id,
            "status": "completed_with_failures" if failed else "completed",
            "scripts": self.scripts,
            "out": self.out,
            "run_uri": self.tables.uri,
            "config_hash": self.config_hash,
            "config": self.config,
            "started_at": _iso(self.started),
            "finished_at": _iso(time.time()),
            "wall_s": wall_s,
            "startup_s": (self.first_ready or time.time()) - self.started,
            "render_wall_s": self.loop_end - (self.first_ready or self.loop_end),
            "listed": self.listed,
            "rendered": counts["rendered"],
            "skipped": counts["skipped"],
            "failed": failed,
            "failed_render": counts["failed"],
            "invalid": counts["invalid"],
            "shots_rendered": self.shots_rendered,
            "shots_in_run_tables": shot_rows,
            "shots_per_hour": self.shots_rendered / hours if hours > 0 else 0.0,
            "workers": self.options.workers,
            "gpus_per_worker": self.options.gpus_per_worker,
            "gpu_hours": self.options.workers * self.options.gpus_per_worker * hours,
            "busy_gpu_hours": self.options.gpus_per_worker * self.story_wall_s / 3600,
            "worker_deaths": self.restarts,
            "worker_replacements": self.replacements,
            "story_retries": self.retries,
            "scorers": scorer_stats,
            "scorer_calls_per_shot": requests / self.shots_rendered if self.shots_rendered else 0.0,
            "scorer_mean_batch_requests": requests / batches if batches else 0.0,
            "tables": {"stories": stories_uri, "shots": shots_uri, "errors": errors_uri,
                       "logs": log_uris},
        }
        summary["summary_uri"] = self.tables.write_summary(summary)
        log.info("batch %s: %d rendered, %d skipped, %d failed in %.1f s; run tables at %s",
                 self.run_id, summary["rendered"], summary["skipped"], failed, wall_s,
                 self.tables.uri)
        return summary


# ---------------------------------------------------------------------------------------
def _fail_fast(items: Iterator) -> Iterator:
    """Start the listing now, so an unusable source raises before any actor starts."""
    iterator = iter(items)
    try:
        first = next(iterator)
    except StopIteration:
        return iter(())
    return itertools.chain([first], iterator)


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)\w*): .+")


def _short(exc: BaseException) -> str:
    """One line about an actor error: the underlying exception's own line when the
    message carries a traceback (e.g. why an actor constructor failed), else the first."""
    lines = str(exc).strip().splitlines()
    causes = [line.strip() for line in lines if _ERROR_LINE.match(line)]
    causes = [c for c in causes if not c.startswith(("ray.exceptions.", "RayActorError",
                                                      "ActorDiedError"))]
    if causes:
        return causes[-1]
    return lines[0] if lines else type(exc).__name__


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def _describe(event: dict) -> str:
    details = " ".join(f"{k}={v}" for k, v in event.items()
                       if k not in ("kind", "worker", "time", "pid"))
    return f"{event.get('kind')}: {details}"
