"""Story jobs of the Serve endpoint: their records in storage, scoped to an API key.

`POST /v1/stories` creates a job record and a generation replica renders the story in the
background through the story runner; `GET /v1/stories/{id}` reads the record back. Records
live in storage, not in a replica's memory, so any ingress replica can answer and a restart
loses nothing.

A job is *claimed* before it is queued: the claim is a storage lease (`claim.json`, owner =
the replica, renewed while the replica lives), so no two replicas ever hold - hence run -
one job. Each claim taken is also recorded for good under `claims/` (attempt number,
replica, time): the proof of how often a job was started. A claim left by a dead replica
expires and the job is adopted by another (or the restarted) replica - up to
`max_job_attempts` claims, after which the job fails with that reason.

Layout under the server's storage root:
    jobs/{scope}/{job_id}/job.json            the record (status, progress, outputs, error)
    jobs/{scope}/{job_id}/script.json         the validated script, in ST-Bench form
    jobs/{scope}/{job_id}/claim.json          the claim (a lease) while a replica holds it
    jobs/{scope}/{job_id}/claims/{n:03d}.json claim n: which replica took it, when
    jobs/{scope}/{job_id}/out/                the runner's output root: {story_id}/{config_hash}/...
"""
from __future__ import annotations

import enum
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

from pipelines.serve.limits import MAX_RECORD_BYTES, MAX_STORED_SCRIPT_BYTES
from storymem_model import storage
from storymem_model.leases import Lease

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{24}")  # used with fullmatch


def is_job_id(value) -> bool:
    return isinstance(value, str) and JOB_ID_PATTERN.fullmatch(value) is not None


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

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
    sampling_preset: str | None = None  # None: the server's (records written before presets)
    shots_done: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    worker: str | None = None
    attempts: int = 0  # claims taken so far (1 for a job that ran once)
    request_id: str = ""  # the submitting request; server-side failures are logged under it
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
        for private in ("scope", "worker", "attempts", "seed", "transition", "request_id"):
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

    def create(self, job: StoryJob, script: dict) -> StoryJob:
        storage.write_bytes(self.script_uri(job), json.dumps(script, sort_keys=True).encode())
        self.save(job)
        return job

    def save(self, job: StoryJob) -> None:
        job.updated_at = time.time()
        storage.write_bytes(storage.join(self.job_uri(job.scope, job.job_id), "job.json"),
                            job.to_json())

    def get(self, scope: str, job_id: str) -> StoryJob:
        if not is_job_id(job_id):
            raise UnknownJob(job_id)
        try:
            data = storage.read_bytes(storage.join(self.job_uri(scope, job_id), "job.json"),
                                      max_bytes=MAX_RECORD_BYTES)
        except FileNotFoundError:
            raise UnknownJob(job_id) from None
        return StoryJob.from_json(data)

    def script(self, job: StoryJob) -> dict:
        return json.loads(storage.read_bytes(self.script_uri(job),
                                             max_bytes=MAX_STORED_SCRIPT_BYTES))

    # -- claims ----------------------------------------------------------------------------
    def claim(self, scope: str, job_id: str, owner: str, ttl_s: float, on_lost=None) -> Lease:
        """The job's claim lease (not yet taken: `try_acquire()` it)."""
        return Lease(storage.join(self.job_uri(scope, job_id), "claim.json"), owner=owner,
                     ttl_s=ttl_s, on_lost=on_lost)

    def record_claim(self, job: StoryJob, owner: str) -> None:
        """Record claim number `job.attempts` for good (the job's claim is held)."""
        storage.write_bytes(
            storage.join(self.job_uri(job.scope, job.job_id), "claims",
                         f"{job.attempts:03d}.json"),
            json.dumps({"attempt": job.attempts, "worker": owner,
                        "claimed_at": time.time()}, sort_keys=True).encode())

    def claims(self, scope: str, job_id: str) -> list[dict]:
        """Every claim recorded for a job, in order."""
        folder = storage.join(self.job_uri(scope, job_id), "claims")
        return [json.loads(storage.read_bytes(storage.join(folder, rel),
                                              max_bytes=MAX_RECORD_BYTES))
                for rel in storage.list_files(folder) if rel.endswith(".json")]
