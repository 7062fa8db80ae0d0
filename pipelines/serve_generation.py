"""The generation deployment: the model, loaded once per replica, for shots, sessions, jobs.

Each replica loads the pipeline once (`ModelFactory.build_pipeline`) and uses the shared
scorer deployments through protocol proxies. All model work runs in worker threads
(`asyncio.to_thread`), so the replica's event loop keeps answering Serve's health checks and
new requests; model calls themselves take turns (`SerializedPipeline`).

Sessions are routed with Serve's model multiplexing (`multiplexed_model_id =
"{scope}/{session_id}"`): a session's requests go to the replica that already holds its
state; any other replica reopens it from storage (and checks it is current before each shot).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from ray import serve
from ray.serve import metrics

from pipelines.serve_errors import ServeRequestError
from pipelines.serve_job_runner import prepare_job, run_job, validate_script
from pipelines.serve_jobs import JobRegistry
from pipelines.serve_limits import LimitExceeded
from pipelines.serve_pipeline_lock import SerializedPipeline
from pipelines.serve_scorers import ServeImageEmbedder, ServeImageScorer
from pipelines.serve_session_state import (
    create_session, is_current, open_session, render_next_shot)
from pipelines.serve_sessions import SessionStore
from pipelines.serve_single_shot import render_single_shot

log = logging.getLogger("storymem.serve")

MAX_SESSIONS_PER_REPLICA = 32


def _error_payload(exc: Exception) -> dict:
    if isinstance(exc, ServeRequestError):
        return exc.as_payload()
    if isinstance(exc, LimitExceeded):
        body = exc.body()
        return {"__serve_error__": {"status_code": exc.status_code, **body}}
    raise exc


@serve.deployment(name="shot_generator", ray_actor_options={"num_cpus": 1},
                  max_ongoing_requests=16, health_check_period_s=10,
                  graceful_shutdown_timeout_s=30)
class ShotGenerator:
    def __init__(self, settings, factory, embedder_handle, gate_handle):
        if settings.torch_threads:
            import torch

            torch.set_num_threads(int(settings.torch_threads))
        started = time.perf_counter()
        self.settings = settings
        self.limits = settings.limits
        self.factory = factory
        self.worker_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pipeline = SerializedPipeline(factory.build_pipeline())
        self.pipelines_loaded = 1
        self._embedder_handle = embedder_handle
        self._gate_handle = gate_handle
        self._ready_lock = asyncio.Lock()
        self.scorers = None
        self.base_config = None
        self.sessions = SessionStore(settings.storage_root)
        self.jobs = JobRegistry(settings.storage_root)
        self.load_seconds = time.perf_counter() - started
        self.requests_served = 0
        self._running_jobs: dict[str, asyncio.Task] = {}
        self._adopter: asyncio.Task | None = None
        # Exported with Serve's own metrics (Prometheus, through Ray's metrics agent).
        self._shots_metric = metrics.Counter(
            "storymem_shots_rendered", description="shots rendered, by kind",
            tag_keys=("kind",))
        self._shot_seconds = metrics.Histogram(
            "storymem_shot_seconds", description="wall time of one shot (generate, select, "
            "write), by kind", boundaries=[0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
            tag_keys=("kind",))
        log.info("generator %s: model loaded in %.1f s", self.worker_id, self.load_seconds)

    async def _ready(self) -> None:
        """Finish setting up on the event loop (handle calls must be awaited there): scorer
        proxies and the base RenderConfig, which needs the scorers' names and threshold."""
        if self.base_config is not None:
            return
        async with self._ready_lock:
            if self.base_config is not None:
                return
            from storymem_model.scorers.base import KeyframeScorers

            embedder_name = await self._embedder_handle.name.remote()
            gate = await self._gate_handle.describe.remote()
            scorers = KeyframeScorers(
                embedder=ServeImageEmbedder(self._embedder_handle, embedder_name),
                gate=ServeImageScorer(self._gate_handle, gate["name"]),
                gate_threshold=gate["threshold"])
            config = await asyncio.to_thread(self.factory.base_config, self.pipeline, scorers, [])
            self.scorers = scorers
            self.base_config = config
            log.info("generator %s ready (model %s, config %s)", self.worker_id,
                     config.model_id, config.config_hash())

    async def check_health(self) -> None:
        """Serve's replica health check; also starts adopting orphaned story jobs."""
        await self._ready()
        if self._adopter is None or self._adopter.done():
            self._adopter = asyncio.get_running_loop().create_task(self._adopt_orphans())

    async def stats(self) -> dict:
        await self._ready()
        return {"worker_id": self.worker_id, "pid": os.getpid(),
                "pipelines_loaded": self.pipelines_loaded,
                "model_calls": self.pipeline.calls, "requests_served": self.requests_served,
                "running_jobs": sorted(self._running_jobs), "load_seconds": self.load_seconds,
                "config_hash": self.base_config.config_hash()}

    # -- single shots ----------------------------------------------------------------------
    async def generate_shot(self, scope: str, request: dict, memory, first_frame, motion_frames):
        await self._ready()
        self.requests_served += 1
        try:
            started = time.perf_counter()
            result = await asyncio.to_thread(
                render_single_shot, self.pipeline, self.scorers, self.base_config,
                self.settings.storage_root, scope, request, memory, first_frame, motion_frames)
            self._count_shot("single", time.perf_counter() - started)
            return result
        except (ServeRequestError, LimitExceeded) as exc:
            return _error_payload(exc)

    def _count_shot(self, kind: str, seconds: float) -> None:
        self._shots_metric.inc(tags={"kind": kind})
        self._shot_seconds.observe(seconds, tags={"kind": kind})

    # -- sessions --------------------------------------------------------------------------
    async def create_session(self, scope: str, body: dict, references):
        await self._ready()
        self.requests_served += 1
        try:
            record, _live = await asyncio.to_thread(
                create_session, self.sessions, self.pipeline, self.scorers, self.base_config,
                scope, body, references)
            return record
        except (ServeRequestError, LimitExceeded) as exc:
            return _error_payload(exc)

    @serve.multiplexed(max_num_models_per_replica=MAX_SESSIONS_PER_REPLICA)
    async def _live_session(self, model_id: str):
        scope, _, session_id = model_id.partition("/")
        return await asyncio.to_thread(open_session, self.sessions, self.pipeline,
                                       self.scorers, scope, session_id)

    async def session_shot(self, scope: str, session_id: str, body: dict):
        await self._ready()
        self.requests_served += 1
        try:
            model_id = serve.get_multiplexed_model_id() or f"{scope}/{session_id}"
            if model_id != f"{scope}/{session_id}":
                raise ServeRequestError(400, "bad_routing", "session routing id mismatch")
            live = await self._live_session(model_id)
            async with live.lock:
                if live.broken or not await asyncio.to_thread(is_current, self.sessions, live):
                    fresh = await asyncio.to_thread(open_session, self.sessions, self.pipeline,
                                                    self.scorers, scope, session_id)
                    live.story, live.broken = fresh.story, False
                try:
                    result = await asyncio.to_thread(render_next_shot, self.sessions, live, body)
                except ServeRequestError:
                    raise  # refused before any state changed
                except Exception:
                    # The in-memory state may be half updated: reload from the checkpoint.
                    live.broken = True
                    raise
            self._count_shot("session", sum(result["timings_s"].values()))
            if body.get("return_video") in ("base64", "both"):
                import base64

                from storymem_model import storage

                data = await asyncio.to_thread(storage.read_bytes, result["shot"]["video_uri"])
                result["video_base64"] = base64.b64encode(data).decode("ascii")
            return result
        except (ServeRequestError, LimitExceeded) as exc:
            return _error_payload(exc)

    # -- story jobs ------------------------------------------------------------------------
    async def submit_story(self, scope: str, body: dict):
        await self._ready()
        self.requests_served += 1
        try:
            job, script = await asyncio.to_thread(
                prepare_job, self.jobs, self.limits, self.base_config, scope, body)
        except (ServeRequestError, LimitExceeded) as exc:
            return _error_payload(exc)
        self._start_job(job, script)
        return job.public()

    def _start_job(self, job, script) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(asyncio.to_thread(
            run_job, self.jobs, job, script, self._runner_for, self.worker_id,
            self.settings.job_stale_after_s / 4,
            on_shot=lambda seconds: self._count_shot("story", seconds)))
        self._running_jobs[job.job_id] = task
        task.add_done_callback(lambda _t, job_id=job.job_id: self._running_jobs.pop(job_id, None))

    def _runner_for(self, job):
        from pipelines.serve_job_runner import job_config
        from storymem_model.runner import StoryRunner

        config = job_config(self.base_config, job.seed, job.transition)
        return StoryRunner(self.pipeline, self.scorers, config, references=[])

    async def _adopt_orphans(self) -> None:
        """Take over jobs whose replica stopped reporting (it died); resume them."""
        try:
            orphans = await asyncio.to_thread(
                lambda: list(self.jobs.orphaned(stale_after_s=self.settings.job_stale_after_s)))
            for job in orphans:
                if job.job_id in self._running_jobs:
                    continue
                script_body = await asyncio.to_thread(self.jobs.script, job)
                script = validate_script({"script": script_body}, self.limits)
                if script.story_id != job.story_id:
                    job.status, job.error = "failed", (
                        f"stored script no longer yields story id {job.story_id}")
                    await asyncio.to_thread(self.jobs.save, job)
                    continue
                log.info("adopting story job %s (last worker %s)", job.job_id, job.worker)
                self._start_job(job, script)
        except Exception:
            log.exception("adopting orphaned story jobs failed; will retry")
