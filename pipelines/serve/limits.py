"""Request limits and per-key quotas of the Serve endpoint, and the error that names one.

Every limit has a name (the field of `ServeLimits`); a request over a limit gets a 4xx whose
JSON body carries that name, the allowed maximum and what was sent:
`{"error": "limit_exceeded", "limit": "max_prompt_chars", "maximum": 2000, "got": 2417, ...}`.

- per-key quotas (`*_per_key`) answer 429 with `"error": "quota_exceeded"`;
- the replica's job queue (`max_queued_jobs`) answers 429 with `"error": "job_queue_full"`
  (and `Retry-After`);
- the decoded pixels all requests of one HTTP replica hold at once (`max_replica_pixels`)
  answer 503 with `"error": "replica_busy"` (and `Retry-After`);
- byte sizes answer 413 (Payload Too Large), every other limit 422.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.serve.errors import ServeRequestError
from storymem_model.spec_json import Spec, SpecError, check_number
from storymem_model.story_script import MAX_NESTING, MAX_SCRIPT_BYTES

MIB = 1024 * 1024
GIB = 1024 * MIB

QUEUE_LIMIT = "max_queued_jobs"
REPLICA_PIXELS_LIMIT = "max_replica_pixels"
QUEUE_RETRY_AFTER_S = 5

# Objects the endpoint itself wrote are still read with a bound (storage.read_bytes(uri,
# max_bytes=...)): a damaged or replaced object can never make a replica read gigabytes.
MAX_RECORD_BYTES = 16 * MIB          # job.json, session.json, usage and claim records
MAX_STORED_SCRIPT_BYTES = 2 * MAX_SCRIPT_BYTES  # a job's script.json (normalised form)
MAX_STORED_IMAGE_BYTES = 64 * MIB    # a session's reference PNGs (lossless re-encodes)
MAX_STORED_VIDEO_BYTES = 1024 * MIB  # a shot video returned as base64


def limit_status(limit: str) -> tuple[int, str]:
    """(HTTP status, error code) of a request over the limit called `limit`."""
    if limit.endswith("_per_key"):
        return 429, "quota_exceeded"
    if limit == QUEUE_LIMIT:
        return 429, "job_queue_full"
    if limit == REPLICA_PIXELS_LIMIT:
        return 503, "replica_busy"
    if limit.endswith("_bytes"):
        return 413, "limit_exceeded"
    return 422, "limit_exceeded"


class LimitExceeded(ServeRequestError):
    """A request over one named limit or quota."""

    def __init__(self, limit: str, maximum, got, what: str):
        status, code = limit_status(limit)
        super().__init__(status, code, f"{what}: {got} is over the limit {limit}={maximum}",
                         limit=limit, maximum=maximum, got=got)

    @property
    def limit(self) -> str:
        return self.extra["limit"]

    @property
    def maximum(self):
        return self.extra["maximum"]

    @property
    def got(self):
        return self.extra["got"]


@dataclass(frozen=True)
class ServeLimits(Spec):
    """Upper bounds for one request and quotas for one API key. Defaults fit a real 480p
    Wan2.2 deployment."""

    max_body_bytes: int = 64 * MIB          # whole HTTP request body (shots, sessions)
    max_script_bytes: int = MAX_SCRIPT_BYTES  # whole POST /v1/stories body (1 MB)
    max_json_depth: int = MAX_NESTING       # nesting of a JSON body ([ and {), any route
    max_json_tokens: int = 200_000          # quotes, commas, colons, brackets, backslashes
    max_image_bytes: int = 8 * MIB          # one encoded image (after base64 decoding)
    max_images: int = 10                    # memory / reference images in one request
    max_image_side: int = 4096              # width or height of one decoded image
    max_image_pixels: int = 4096 * 4096     # width x height of one decoded image
    max_request_pixels: int = 32_000_000    # decoded pixels of all images of one request
    max_replica_pixels: int = 256_000_000   # decoded pixels held at once by one HTTP replica
    max_prompt_chars: int = 2000            # one prompt (shot or first-frame prompt)
    max_frames: int = 81                    # num_frames of a shot
    max_steps: int = 50                     # num_inference_steps
    max_height: int = 720                   # output height
    max_width: int = 1280                   # output width
    max_guidance_scale: float = 20.0        # guidance_scale / guidance_scale_2
    max_story_shots: int = 64               # shots in one story job script
    max_session_shots: int = 64             # shots in one session
    max_queued_jobs: int = 16               # story jobs waiting on one generation replica
    max_active_jobs_per_key: int = 4        # story jobs queued or running for one key
    max_sessions_per_key: int = 100         # stored sessions of one key
    max_stored_bytes_per_key: int = 20 * GIB  # bytes stored for one key (all kinds)

    def problems(self) -> list[str]:
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            found: list[str] = []
            check_number(found, f.name, value, above=0, integer=f.type == "int")
            out += [f"serve limit {p} (a positive number)" for p in found]
        if not out and self.max_replica_pixels < self.max_request_pixels:
            out.append(f"serve limit max_replica_pixels={self.max_replica_pixels} is below "
                       f"max_request_pixels={self.max_request_pixels}: a request at its own "
                       f"limit could never be served")
        return out

    @classmethod
    def from_overrides(cls, overrides: dict | None) -> "ServeLimits":
        """The defaults with `overrides` ({name: value}); ValueError naming an unknown or
        non-positive limit."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SpecError(f"unknown serve limit(s) {unknown}; known: {sorted(known)}")
        return cls(**overrides)

    # -- checks ------------------------------------------------------------------------
    def check(self, limit: str, got, what: str) -> None:
        """Raise `LimitExceeded` when `got` is over the limit called `limit`."""
        maximum = getattr(self, limit)
        if got is not None and got > maximum:
            raise LimitExceeded(limit, maximum, got, what)

    def check_prompt(self, prompt: str | None, what: str = "prompt length") -> None:
        if prompt is not None:
            self.check("max_prompt_chars", len(prompt), what)

    def check_sampling(self, *, num_frames=None, height=None, width=None,
                       num_inference_steps=None, guidance_scale=None,
                       guidance_scale_2=None) -> None:
        self.check("max_frames", num_frames, "num_frames")
        self.check("max_height", height, "height")
        self.check("max_width", width, "width")
        self.check("max_steps", num_inference_steps, "num_inference_steps")
        self.check("max_guidance_scale", guidance_scale, "guidance_scale")
        self.check("max_guidance_scale", guidance_scale_2, "guidance_scale_2")
