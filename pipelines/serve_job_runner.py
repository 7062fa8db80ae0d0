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

from pipelines.serve_errors import ServeRequestError
from pipelines.serve_jobs import JobRegistry, StoryJob
from pipelines.serve_limits import LimitExceeded, ServeLimits
from storymem_model import storage
from storymem_model.story_script import ScriptError, StoryScript, load_script

log = logging.getLogger("storymem.serve.jobs")


def validate_script(body: dict, limits: ServeLimits) -> StoryScript:
    try:
        script = load_script(body["script"], name=body.get("name") or "request")
    except ScriptError as exc:
        raise ServeRequestError(422, "invalid_script", str(exc), problems=exc.problems) from None
    limits.check("max_story_shots", len(script.shots), "shots in the script")
    for spec in script.shots:
        limits.check_prompt(spec.prompt, f"prompt of scene {spec.scene} shot {spec.shot} length")
    return script


def job_config(base_config, seed=None, transition=None):
    changes = {}
    if seed is not None:
        changes["seed"] = int(seed)
    if transition is not None:
        changes["transition"] = transition
    return base_config.replace(**changes) if changes else base_config


def prepare_job(registry: JobRegistry, limits: ServeLimits, base_config, scope: str,
                body: dict) -> tuple[StoryJob, StoryScript]:
    """Validate and record a story job (status queued). Runs in a thread."""
    try:
        script = validate_script(body, limits)
    except LimitExceeded as exc:
        raise ServeRequestError(exc.status_code, "limit_exceeded", exc.detail,
                                limit=exc.limit, maximum=exc.maximum, got=exc.got) from None
    try:
        config = job_config(base_config, body.get("seed"), body.get("transition"))
    except ValueError as exc:  # ConfigError naming the setting
        raise ServeRequestError(422, "invalid_story_settings", str(exc)) from None
    job = registry.create(scope, script.to_dict(), story_id=script.story_id,
                          config_hash=config.config_hash(), shots_total=len(script.shots),
                          seed=config.seed, transition=config.transition)
    return job, script


def run_job(registry: JobRegistry, job: StoryJob, script: StoryScript, make_runner,
            worker_id: str, heartbeat_s: float, on_shot=None) -> StoryJob:
    """Render a job to completion (or failure), keeping its record current. Blocking.
    `on_shot(seconds)` is called after each rendered shot (metrics)."""
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

    save(status="running", worker=worker_id, attempts=job.attempts + 1, error=None)
    heart = threading.Thread(target=beat, name=f"heartbeat-{job.job_id}", daemon=True)
    heart.start()
    try:
        runner = make_runner(job)
        if runner.config_hash != job.config_hash:
            raise ServeRequestError(409, "job_incompatible",
                                    f"this server renders with config {runner.config_hash}, "
                                    f"the job was recorded for {job.config_hash}")
        out = registry.out_uri(job)

        def progress(event: dict) -> None:
            save(shots_done=int(event["shot_index"]) + 1)
            if on_shot is not None:
                on_shot(float(event.get("seconds", 0.0)))

        result = runner.render(script, out, progress=progress)
        marker = storage.join(result.story_uri, storage.COMMIT_MARKER)
        shots = [{"scene": r["scene"], "shot": r["shot"], "mode": r["mode"],
                  "video_uri": r["video_uri"], "video_sha256": r["video_sha256"]}
                 for r in result.rows]
        save(status="succeeded", shots_done=result.shots_total,
             outputs={"story_uri": result.story_uri, "video_uri": result.video_uri,
                      "shots_parquet_uri": result.parquet_uri, "commit_marker_uri": marker,
                      "shots": shots})
    except Exception as exc:
        log.exception("job %s failed", job.job_id)
        message = exc.detail if isinstance(exc, ServeRequestError) else f"{type(exc).__name__}: {exc}"
        save(status="failed", error=message)
    finally:
        stop.set()
    return job
