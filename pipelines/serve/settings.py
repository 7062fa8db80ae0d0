"""`ServeSettings`: everything the Serve application needs, one frozen, validated spec.

Built once at the edge (`storymem serve` flags, `flows/cli/serve.py`) and passed to every
deployment: the resolved `RenderSpec` (model, scorers, the RenderConfig every shot starts
from - the one `storymem render` builds from the same flags, hence the same config hash),
where data is stored, the API key digests (never the keys), request limits and per-key
quotas, retention, the story-job executor, and how many replicas of what run where. Replicas receive this spec, never a Namespace; per-request
changes (a session's seed and transition, a single shot's sampling) are
`RenderConfig.replace(...)` on `render.config`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipelines.serve.limits import ServeLimits
from pipelines.serve.retention import RetentionPolicy
from storymem_model.render_spec import RenderSpec
from storymem_model.spec_json import Spec, check_number

APP_NAME = "storymem"  # the Serve application's name
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ServeSettings(Spec):
    """The server: what it renders with, where it stores, who may call it, how it scales.

    `render.scorers` is None when memory is off: no keyframes are selected, so the app then
    starts no scorer deployments. The generation replicas render on `render.model.device`
    (resolved for `gpus_per_replica > 0`); the scorer deployments run on
    `render.scorers.device` (resolved for `scorer_gpus > 0`).
    """

    render: RenderSpec
    storage_root: str
    key_digests: tuple[str, ...]
    limits: ServeLimits = field(default_factory=ServeLimits)
    image_uri_prefixes: tuple[str, ...] = ()
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_ongoing_per_replica: int = 16
    scorer_replicas: int = 1
    scorer_gpus: float = 0.0
    scorer_cpus: float = 0.1
    ingress_replicas: int = 1
    ingress_cpus: float = 0.1
    # The ingress only awaits other deployments, so it may hold many requests at once;
    # Serve's default (5) would queue /healthz behind five long shot requests.
    ingress_max_ongoing: int = 512
    torch_threads: int | None = None
    # A story job's claim (and a session's shot lease) lapses this long after its replica
    # stopped renewing it; then another replica adopts the job.
    job_stale_after_s: float = 60.0
    job_workers: int = 1        # story jobs rendering at once per generation replica
    max_job_attempts: int = 3   # claims of one job before it fails (its replica kept dying)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_digests", tuple(self.key_digests))
        object.__setattr__(self, "image_uri_prefixes", tuple(self.image_uri_prefixes))
        super().__post_init__()

    def problems(self) -> list[str]:
        out: list[str] = []
        if not isinstance(self.storage_root, str) or not self.storage_root.strip():
            out.append("storage_root must be a local folder or a storage URI")
        if not self.key_digests:
            out.append("key_digests: at least one API key digest (the server never runs "
                       "open to everyone)")
        elif not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in self.key_digests):
            out.append("key_digests must be hex SHA-256 digests of the keys, never the keys")
        if not all(isinstance(p, str) and p for p in self.image_uri_prefixes):
            out.append("image_uri_prefixes must be non-empty URI prefixes")
        else:
            from pipelines.serve.images import parse_prefixes

            try:
                parse_prefixes(self.image_uri_prefixes)
            except ValueError as exc:
                out.append(str(exc))
        for name in ("replicas", "scorer_replicas", "ingress_replicas",
                     "max_ongoing_per_replica", "ingress_max_ongoing", "job_workers",
                     "max_job_attempts"):
            check_number(out, name, getattr(self, name), minimum=1, integer=True)
        for name in ("gpus_per_replica", "cpus_per_replica", "scorer_gpus", "scorer_cpus",
                     "ingress_cpus"):
            check_number(out, name, getattr(self, name), minimum=0)
        check_number(out, "torch_threads", self.torch_threads, minimum=1, integer=True,
                     optional=True)
        check_number(out, "job_stale_after_s", self.job_stale_after_s, minimum=2)
        return out

    @property
    def has_scorers(self) -> bool:
        """Whether shots select keyframes (memory on), hence whether scorer deployments run."""
        return self.render.scorers is not None
