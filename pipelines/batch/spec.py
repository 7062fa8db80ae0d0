"""`BatchSpec`: one batch run, fully described; built at the edge, read by the driver.

    BatchSpec(scripts, out, render: RenderSpec, options: BatchOptions, run_id, ray_address,
              lock_ttl_s, lock_wait_s, lock_token)

`render` is the resolved `storymem_model.render_spec.RenderSpec` (model, scorers, config:
the config hash is known before any worker starts); `options` say how the run uses Ray
(workers, GPUs, retries, timeouts, scorer pools) and change no pixel; the `lock_*` fields
are the output lock the driver holds (`storymem_model.output_lock`): its lease, how long
to wait for it, and the token of a lease a flow handed over. A BatchSpec is frozen and
JSON-serialisable, so the cluster path hands it to a Ray job as a file.
"""
from __future__ import annotations

import datetime as _dt
import re
import uuid
from dataclasses import dataclass, field

from storymem_model.output_lock import DEFAULT_TTL_S
from storymem_model.render_spec import RenderSpec
from storymem_model.spec_json import Spec, check_choice, check_number

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # always fullmatch()
PROGRESS_MODES = ("auto", "bar", "log")
MAX_SPEC_BYTES = 16 * 1024 * 1024  # a BatchSpec file is read with this limit


def new_run_id() -> str:
    """A run id sortable by start time: `20261130T014500Z-1a2b3c` (UTC, random suffix)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def run_id_problem(run_id) -> str | None:
    """Why `run_id` cannot name a run folder, or None (the whole id must match
    RUN_ID_PATTERN: it becomes a storage key and part of Ray actor names)."""
    if isinstance(run_id, str) and RUN_ID_PATTERN.fullmatch(run_id):
        return None
    return (f"run_id {run_id!r}: use 1-128 letters, digits, '-', '_' and '.', starting with a "
            "letter or digit")


@dataclass(frozen=True)
class ScorerPoolOptions(Spec):
    """The shared scorer actor pools: how many actors, their resources and batching."""

    clip_actors: int = 1
    gate_actors: int = 1
    max_batch_size: int = 32  # images grouped from several stories into one scorer call
    max_wait_s: float = 0.05  # how long a request may wait for others to fill the batch
    cpus_per_actor: float = 0.25
    gpus_per_actor: float = 0.0
    torch_threads: int = 1
    max_restarts: int = 3  # Ray restarts of one crashed scorer actor (calls are re-sent)
    max_replacements: int | None = None  # new actors after that; default 2 x actors

    def problems(self) -> list[str]:
        out: list[str] = []
        check_number(out, "scorer max_restarts", self.max_restarts, minimum=0, integer=True)
        check_number(out, "scorer max_replacements", self.max_replacements, minimum=0,
                     integer=True, optional=True)
        check_number(out, "clip_actors", self.clip_actors, minimum=1, integer=True)
        check_number(out, "gate_actors", self.gate_actors, minimum=1, integer=True)
        check_number(out, "scorer max batch size", self.max_batch_size, minimum=1,
                     integer=True)
        check_number(out, "scorer max wait", self.max_wait_s, minimum=0)
        check_number(out, "cpus_per_actor", self.cpus_per_actor, minimum=0)
        check_number(out, "gpus_per_actor", self.gpus_per_actor, minimum=0)
        check_number(out, "torch_threads", self.torch_threads, minimum=1, integer=True)
        return out

    @property
    def replacement_limit(self) -> int:
        return 2 * (self.clip_actors + self.gate_actors) if self.max_replacements is None \
            else self.max_replacements


@dataclass(frozen=True)
class BatchOptions(Spec):
    """How the batch runs on Ray (nothing here changes pixels)."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    max_attempts: int = 3  # per story
    worker_max_restarts: int = 2  # Ray restarts of one worker actor before it is replaced
    max_worker_replacements: int | None = None  # default: 2 * workers
    story_timeout_s: float | None = None  # a story running longer is killed and retried
    scorers: ScorerPoolOptions = field(default_factory=ScorerPoolOptions)
    consistency: bool = False  # per-story consistency columns in stories.parquet
    torch_threads: int | None = 1  # per worker process
    progress: str = "auto"  # auto: a bar on a terminal, log lines otherwise
    log_flush_s: float = 10.0  # worker logs reach storage at least this often

    def problems(self) -> list[str]:
        out: list[str] = []
        check_number(out, "workers", self.workers, minimum=1, integer=True)
        check_number(out, "gpus_per_worker", self.gpus_per_worker, minimum=0)
        check_number(out, "cpus_per_worker", self.cpus_per_worker, minimum=0)
        check_number(out, "max_attempts", self.max_attempts, minimum=1, integer=True)
        check_number(out, "worker_max_restarts", self.worker_max_restarts, minimum=0,
                     integer=True)
        check_number(out, "max_worker_replacements", self.max_worker_replacements,
                     minimum=0, integer=True, optional=True)
        check_number(out, "story_timeout_s", self.story_timeout_s, above=0, optional=True)
        check_number(out, "torch_threads", self.torch_threads, minimum=1, integer=True,
                     optional=True)
        check_choice(out, "progress", self.progress, PROGRESS_MODES)
        check_number(out, "log_flush_s", self.log_flush_s, above=0)
        return out

    @property
    def replacement_limit(self) -> int:
        return 2 * self.workers if self.max_worker_replacements is None \
            else self.max_worker_replacements


@dataclass(frozen=True)
class BatchSpec(Spec):
    """One batch run: which scripts, where to, rendered how, on which Ray, under which
    output lock."""

    scripts: str
    out: str
    render: RenderSpec
    options: BatchOptions = field(default_factory=BatchOptions)
    run_id: str | None = None  # default: UTC time + random suffix
    ray_address: str | None = None  # None: an embedded local Ray on 127.0.0.1
    lock_ttl_s: float = DEFAULT_TTL_S  # the output lock's lease (renewed every ttl/3)
    lock_wait_s: float = 0.0  # how long to wait for another run holding the output
    # The output lock a flow took and handed over (`OutputLock.hand_over()`): the batch
    # takes that lease by its token. None: the batch takes the output lock itself.
    lock_token: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        for name in ("scripts", "out"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                out.append(f"{name} must be a path or URI, got {value!r}")
        if self.run_id is not None and run_id_problem(self.run_id):
            out.append(run_id_problem(self.run_id))
        check_number(out, "lock_ttl_s", self.lock_ttl_s, above=0)
        check_number(out, "lock_wait_s", self.lock_wait_s, minimum=0)
        if self.lock_token is not None and (not isinstance(self.lock_token, str)
                                            or not self.lock_token.strip()):
            out.append(f"lock_token must be a non-empty string, got {self.lock_token!r}")
        if self.options.consistency and self.render.scorers is None:
            out.append("consistency is measured with the CLIP scorer; a render without memory "
                       "has no scorers")
        device = self.render.model.device or ""
        if self.options.gpus_per_worker == 0 and device.startswith("cuda"):
            out.append(f"the model runs on {device} but the workers get no GPU: give "
                       "gpus_per_worker > 0 or resolve the model for the CPU")
        return out
