"""Runs story jobs inside a generation replica with the story runner `storymem render` uses.

`prepare_job` validates the script (every problem reported at once, 422) and records the
job; `run_job` renders it in a worker thread with `StoryRunner.render` - same RenderConfig,
same layout, same bytes as `storymem render` with the same flags, script and seed - while a
heartbeat keeps the record fresh. A job whose replica died (stale heartbeat) is adopted by
another or a restarted replica, and the runner resumes it from its last committed shot.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pipelines.serve.errors import ServeRequestError
from pipelines.serve.jobs import JobOutputs, JobRegistry, JobShot, JobStatus, StoryJob
from pipelines.serve.limits import ServeLimits
from pipelines.serve.schemas import StoryRequest
from pipelines.serve.session_state import story_config
from storymem_model import storage
from storymem_model.records import ShotDone
from storymem_model.render_config import RenderConfig
from storymem_model.story_script import ScriptError, StoryScript, load_script

log = logging.getLogger("storymem.serve.jobs")


def validate_script(script, name: str | None, limits: ServeLimits) -> StoryScript:
    """The request's script, validated (422 `invalid_script` listing every problem) and
    within the limits."""
    try:
        story = load_script(script, name=name or "request")
    except ScriptError as exc:
        raise ServeRequestError(422, "invalid_script", str(exc), problems=exc.problems) from None
    limits.check("max_story_shots", len(story.shots), "shots in the script")
    for spec in story.shots:
        limits.check_prompt(spec.prompt, f"prompt of scene {spec.scene} shot {spec.shot} length")
    return story


def job_config(base_config: RenderConfig, job: StoryJob) -> RenderConfig:
    """The RenderConfig a recorded job renders with."""
    return story_config(base_config, job.seed, job.transition)


def prepare_job(registry: JobRegistry, limits: ServeLimits, base_config: RenderConfig,
                scope: str, body: StoryRequest) -> tuple[StoryJob, StoryScript]:
    """Validate and record a story job (status queued). Runs in a thread."""
    script = validate_script(body.script, body.name, limits)
    try:
        config = story_config(base_config, body.seed, body.transition)
    except ValueError as exc:  # ConfigError naming the setting
        raise ServeRequestError(422, "invalid_story_settings", str(exc)) from None
    job = registry.create(scope, script.to_dict(), story_id=script.story_id,
                          config_hash=config.config_hash(), shots_total=len(script.shots),
                          seed=config.seed, transition=config.transition)
    return job, script


def run_job(registry: JobRegistry, job: StoryJob, script: StoryScript, make_runner,
            worker_id: str, heartbeat_s: float,
            on_shot: Callable[[ShotDone], None] | None = None) -> StoryJob:
    """Render a job to completion (or failure), keeping its record current. Blocking.
    `on_shot(event)` is called after each rendered shot (metrics)."""
    lock = threading.Lock()
    stop = threading.Event()

    def save(**changes):
        with lock:
            for key, value in changes.items():
                setattr(job, key, value)
            job.heartbeat_at = time.time()
            registry.save(job)

    def beat():
        while not stop.wait(heartbeat_s):
            try:
                save()
            except Exception:  # a missed heartbeat is not fatal; the next one retries
                log.warning("job %s: heartbeat write failed", job.job_id)

    save(status=JobStatus.RUNNING, worker=worker_id, attempts=job.attempts + 1, error=None)
    heart = threading.Thread(target=beat, name=f"heartbeat-{job.job_id}", daemon=True)
    heart.start()
    try:
        runner = make_runner(job)
        if runner.config_hash != job.config_hash:
            raise ServeRequestError(409, "job_incompatible",
                                    f"this server renders with config {runner.config_hash}, "
                                    f"the job was recorded for {job.config_hash}")

        def progress(event: ShotDone) -> None:
            save(shots_done=event.shot_index + 1)
            if on_shot is not None:
                on_shot(event)

        result = runner.render(script, registry.out_uri(job), progress=progress)
        shots = tuple(JobShot(scene=r.scene, shot=r.shot, mode=r.mode, video_uri=r.video_uri,
                              video_sha256=r.video_sha256) for r in result.rows)
        save(status=JobStatus.SUCCEEDED, shots_done=result.shots_total, outputs=JobOutputs(
            story_uri=result.story_uri, video_uri=result.video_uri,
            shots_parquet_uri=result.parquet_uri,
            commit_marker_uri=storage.join(result.story_uri, storage.COMMIT_MARKER),
            shots=shots))
    except Exception as exc:
        log.exception("job %s failed", job.job_id)
        message = exc.detail if isinstance(exc, ServeRequestError) else f"{type(exc).__name__}: {exc}"
        save(status=JobStatus.FAILED, error=message)
    finally:
        stop.set()
    return job
