"""The storymem Ray Serve application: FastAPI ingress composed with model deployments.

    HTTP -> StorymemIngress (FastAPI: auth, limits, validation, image decoding, records)
              -> ShotGenerator replicas (model loaded once per replica; shots, sessions,
                 story jobs through the story runner's shot step)
                    -> ImageEmbedderDeployment, ImageGateDeployment (shared scorers;
                       not started when memory is off)

`build_app(settings)` returns the bound application for `serve.run`. Every route is
documented in the OpenAPI schema at `/openapi.json` (and `/docs`).

The ingress never runs model code: it awaits the generator's responses (`answer`, the one
place Ray's error wrapper is taken off a deployment's `ServeRequestError`), so `/healthz`
and every other cheap route stay responsive while shots render. The request guard runs
before any route, here and in Serve's proxy (`proxy_guard`). A server fault answers 500
with a fixed message and the request id; the detail is logged under that id.
"""

import asyncio
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serve.auth import ApiKeyChecker
from pipelines.serve.errors import (ServeRequestError, current_request_id, internal_error,
                                    log_failure, unknown_job, unknown_session)
from pipelines.serve.generation import ShotGenerator
from pipelines.serve.images import (PixelBudget, ReplicaPixels, decode_images, load_images,
                                    open_images, parse_prefixes)
from pipelines.serve.jobs import JobRegistry, UnknownJob
from pipelines.serve.limits import QUEUE_RETRY_AFTER_S
from pipelines.serve.request_guard import GuardConfig, RequestGuard
from pipelines.serve.schemas import (
    ErrorOut, SessionCreate, SessionOut, SessionShotRequest, SessionShotResponse, ShotRequest,
    ShotResponse, StoryJobOut, StoryRequest)
from pipelines.serve.scorers import ImageEmbedderDeployment, ImageGateDeployment
from pipelines.serve.sessions import SessionStore
from pipelines.serve.settings import ServeSettings
from pipelines.serve.usage import UsageIndex
from storymem_model.shot_modes import MOTION_FRAMES, ShotMode

API_VERSION = "1"
log = logging.getLogger("storymem.serve")


async def answer(response):
    """Await a deployment's response; a `ServeRequestError` it raised comes back as itself
    (Ray delivers it wrapped in a `RayTaskError`), anything else stays a server error."""
    try:
        return await response
    except RayTaskError as exc:
        if isinstance(exc.cause, ServeRequestError):
            raise exc.cause from None
        raise


_ERRORS = {status: {"model": ErrorOut}
           for status in (400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 503)}

app = FastAPI(
    title="storymem",
    version=API_VERSION,
    description="StoryMem on Wan2.2: single shots, interactive story sessions and "
                "asynchronous story jobs. Every /v1 call needs `Authorization: Bearer <key>`.",
)

# Set by the ingress replica's constructor; read by the request guard on every request.
_REPLICA_STATE: dict = {"guard": None}
app.add_middleware(RequestGuard, config=lambda: _REPLICA_STATE["guard"])


def _json_error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


@app.exception_handler(ServeRequestError)
async def _serve_error(_request, exc: ServeRequestError):
    headers = {"Retry-After": str(QUEUE_RETRY_AFTER_S)} if exc.status_code in (429, 503) \
        else None
    return _json_error(exc.status_code, exc.body(), headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return _json_error(400, {"error": "malformed_json",
                                 "detail": "request body is not valid JSON"})
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.lower() and \
            any(tuple(err.get("loc", ())) == ("body",) for err in errors):
        return _json_error(415, {"error": "unsupported_media_type",
                                 "detail": "send the body as JSON with Content-Type: "
                                           "application/json"})
    problems = []
    for err in errors[:20]:
        where = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
        problems.append(f"{where or 'body'}: {err.get('msg')}")
    return _json_error(422, {"error": "invalid_request", "detail": "; ".join(problems),
                             "problems": problems, "problem_count": len(errors)})


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request, exc: StarletteHTTPException):
    body = getattr(exc, "body", None)
    if body is None and exc.status_code == 400 and isinstance(
            exc.__cause__, (UnicodeDecodeError, RecursionError, ValueError)):
        # FastAPI's answer to a body it could not decode (not UTF-8, say)
        body = {"error": "malformed_json", "detail": "request body is not valid UTF-8 JSON"}
    if body is None:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        body = {"error": codes.get(exc.status_code, f"http_{exc.status_code}"),
                "detail": str(exc.detail)}
    return _json_error(exc.status_code, body)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    # Unexpected failures (a model error, storage down): JSON 500 with the request id; the
    # exception text (paths, buckets, endpoints) stays in the log under that id.
    request_id = current_request_id()
    log_failure(log, request_id, f"{request.method} {request.url.path}", exc)
    error = internal_error(request_id)
    return _json_error(error.status_code, error.body())


def _caller(request: Request):
    return request.state.caller


@serve.deployment(name="storymem_ingress")
@serve.ingress(app)
class StorymemIngress:
    """HTTP front: checks and records; model work is delegated to the generator handle."""

    def __init__(self, settings: ServeSettings, generator):
        self.settings = settings
        self.limits = settings.limits
        self.generator = generator
        self.sessions = SessionStore(settings.storage_root)
        self.jobs = JobRegistry(settings.storage_root)
        self.usage = UsageIndex(settings.storage_root, owner=f"ingress-{os.getpid()}")
        self.uri_prefixes = parse_prefixes(settings.image_uri_prefixes)
        self.replica_pixels = ReplicaPixels(self.limits)  # decoded images held right now
        _REPLICA_STATE["guard"] = GuardConfig(ApiKeyChecker(list(settings.key_digests)),
                                              settings.limits)

    # -- health --------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz(self) -> dict:
        """Liveness of the HTTP front; answers while shots render (no auth)."""
        return {"status": "ok", "api_version": API_VERSION, "time": time.time()}

    # -- single shots ----------------------------------------------------------------------
    @app.post("/v1/shots", response_model=ShotResponse, responses=_ERRORS, tags=["shots"])
    async def create_shot(self, body: ShotRequest, request: Request) -> ShotResponse:
        """Render one shot from a prompt, optional memory images and first/motion frames."""
        caller = _caller(request)
        self._check_shot(body)
        # the decoded images count against the replica's pixels until the shot is answered
        with PixelBudget(self.limits, self.replica_pixels) as budget:
            memory, first, motion = await asyncio.to_thread(self._decode_shot_images, body,
                                                            budget)
            order = body.model_copy(update={"memory_images": None, "first_frame": None,
                                            "motion_frames": None})
            return await answer(self.generator.generate_shot.remote(
                caller.scope, order, memory, first, motion))

    def _check_shot(self, body: ShotRequest) -> None:
        self.limits.check_prompt(body.prompt)
        self.limits.check_prompt(body.negative_prompt, "negative_prompt length")
        sampling = body.sampling
        self.limits.check_sampling(
            num_frames=sampling.num_frames, height=sampling.height, width=sampling.width,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale, guidance_scale_2=sampling.guidance_scale_2)
        self.limits.check("max_images", len(body.memory_images or []), "number of memory_images")
        if body.first_frame is not None and body.motion_frames is not None:
            raise ServeRequestError(422, "conflicting_conditioning",
                                    "send first_frame (MI2V) or motion_frames (MM2V), not both")
        if body.motion_frames is not None and len(body.motion_frames) != MOTION_FRAMES:
            raise ServeRequestError(
                422, "motion_frames_count",
                f"motion_frames needs exactly {MOTION_FRAMES} images, got {len(body.motion_frames)}")
        if body.mode == ShotMode.MI2V and body.first_frame is None:
            raise ServeRequestError(422, "missing_first_frame", "mode mi2v needs first_frame")
        if body.mode == ShotMode.MM2V and body.motion_frames is None:
            raise ServeRequestError(422, "missing_motion_frames", "mode mm2v needs motion_frames")
        if body.mode in (ShotMode.T2V, ShotMode.M2V) and (body.first_frame or body.motion_frames):
            raise ServeRequestError(422, "conflicting_conditioning",
                                    f"mode {body.mode} takes no first_frame or motion_frames")
        if body.mode == ShotMode.T2V and body.memory_images:
            raise ServeRequestError(422, "conflicting_conditioning",
                                    "mode t2v takes no memory_images (use m2v)")

    def _decode_shot_images(self, body: ShotRequest, budget: PixelBudget):
        """Memory images, first frame and motion frames: every header read and charged to
        one `budget` first, then all pixels held from the replica's at once, then decoded."""
        prefixes, limits = self.uri_prefixes, self.limits
        memory = open_images(body.memory_images, "memory_images", limits, prefixes,
                             budget=budget)
        first = open_images(None if body.first_frame is None else [body.first_frame],
                            "first_frame", limits, prefixes, count_limit=None, budget=budget)
        motion = open_images(body.motion_frames, "motion_frames", limits, prefixes,
                             count_limit=None, budget=budget)  # exactly 5, see _check_shot
        if len({opened.image.size for opened in motion}) > 1:
            raise ServeRequestError(422, "motion_frames_size",
                                    "motion_frames must all have the same size")
        memory, first, motion = (decode_images(images, limits, budget)
                                 for images in (memory, first, motion))
        return (memory, first[0] if first else None,
                motion if body.motion_frames is not None else None)

    # -- sessions --------------------------------------------------------------------------
    @app.post("/v1/sessions", response_model=SessionOut, status_code=201, responses=_ERRORS,
              tags=["sessions"])
    async def create_session(self, body: SessionCreate, request: Request) -> SessionOut:
        """Start an interactive story; reference images become its initial memory (MR2V)."""
        caller = _caller(request)
        with PixelBudget(self.limits, self.replica_pixels) as budget:
            references = await asyncio.to_thread(
                load_images, body.reference_images, "reference_images", self.limits,
                self.uri_prefixes, budget=budget)
            record = await answer(self.generator.create_session.remote(
                caller.scope, body.model_copy(update={"reference_images": None}), references))
        return SessionOut.of(record)

    @app.get("/v1/sessions/{session_id}", response_model=SessionOut, responses=_ERRORS,
             tags=["sessions"])
    async def get_session(self, session_id: str, request: Request) -> SessionOut:
        record = await asyncio.to_thread(self.sessions.get, _caller(request).scope, session_id)
        return SessionOut.of(record)

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=_ERRORS,
                tags=["sessions"])
    async def delete_session(self, session_id: str, request: Request) -> Response:
        scope = _caller(request).scope
        record = await asyncio.to_thread(self.sessions.delete, scope, session_id)
        await asyncio.to_thread(self.usage.end_session, scope, session_id, record.stored_bytes)
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/shots", response_model=SessionShotResponse,
              responses=_ERRORS, tags=["sessions"])
    async def create_session_shot(self, session_id: str, body: SessionShotRequest,
                                  request: Request) -> SessionShotResponse:
        """Render the session's next shot; memory and transitions as in a batch render."""
        scope = _caller(request).scope
        self.limits.check_prompt(body.prompt)
        self.limits.check_prompt(body.first_frame_prompt, "first_frame_prompt length")
        # Unknown sessions stop here, before routing: a generator replica would make room
        # for them among its open sessions. The shot count is checked by the generator,
        # under the session's shot lease (`exclusive_session_shot`).
        if not await asyncio.to_thread(self.sessions.exists, scope, session_id):
            raise unknown_session(session_id)
        result = await answer(self.generator.options(
            multiplexed_model_id=f"{scope}/{session_id}").session_shot.remote(
            scope, session_id, body))
        return SessionShotResponse.of(result.record, result.shot, result.video_base64)

    # -- story jobs ------------------------------------------------------------------------
    @app.post("/v1/stories", response_model=StoryJobOut, status_code=202, responses=_ERRORS,
              tags=["stories"])
    async def create_story(self, body: StoryRequest, request: Request) -> dict:
        """Queue a whole script; poll `GET /v1/stories/{job_id}` for progress and outputs.
        429 when the key has `max_active_jobs_per_key` jobs queued or running or the
        replica's job queue is full (`max_queued_jobs`)."""
        scope = _caller(request).scope
        job = await answer(self.generator.submit_story.remote(scope, body,
                                                              current_request_id()))
        return job.public()

    @app.get("/v1/stories/{job_id}", response_model=StoryJobOut, responses=_ERRORS,
             tags=["stories"])
    async def get_story(self, job_id: str, request: Request) -> dict:
        try:
            job = await asyncio.to_thread(self.jobs.get, _caller(request).scope, job_id)
        except UnknownJob:
            raise unknown_job(job_id) from None
        return job.public()


def build_app(settings: ServeSettings) -> serve.Application:
    """The bound application: ingress -> generator -> shared scorers (these only when
    memory is on: without it no keyframe is selected)."""
    embedder = gate = None
    if settings.has_scorers:
        scorer_options = {"num_replicas": settings.scorer_replicas,
                          "ray_actor_options": {"num_cpus": settings.scorer_cpus,
                                                "num_gpus": settings.scorer_gpus}}
        scorers = settings.render.scorers
        embedder = ImageEmbedderDeployment.options(**scorer_options).bind(
            scorers, settings.torch_threads)
        gate = ImageGateDeployment.options(**scorer_options).bind(
            scorers, settings.torch_threads)
    generator = ShotGenerator.options(
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing_per_replica,
        ray_actor_options={"num_cpus": settings.cpus_per_replica,
                           "num_gpus": settings.gpus_per_replica},
    ).bind(settings, embedder, gate)
    return StorymemIngress.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=settings.ingress_max_ongoing,
        ray_actor_options={"num_cpus": settings.ingress_cpus},
    ).bind(settings, generator)
