"""Request limits of the Serve endpoint, and the error that names a broken limit.

Every limit has a name (the field of `ServeLimits`); a request over a limit gets a 4xx whose
JSON body carries that name, the allowed maximum and what was sent:
`{"error": "limit_exceeded", "limit": "max_prompt_chars", "maximum": 2000, "got": 2417, ...}`.
Byte-size limits answer 413 (Payload Too Large), every other limit 422.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.serve.errors import ServeRequestError
from storymem_model.spec_json import Spec, SpecError, check_number

MIB = 1024 * 1024


class LimitExceeded(ServeRequestError):
    """A request over one named limit."""

    def __init__(self, limit: str, maximum, got, what: str):
        super().__init__(413 if limit.endswith("_bytes") else 422, "limit_exceeded",
                         f"{what}: {got} is over the limit {limit}={maximum}",
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
    """Upper bounds for one request. Defaults fit a real 480p Wan2.2 deployment."""

    max_body_bytes: int = 64 * MIB          # whole HTTP request body
    max_image_bytes: int = 8 * MIB          # one encoded image (after base64 decoding)
    max_images: int = 10                    # memory / reference images in one request
    max_image_side: int = 4096              # width or height of one decoded image
    max_image_pixels: int = 4096 * 4096     # width x height of one decoded image
    max_prompt_chars: int = 2000            # one prompt (shot or first-frame prompt)
    max_frames: int = 81                    # num_frames of a shot
    max_steps: int = 50                     # num_inference_steps
    max_height: int = 720                   # output height
    max_width: int = 1280                   # output width
    max_guidance_scale: float = 20.0        # guidance_scale / guidance_scale_2
    max_story_shots: int = 64               # shots in one story job script
    max_session_shots: int = 64             # shots in one session
    max_active_jobs_per_key: int = 4        # story jobs queued or running for one key

    def problems(self) -> list[str]:
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            found: list[str] = []
            check_number(found, f.name, value, above=0, integer=f.type == "int")
            out += [f"serve limit {p} (a positive number)" for p in found]
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
