"""Story jobs inside a generation replica: submitted, claimed, queued, run, adopted.

`StoryJobs.submit` validates the script (every problem reported at once, 422), takes a
place on the replica's job executor (429 `job_queue_full` when it is full), claims the job
(a storage lease), admits it against the key's quotas in one step (429 `quota_exceeded`),
records it and queues it. `_run` renders it on a job thread with `StoryRunner.render` - same
RenderConfig, same layout, same bytes as `storymem render` with the same flags, script and
seed - while the claim's lease is renewed; a claim that is lost (another replica took it
over after this one stalled) stops the job at the next shot and nothing more is recorded
by this replica.

`StoryJobs.adopt` is one adoption round: for every active job of every key (read from the
per-key usage records, not a scan of all jobs) that no replica holds, it takes the claim and
queues the job again; the runner resumes from the last committed shot. A job claimed
`max_job_attempts` times already fails with that reason instead, and one job that cannot be
adopted (unreadable, invalid) is failed or skipped without stopping the round.

Failures of the server are never shown raw: the job's `error` is a fixed message with the
submitting request's id, and the exception is logged under that id.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from pipelines.serve.errors import (ServeRequestError, log_failure, new_request_id,
                                    sanitised_failure)
from pipelines.serve.job_executor import JobAlreadyHere, JobExecutor
from pipelines.serve.jobs import (JobOutputs, JobRegistry, JobShot, JobStatus, StoryJob,
                                  UnknownJob, new_job_id)
from pipelines.serve.limits import LimitExceeded, ServeLimits
from pipelines.serve.schemas import StoryRequest
from pipelines.serve.session_state import PresetConfigs, story_config
from pipelines.serve.usage import UsageIndex, folder_bytes
from storymem_model import storage
from storymem_model.records import ShotDone
from storymem_model.render_config import RenderConfig
from storymem_model.story_script import ScriptError, StoryScript, load_script

log = logging.getLogger("storymem.serve.jobs")


def validate_script(script, name: str | None, limits: ServeLimits) -> StoryScript:
    """The request's script, validated (422 `invalid_script` listing up to 20 problems and
    counting all) and within the limits."""
    try:
        story = load_script(script, name=name or "request")
    except ScriptError as exc:
        raise ServeRequestError(422, "invalid_script", str(exc), problems=exc.problems,
                                problem_count=exc.total) from None
    limits.check("max_story_shots", len(story.shots), "shots in the script")
    for spec in story.shots:
        limits.check_prompt(spec.prompt, f"prompt of scene {spec.scene} shot {spec.shot} length")
    return story


def job_config(base_configs: PresetConfigs, job: StoryJob) -> RenderConfig:
    """The RenderConfig a recorded job renders with."""
    return story_config(base_configs.config(job.sampling_preset), job.seed, job.transition)


class JobStopped(RuntimeError):
    """This replica lost the job's claim; another one holds the job now."""


class StoryJobs:
    """Story jobs on one generation replica (all methods block: call them in threads)."""

    def __init__(self, registry: JobRegistry, usage: UsageIndex, executor: JobExecutor,
                 limits: ServeLimits, base_configs: PresetConfigs, worker_id: str,
                 claim_ttl_s: float, max_attempts: int,
                 make_runner: Callable[[StoryJob], object],
                 on_shot: Callable[[ShotDone], None] | None = None):
        self.registry = registry
        self.usage = usage
        self.executor = executor
        self.limits = limits
        self.base_configs = base_configs
        self.worker_id = worker_id
        self.claim_ttl_s = float(claim_ttl_s)
        self.max_attempts = int(max_attempts)
        self.make_runner = make_runner
        self.on_shot = on_shot

    # -- submission ------------------------------------------------------------------------
    def submit(self, scope: str, body: StoryRequest, request_id: str | None = None) -> StoryJob:
        script = validate_script(body.script, body.name, self.limits)
        try:
            config = story_config(self.base_configs.config(body.sampling_preset), body.seed,
                                  body.transition)
        except ValueError as exc:  # ConfigError naming the setting
            raise ServeRequestError(422, "invalid_story_settings", str(exc)) from None
        job = StoryJob(job_id=new_job_id(), scope=scope, status=JobStatus.QUEUED,
                       story_id=script.story_id, config_hash=config.config_hash(),
                       shots_total=len(script.shots), seed=config.seed,
                       transition=config.transition, sampling_preset=config.sampling_preset,
                       worker=self.worker_id, attempts=1,
                       request_id=request_id or new_request_id())
        self.executor.reserve(job.job_id)  # 429 job_queue_full
        stop = threading.Event()
        claim = self.registry.claim(scope, job.job_id, self.worker_id, self.claim_ttl_s,
                                    on_lost=stop.set)
        try:
            if not claim.try_acquire():  # a new random id: nobody else can hold it
                raise RuntimeError(f"story job {job.job_id}: claim already held")
            try:
                self.usage.admit_job(scope, job.job_id, self.limits)  # 429 quota_exceeded
                try:
                    self.registry.create(job, script.to_dict())
                    self.registry.record_claim(job, self.worker_id)
                except BaseException:
                    self.usage.end_job(scope, job.job_id)
                    raise
            except BaseException:
                claim.release()
                # Never accepted, its id never given out: nothing of it stays (a local
                # claim leaves its flock guard file; nobody else can be waiting on it).
                storage.remove(self.registry.job_uri(scope, job.job_id))
                raise
        except BaseException:
            self.executor.cancel(job.job_id)
            raise
        self.executor.start(job.job_id, lambda: self._run(job, script, claim, stop))
        return job

    # -- running ---------------------------------------------------------------------------
    def _run(self, job: StoryJob, script: StoryScript, claim, stop: threading.Event) -> None:
        """Render a claimed job to completion (or failure), keeping its record current."""
        def save(**changes) -> None:
            if stop.is_set() or claim.lost:
                raise JobStopped(job.job_id)
            for key, value in changes.items():
                setattr(job, key, value)
            self.registry.save(job)

        try:
            save(status=JobStatus.RUNNING, worker=self.worker_id, error=None)
            runner = self.make_runner(job)
            if runner.config_hash != job.config_hash:
                raise ServeRequestError(409, "job_incompatible",
                                        f"this server renders with config {runner.config_hash}, "
                                        f"the job was recorded for {job.config_hash}")

            def progress(event: ShotDone) -> None:
                save(shots_done=event.shot_index + 1)
                if self.on_shot is not None:
                    self.on_shot(event)

            result = runner.render(script, self.registry.out_uri(job), progress=progress)
            shots = tuple(JobShot(scene=r.scene, shot=r.shot, mode=r.mode,
                                  video_uri=r.video_uri, video_sha256=r.video_sha256)
                          for r in result.rows)
            save(status=JobStatus.SUCCEEDED, shots_done=result.shots_total, outputs=JobOutputs(
                story_uri=result.story_uri, video_uri=result.video_uri,
                shots_parquet_uri=result.parquet_uri,
                commit_marker_uri=storage.join(result.story_uri, storage.COMMIT_MARKER),
                shots=shots))
        except JobStopped:
            log.warning("story job %s: this replica lost its claim; stopped (another "
                        "replica holds the job now)", job.job_id)
            claim.release()
            return
        except ServeRequestError as exc:  # a client-facing reason, already worded
            self._fail(job, exc.detail, claim, stop)
        except Exception as exc:
            log_failure(log, job.request_id, f"story job {job.job_id}", exc)
            self._fail(job, sanitised_failure(job.request_id, "rendering this story job"),
                       claim, stop)
        self._finish(job, claim)

    def _fail(self, job: StoryJob, message: str, claim, stop: threading.Event) -> None:
        if stop.is_set() or claim.lost:
            return
        job.status, job.error = JobStatus.FAILED, message
        try:
            self.registry.save(job)
        except Exception as exc:
            log_failure(log, job.request_id, f"recording the failure of story job {job.job_id}",
                        exc)

    def _finish(self, job: StoryJob, claim) -> None:
        """Count what the job stored, take it off the key's active jobs, free the claim."""
        try:
            if not claim.lost:
                self.usage.end_job(job.scope, job.job_id,
                                   folder_bytes(self.registry.job_uri(job.scope, job.job_id)))
        except Exception as exc:  # the next adoption round retires it
            log_failure(log, job.request_id, f"retiring story job {job.job_id}", exc)
        finally:
            claim.release()

    # -- adoption --------------------------------------------------------------------------
    def adopt(self) -> list[str]:
        """One adoption round; returns the ids of the jobs queued again here."""
        adopted: list[str] = []
        for scope in self.usage.scopes():
            try:
                active = list(self.usage.read(scope).active_jobs)
            except Exception:
                log.exception("adoption: cannot read the usage record of a key; skipped")
                continue
            for job_id in active:
                if self.executor.holds(job_id):
                    continue
                try:
                    if self._adopt_one(scope, job_id):
                        adopted.append(job_id)
                except LimitExceeded:  # this replica's queue is full: the next round
                    return adopted
                except Exception:  # one bad job never blocks the others
                    log.exception("adoption of story job %s failed; skipped", job_id)
        return adopted

    def _adopt_one(self, scope: str, job_id: str) -> bool:
        stop = threading.Event()
        claim = self.registry.claim(scope, job_id, self.worker_id, self.claim_ttl_s,
                                    on_lost=stop.set)
        if not claim.try_acquire():
            return False  # a live replica holds it
        try:
            try:
                job = self.registry.get(scope, job_id)
            except (UnknownJob, ValueError, TypeError):
                # never recorded (its replica died while submitting it) or unreadable
                log.warning("adoption: story job %s has no readable record; retired", job_id)
                self.usage.end_job(scope, job_id)
                claim.release()
                return False
            if not job.status.active:  # finished; its replica died before retiring it
                self.usage.end_job(scope, job_id)
                claim.release()
                return False
            if job.attempts >= self.max_attempts:
                log.error("story job %s: claimed %d times, its replica stopped each time "
                          "(last %s); failed (request id %s)", job_id, job.attempts,
                          job.worker, job.request_id)
                job.status, job.error = JobStatus.FAILED, (
                    f"the story job was started {job.attempts} times and the server replica "
                    f"running it stopped each time (limit max_job_attempts="
                    f"{self.max_attempts}); request id {job.request_id}")
                self.registry.save(job)
                self._finish(job, claim)
                return False
            try:
                script = validate_script(self.registry.script(job), None, self.limits)
                if script.story_id != job.story_id:
                    raise ServeRequestError(422, "invalid_script",
                                            f"the stored script no longer yields story id "
                                            f"{job.story_id}")
            except (ServeRequestError, OSError, ValueError) as exc:
                job.status = JobStatus.FAILED
                job.error = exc.detail if isinstance(exc, ServeRequestError) else \
                    sanitised_failure(job.request_id, "reading this story job's script")
                if not isinstance(exc, ServeRequestError):
                    log_failure(log, job.request_id, f"adopting story job {job_id}", exc)
                self.registry.save(job)
                self._finish(job, claim)
                return False
            try:
                self.executor.reserve(job_id)
            except JobAlreadyHere:
                claim.release()
                return False
            previous = job.worker
            try:
                job.attempts += 1
                job.worker = self.worker_id
                self.registry.record_claim(job, self.worker_id)
                job.status = JobStatus.QUEUED
                self.registry.save(job)
            except BaseException:
                self.executor.cancel(job_id)
                raise
        except BaseException:
            claim.release()
            raise
        log.info("adopted story job %s (claim %d, previous replica %s)", job_id,
                 job.attempts, previous)
        self.executor.start(job_id, lambda: self._run(job, script, claim, stop))
        return True
