"""Run a command on a Ray cluster as a Ray job, idempotently, and wait for it.

The submission id is chosen by the caller from the run's identity (output, run id, flow
attempt). Submitting twice with one id never starts two jobs: a retried task (after a
dropped connection, say) finds the job it already submitted and waits for it instead.

A job still running after `timeout_s` is stopped (`stop_job`: Ray sends its driver
SIGTERM, which `storymem batch` turns into a clean exit - workers killed, output lock
released), and the wait ends with `RayJobTimeout`, which is not retried: a limit on the
work is not a transient failure. Stories the job finished are committed; the next run
resumes the others.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_GRACE_S = 120.0  # how long a stopped job may take to end before the flow gives up


class RayJobFailed(RuntimeError):
    """The Ray job ended in FAILED or STOPPED; carries the id, status, message and log tail."""

    def __init__(self, submission_id: str, status: str, message: str, logs_tail: str = ""):
        self.submission_id = submission_id
        self.status = status
        super().__init__(
            f"Ray job {submission_id} ended {status}: {message}"
            + (f"\n--- last log lines ---\n{logs_tail}" if logs_tail else ""))


class RayJobTimeout(RuntimeError):
    """The job ran past its time limit and was stopped (a RuntimeError, not a
    TimeoutError: the retry policy must not submit or attach again)."""


@dataclass
class RayJobResult:
    submission_id: str
    status: str
    message: str
    attached: bool  # True when the job already existed (a retry found it)


def submission_id_for(kind: str, out_uri: str, run_id: str, attempt: int = 1) -> str:
    """`storymem-{kind}-{hash of out}-{run_id}-a{attempt}`, safe for Ray's id rules."""
    digest = hashlib.sha256(out_uri.rstrip("/").encode()).hexdigest()[:10]
    safe_run = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id).strip("-")[:60]
    return f"storymem-{kind}-{digest}-{safe_run}-a{int(attempt)}"


def client_for(address: str):
    """A JobSubmissionClient for `http://HEAD:8265` (or `ray://`-less dashboard address)."""
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = f"http://{address}"
    return JobSubmissionClient(address)


def _existing_status(client, submission_id: str) -> str | None:
    """The job's status, or None when no job has this submission id."""
    try:
        status = client.get_job_status(submission_id)
    except RuntimeError as exc:
        text = str(exc).lower()
        if "404" in text or "does not exist" in text or "not found" in text:
            return None
        raise
    return str(getattr(status, "value", status))


def submit_once(client, submission_id: str, entrypoint: str, runtime_env: dict | None = None,
                metadata: dict | None = None, entrypoint_num_cpus: float | None = None) -> bool:
    """Submit unless a job with this id exists; returns True when it already existed."""
    if _existing_status(client, submission_id) is not None:
        log.info("Ray job %s already submitted; attaching", submission_id)
        return True
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                          runtime_env=runtime_env or None, metadata=metadata or None,
                          entrypoint_num_cpus=entrypoint_num_cpus)
    except RuntimeError as exc:
        if "already exists" in str(exc):  # lost the race with our own earlier attempt
            return True
        raise
    log.info("submitted Ray job %s: %s", submission_id, entrypoint)
    return False


def wait_for_job(client, submission_id: str, poll_s: float = 10.0,
                 timeout_s: float | None = None) -> tuple[str, str]:
    """Poll until the job is terminal; returns (status, message)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        info = client.get_job_info(submission_id)
        status = str(getattr(info.status, "value", info.status))
        if status != last:
            log.info("Ray job %s: %s", submission_id, status)
            last = status
        if status in TERMINAL:
            return status, info.message or ""
        if deadline is not None and time.monotonic() > deadline:
            ended = stop_job(client, submission_id, poll_s)
            raise RayJobTimeout(
                f"Ray job {submission_id} still {status} after {timeout_s:.0f} s "
                f"(job_timeout_s); " + (
                    f"it was stopped ({ended})" if ended else
                    f"it was asked to stop but still runs after {STOP_GRACE_S:.0f} s; its "
                    f"driver holds the output lock until it ends") +
                ". Finished stories are committed; the next run resumes the others")
        time.sleep(poll_s)


def stop_job(client, submission_id: str, poll_s: float = 10.0,
             grace_s: float = STOP_GRACE_S) -> str | None:
    """Ask Ray to stop the job and wait up to `grace_s` for it to end; its terminal status,
    or None when it still runs."""
    try:
        client.stop_job(submission_id)
    except Exception as exc:  # noqa: BLE001 - an ended job cannot be stopped; look at it
        log.warning("could not stop Ray job %s: %s", submission_id, exc)
    deadline = time.monotonic() + grace_s
    while True:
        try:
            raw = client.get_job_status(submission_id)
            status = str(getattr(raw, "value", raw))
        except Exception as exc:  # noqa: BLE001 - the server may be busy: look again
            log.warning("Ray job %s: status unavailable while stopping: %s", submission_id, exc)
            status = None
        if status in TERMINAL:
            log.info("Ray job %s stopped: %s", submission_id, status)
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(min(poll_s, 2.0))


def run_job(client, submission_id: str, entrypoint: str, runtime_env: dict | None = None,
            metadata: dict | None = None, poll_s: float = 10.0,
            timeout_s: float | None = None) -> RayJobResult:
    """Submit (or attach), wait, and raise RayJobFailed unless the job SUCCEEDED."""
    attached = submit_once(client, submission_id, entrypoint, runtime_env, metadata)
    status, message = wait_for_job(client, submission_id, poll_s=poll_s, timeout_s=timeout_s)
    if status != "SUCCEEDED":
        try:
            tail = "\n".join(client.get_job_logs(submission_id).splitlines()[-40:])
        except Exception:  # logs are a courtesy; the status is the answer
            tail = ""
        raise RayJobFailed(submission_id, status, message, tail)
    return RayJobResult(submission_id, status, message, attached)
