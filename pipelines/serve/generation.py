"""The generation deployment: the model, loaded once per replica, for shots, sessions, jobs.

Each replica builds its pipeline from the settings' `RenderSpec` (`build_pipeline(spec.model)`)
and uses the shared scorer deployments through protocol proxies named by the config's
scorer ids; `open_runner` checks that the loaded model is the one the config was resolved
for. All model work runs in worker threads (`asyncio.to_thread`), so the replica's event
loop keeps answering Serve's health checks and new requests; model calls themselves take
turns (`SerializedPipeline`).

Requests fail with a typed `ServeRequestError` (it pickles whole; the ingress unwraps
Ray's wrapper) and succeed with typed results (`ShotResponse`, `SessionRecord`,
`SessionShotResult`, `StoryJob`).

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

from pipelines.serve.errors import ServeRequestError
from pipelines.serve.job_runner import job_config, prepare_job, run_job, validate_script
from pipelines.serve.jobs import JobRegistry, JobStatus, StoryJob
from pipelines.serve.metrics import ShotKind, ShotMetrics
from pipelines.serve.pipeline_lock import SerializedPipeline
from pipelines.serve.schemas import (SessionCreate, SessionShotRequest, ShotRequest,
                                     ShotResponse, StoryRequest)
from pipelines.serve.scorers import serve_keyframe_scorers
from pipelines.serve.session_state import (SessionShotResult, create_session, is_current,
                                           open_session, render_next_shot)
from pipelines.serve.sessions import SessionRecord, SessionStore
from pipelines.serve.settings import ServeSettings
from pipelines.serve.single_shot import render_single_shot

log = logging.getLogger("storymem.serve")

MAX_SESSIONS_PER_REPLICA = 32


@serve.deployment(name="shot_generator", ray_actor_options={"num_cpus": 1},
                  max_ongoing_requests=16, health_check_period_s=10,
                  graceful_shutdown_timeout_s=30)
class ShotGenerator:
    def __init__(self, settings: ServeSettings, embedder_handle=None, gate_handle=None):
        from storymem_model.model_loading import build_pipeline
        from storymem_model.runner import open_runner

        if settings.torch_threads:
            import torch

            torch.set_num_threads(int(settings.torch_threads))
        started = time.perf_counter()
        self.settings = settings
        self.limits = settings.limits
        self.config = settings.render.config
        self.worker_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pipeline = SerializedPipeline(build_pipeline(settings.render.model))
        self.pipelines_loaded = 1
        self.scorers = serve_keyframe_scorers(self.config, embedder_handle, gate_handle)
        # Checks the loaded model's ids against the config the spec was resolved with.
        open_runner(settings.render, pipeline=self.pipeline, scorers=self.scorers)
        self.sessions = SessionStore(settings.storage_root)
        self.jobs = JobRegistry(settings.storage_root)
        self.load_seconds = time.perf_counter() - started
        self.requests_served = 0
        self._running_jobs: dict[str, asyncio.Task] = {}
        self._adopter: asyncio.Task | None = None
        self.metrics = ShotMetrics()
        log.info("generator %s: model %s loaded in %.1f s (config %s)", self.worker_id,
                 self.config.model_id, self.load_seconds, self.config.config_hash())

    async def check_health(self) -> None:
        """Serve's replica health check; also starts adopting orphaned story jobs."""
        if self._adopter is None or self._adopter.done():
            self._adopter = asyncio.get_running_loop().create_task(self._adopt_orphans())

    async def stats(self) -> dict:
        return {"worker_id": self.worker_id, "pid": os.getpid(),
                "pipelines_loaded": self.pipelines_loaded,
                "model_calls": self.pipeline.calls, "requests_served": self.requests_served,
                "running_jobs": sorted(self._running_jobs), "load_seconds": self.load_seconds,
                "config_hash": self.config.config_hash()}

    # -- single shots ----------------------------------------------------------------------
    async def generate_shot(self, scope: str, request: ShotRequest, memory, first_frame,
                            motion_frames) -> ShotResponse:
        self.requests_served += 1
        started = time.perf_counter()
        response = await asyncio.to_thread(
            render_single_shot, self.pipeline, self.scorers, self.config,
            self.settings.storage_root, scope, request, memory, first_frame, motion_frames)
        self.metrics.shot(ShotKind.SINGLE, time.perf_counter() - started)
        return response

    # -- sessions --------------------------------------------------------------------------
    async def create_session(self, scope: str, body: SessionCreate, references
                             ) -> SessionRecord:
        self.requests_served += 1
        return await asyncio.to_thread(create_session, self.sessions, self.pipeline,
                                       self.scorers, self.config, scope, body, references)

    @serve.multiplexed(max_num_models_per_replica=MAX_SESSIONS_PER_REPLICA)
    async def _live_session(self, model_id: str):
        scope, _, session_id = model_id.partition("/")
        return await asyncio.to_thread(open_session, self.sessions, self.pipeline,
                                       self.scorers, scope, session_id)

    async def session_shot(self, scope: str, session_id: str, body: SessionShotRequest
                           ) -> SessionShotResult:
        self.requests_served += 1
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
        self.metrics.shot(ShotKind.SESSION, result.shot.shot_seconds)
        return result

    # -- story jobs ------------------------------------------------------------------------
    async def submit_story(self, scope: str, body: StoryRequest) -> StoryJob:
        self.requests_served += 1
        job, script = await asyncio.to_thread(
            prepare_job, self.jobs, self.limits, self.config, scope, body)
        self._start_job(job, script)
        return job

    def _start_job(self, job: StoryJob, script) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(asyncio.to_thread(
            run_job, self.jobs, job, script, self._runner_for, self.worker_id,
            self.settings.job_stale_after_s / 4,
            on_shot=lambda event: self.metrics.shot(ShotKind.STORY, event.seconds)))
        self._running_jobs[job.job_id] = task
        task.add_done_callback(lambda _t, job_id=job.job_id: self._running_jobs.pop(job_id, None))

    def _runner_for(self, job: StoryJob):
        from storymem_model.runner import StoryRunner

        return StoryRunner(self.pipeline, self.scorers, job_config(self.config, job),
                           references=[])

    async def _adopt_orphans(self) -> None:
        """Take over jobs whose replica stopped reporting (it died); resume them."""
        try:
            orphans = await asyncio.to_thread(
                lambda: list(self.jobs.orphaned(stale_after_s=self.settings.job_stale_after_s)))
            for job in orphans:
                if job.job_id in self._running_jobs:
                    continue
                script_body = await asyncio.to_thread(self.jobs.script, job)
                script = validate_script(script_body, None, self.limits)
                if script.story_id != job.story_id:
                    job.status, job.error = JobStatus.FAILED, (
                        f"stored script no longer yields story id {job.story_id}")
                    await asyncio.to_thread(self.jobs.save, job)
                    continue
                log.info("adopting story job %s (last worker %s)", job.job_id, job.worker)
                self._start_job(job, script)
        except Exception:
            log.exception("adopting orphaned story jobs failed; will retry")
