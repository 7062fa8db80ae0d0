"""The generation deployment: the model, loaded once per replica, for shots, sessions, jobs.

Each replica builds its pipeline from the settings' `RenderSpec` (`build_pipeline(spec.model)`)
and uses the shared scorer deployments through protocol proxies named by the config's
scorer ids; `open_runner` checks that the loaded model is the one the config was resolved
for. Interactive work (single shots, session shots, session loading) runs in the event
loop's worker threads (`asyncio.to_thread`); story jobs run on the replica's own bounded
job executor (`job_executor`), so no number of jobs can take the threads shots need. Model
calls take turns per call (`SerializedPipeline`), so a shot waits at most for the model
call in progress. The replica's event loop keeps answering Serve's health checks.

Requests fail with a typed `ServeRequestError` (it pickles whole; the ingress unwraps
Ray's wrapper) and succeed with typed results (`ShotResponse`, `SessionRecord`,
`SessionShotResult`, `StoryJob`).

Sessions are routed with Serve's model multiplexing (`multiplexed_model_id =
"{scope}/{session_id}"`): a session's requests go to the replica that already holds its
state; any other replica reopens it from storage (and checks it is current before each shot).
One shot at a time per session across replicas: the session's shot lease (409 otherwise).

Maintenance runs on every replica's health checks (`check_health`, every 10 s): an
adoption round for story jobs whose claim lapsed (their replica died), and the retention
sweep when it is due (one replica at a time, under the cleanup lease).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from ray import serve

from pipelines.serve.errors import ServeRequestError, new_request_id
from pipelines.serve.job_executor import JobExecutor
from pipelines.serve.job_runner import StoryJobs, job_config
from pipelines.serve.jobs import JobRegistry, StoryJob
from pipelines.serve.metrics import ShotKind, ShotMetrics
from pipelines.serve.pipeline_lock import SerializedPipeline
from pipelines.serve.retention import RetentionSchedule
from pipelines.serve.schemas import (SessionCreate, SessionShotRequest, ShotRequest,
                                     ShotResponse, StoryRequest)
from pipelines.serve.scorers import serve_keyframe_scorers
from pipelines.serve.session_state import (PresetConfigs, SessionShotResult, create_session,
                                           exclusive_session_shot, open_session)
from pipelines.serve.sessions import SessionRecord, SessionStore
from pipelines.serve.settings import ServeSettings
from pipelines.serve.single_shot import render_single_shot, shot_folder
from pipelines.serve.usage import UsageIndex, folder_bytes

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
        self.preset_configs = PresetConfigs(settings.render)  # a request may name a preset
        self.worker_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pipeline = SerializedPipeline(build_pipeline(settings.render.model))
        self.pipelines_loaded = 1
        self.scorers = serve_keyframe_scorers(self.config, embedder_handle, gate_handle)
        # Checks the loaded model's ids against the config the spec was resolved with.
        open_runner(settings.render, pipeline=self.pipeline, scorers=self.scorers)
        self.sessions = SessionStore(settings.storage_root)
        self.jobs = JobRegistry(settings.storage_root)
        self.usage = UsageIndex(settings.storage_root, owner=self.worker_id)
        self.metrics = ShotMetrics()
        self.executor = JobExecutor(settings.job_workers, settings.limits.max_queued_jobs)
        self.story_jobs = StoryJobs(
            self.jobs, self.usage, self.executor, self.limits, self.preset_configs,
            self.worker_id,
            claim_ttl_s=settings.job_stale_after_s, max_attempts=settings.max_job_attempts,
            make_runner=self._runner_for,
            on_shot=lambda event: self.metrics.shot(ShotKind.STORY, event.seconds))
        self.retention = RetentionSchedule(settings.storage_root, settings.retention,
                                           self.usage, self.worker_id)
        self.load_seconds = time.perf_counter() - started
        self.requests_served = 0
        self._maintenance: asyncio.Task | None = None
        self.adopted: list[str] = []
        self.sweeps = 0
        log.info("generator %s: model %s loaded in %.1f s (config %s)", self.worker_id,
                 self.config.model_id, self.load_seconds, self.config.config_hash())

    async def check_health(self) -> None:
        """Serve's replica health check; also starts a maintenance round (adoption of
        orphaned story jobs, retention) unless one is running."""
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        try:
            self.adopted += await asyncio.to_thread(self.story_jobs.adopt)
        except Exception:
            log.exception("adopting orphaned story jobs failed; will retry")
        try:
            if await asyncio.to_thread(self.retention.run_if_due) is not None:
                self.sweeps += 1
        except Exception:
            log.exception("retention sweep failed; will retry")

    async def stats(self) -> dict:
        return {"worker_id": self.worker_id, "pid": os.getpid(),
                "pipelines_loaded": self.pipelines_loaded,
                "model_calls": self.pipeline.calls, "requests_served": self.requests_served,
                "jobs": self.executor.counts(), "job_ids": self.executor.job_ids(),
                "adopted": list(self.adopted), "sweeps": self.sweeps,
                "load_seconds": self.load_seconds, "config_hash": self.config.config_hash()}

    # -- single shots ----------------------------------------------------------------------
    async def generate_shot(self, scope: str, request: ShotRequest, memory, first_frame,
                            motion_frames) -> ShotResponse:
        self.requests_served += 1
        await asyncio.to_thread(self.usage.check_storage, scope, self.limits)
        started = time.perf_counter()
        response = await asyncio.to_thread(
            render_single_shot, self.pipeline, self.scorers,
            self.preset_configs.config(request.sampling_preset), self.settings.storage_root,
            scope, request, memory, first_frame, motion_frames)
        self.metrics.shot(ShotKind.SINGLE, time.perf_counter() - started)
        folder = shot_folder(self.settings.storage_root, scope, response.shot_id)
        await asyncio.to_thread(lambda: self.usage.add_bytes(scope, folder_bytes(folder)))
        return response

    # -- sessions --------------------------------------------------------------------------
    async def create_session(self, scope: str, body: SessionCreate, references
                             ) -> SessionRecord:
        self.requests_served += 1
        return await asyncio.to_thread(create_session, self.sessions, self.usage, self.limits,
                                       self.pipeline, self.scorers, self.preset_configs,
                                       scope, body, references)

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
        await asyncio.to_thread(self.usage.check_storage, scope, self.limits)
        live = await self._live_session(model_id)
        async with live.lock:  # shots of one session on this replica queue here
            result = await asyncio.to_thread(
                exclusive_session_shot, self.sessions, self.usage, self.limits,
                self.pipeline, self.scorers, live, body, self.worker_id,
                self.settings.job_stale_after_s)
        self.metrics.shot(ShotKind.SESSION, result.shot.shot_seconds)
        return result

    # -- story jobs ------------------------------------------------------------------------
    async def submit_story(self, scope: str, body: StoryRequest,
                           request_id: str | None = None) -> StoryJob:
        self.requests_served += 1
        return await asyncio.to_thread(self.story_jobs.submit, scope, body,
                                       request_id or new_request_id())

    def _runner_for(self, job: StoryJob):
        from storymem_model.runner import StoryRunner

        return StoryRunner(self.pipeline, self.scorers, job_config(self.preset_configs, job),
                           references=[])
