"""Story jobs of the Serve endpoint: their records in storage, scoped to an API key.

`POST /v1/stories` creates a job record and a generation replica renders the story in the
background through the story runner; `GET /v1/stories/{id}` reads the record back. Records
live in storage, not in a replica's memory, so any ingress replica can answer and a restart
loses nothing (a job whose worker died is picked up again by a restarted worker; the runner
resumes from the last committed shot).

Layout under the server's storage root:
    jobs/{scope}/{job_id}/job.json     the record (status, progress, outputs, error)
    jobs/{scope}/{job_id}/script.json  the validated script, in ST-Bench form
    jobs/{scope}/{job_id}/out/         the runner's output root: {story_id}/{config_hash}/...
"""
from __future__ import annotations

import enum
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

from storymem_model import storage

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{24}$")
STALE_AFTER_S = 60.0


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)


class UnknownJob(LookupError):
    """No job with this id for this key."""


def new_job_id() -> str:
    """144 random bits, URL-safe (24 characters)."""
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class JobShot:
    """One rendered shot of a finished job."""

    scene: int
    shot: int
    mode: str  # a ShotMode value
    video_uri: str
    video_sha256: str


@dataclass(frozen=True)
class JobOutputs:
    """Where a finished job's story is: the runner's folder and its files."""

    story_uri: str
    video_uri: str
    shots_parquet_uri: str
    commit_marker_uri: str
    shots: tuple[JobShot, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> "JobOutputs":
        return cls(**{**data, "shots": tuple(JobShot(**s) for s in data.get("shots", ()))})


@dataclass
class StoryJob:
    job_id: str
    scope: str
    status: JobStatus
    story_id: str
    config_hash: str
    shots_total: int
    seed: int
    transition: str
    shots_done: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    heartbeat_at: float = 0.0
    worker: str | None = None
    attempts: int = 0
    error: str | None = None
    outputs: JobOutputs | None = None

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)
        if isinstance(self.outputs, dict):
            self.outputs = JobOutputs.from_dict(self.outputs)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "StoryJob":
        return cls(**json.loads(data))

    def public(self) -> dict:
        """The record as `StoryJobOut` (no scope, worker or settings)."""
        data = asdict(self)
        for private in ("scope", "heartbeat_at", "worker", "attempts", "seed", "transition"):
            data.pop(private)
        return data


class JobRegistry:
    """Job records under `{root}/jobs/`."""

    def __init__(self, root: str):
        self.root = storage.join(root, "jobs")

    def job_uri(self, scope: str, job_id: str) -> str:
        return storage.join(self.root, scope, job_id)

    def out_uri(self, job: StoryJob) -> str:
        return storage.join(self.job_uri(job.scope, job.job_id), "out")

    def script_uri(self, job: StoryJob) -> str:
        return storage.join(self.job_uri(job.scope, job.job_id), "script.json")

    def create(self, scope: str, script: dict, *, story_id: str, config_hash: str,
               shots_total: int, seed: int, transition: str) -> StoryJob:
        job = StoryJob(job_id=new_job_id(), scope=scope, status=JobStatus.QUEUED,
                       story_id=story_id, config_hash=config_hash, shots_total=shots_total,
                       seed=seed, transition=transition)
        storage.write_bytes(self.script_uri(job), json.dumps(script, sort_keys=True).encode())
        self.save(job)
        return job

    def save(self, job: StoryJob) -> None:
        job.updated_at = time.time()
        storage.write_bytes(storage.join(self.job_uri(job.scope, job.job_id), "job.json"),
                            job.to_json())

    def get(self, scope: str, job_id: str) -> StoryJob:
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
            raise UnknownJob(job_id)
        try:
            data = storage.read_bytes(storage.join(self.job_uri(scope, job_id), "job.json"))
        except FileNotFoundError:
            raise UnknownJob(job_id) from None
        return StoryJob.from_json(data)

    def script(self, job: StoryJob) -> dict:
        return json.loads(storage.read_bytes(self.script_uri(job)))

    def active_count(self, scope: str) -> int:
        return sum(1 for job in self.jobs(scope) if job.status.active)

    def jobs(self, scope: str | None = None):
        """Every job record (of one scope, or of all scopes)."""
        pattern = storage.join(self.root, scope or "*", "*", "job.json")
        fs, path = storage.filesystem(pattern)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        for found in sorted(fs.glob(path)):
            try:
                yield StoryJob.from_json(storage.read_bytes(protocol + found))
            except (FileNotFoundError, ValueError, TypeError):
                continue

    def orphaned(self, now: float | None = None, stale_after_s: float = STALE_AFTER_S):
        """Jobs queued or running whose worker has not reported for `stale_after_s`."""
        now = time.time() if now is None else now
        for job in self.jobs():
            if job.status.active and now - max(job.heartbeat_at, job.updated_at) > stale_after_s:
                yield job
