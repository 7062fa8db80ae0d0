"""The Serve request guard and request images under hostile input, without a cluster:
body bounds before parsing (size per route, JSON nesting and token counts while the body
streams), auth before any body byte is read, the URI allow-list by parsed segments, the
per-request pixel budget and Pillow's bomb guard."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from pipelines.serve.auth import ApiKeyChecker, key_digest
from pipelines.serve.images import (ImageInputError, PixelBudget, UriPlace, decode_image,
                                    load_images, parse_prefixes)
from pipelines.serve.json_meter import JsonMeter
from pipelines.serve.limits import LimitExceeded, ServeLimits, limit_status
from pipelines.serve.request_guard import GuardConfig, RequestGuard
from storymem_model.spec_json import SpecError

KEY = "a-long-enough-test-key-123456"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _png(size=(8, 8), value=200) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[0], size[1], 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# -- limits ---------------------------------------------------------------------------------
def test_limit_statuses_name_quotas_and_the_job_queue():
    assert limit_status("max_active_jobs_per_key") == (429, "quota_exceeded")
    assert limit_status("max_stored_bytes_per_key") == (429, "quota_exceeded")
    assert limit_status("max_queued_jobs") == (429, "job_queue_full")
    assert limit_status("max_script_bytes") == (413, "limit_exceeded")
    assert limit_status("max_request_pixels") == (422, "limit_exceeded")
    assert limit_status("max_replica_pixels") == (503, "replica_busy")
    defaults = ServeLimits()
    assert defaults.max_script_bytes == 1_000_000 and defaults.max_json_depth == 32
    assert defaults.max_request_pixels == 32_000_000


def test_ids_are_matched_whole():
    from pipelines.serve.jobs import is_job_id, new_job_id
    from pipelines.serve.sessions import is_session_id, new_session_id

    job_id, session_id = new_job_id(), new_session_id()
    assert is_job_id(job_id) and is_session_id(session_id)
    for bad in (job_id + "\n", job_id + "x", job_id[:-1], None, 7):
        assert not is_job_id(bad)
    for bad in (session_id + "\n", "\n" + session_id, session_id + "/"):
        assert not is_session_id(bad)


# -- the JSON meter -------------------------------------------------------------------------
def test_json_meter_refuses_deep_nesting_and_token_floods_while_streaming():
    meter = JsonMeter(max_depth=4, max_tokens=1000)
    meter.feed(b'{"a": [[')
    with pytest.raises(LimitExceeded) as info:
        meter.feed(b'[[')  # the 5th level, split across chunks
    assert info.value.limit == "max_json_depth" and info.value.status_code == 422

    strings = JsonMeter(max_depth=2, max_tokens=1000)
    strings.feed(b'{"p": "[[[[{{{{ \\" ]]]] \\\\"')   # brackets inside a string, escapes
    strings.feed(b', "q": "x\\')                      # an escape split across chunks
    strings.feed(b'"[[[["}')
    assert strings.deepest == 1

    flood = JsonMeter(max_depth=32, max_tokens=100)
    with pytest.raises(LimitExceeded) as info:
        for _ in range(100):
            flood.feed(b'"a",' * 10)
    assert info.value.limit == "max_json_tokens"
    # Base64 image data holds none of the counted characters.
    plain = JsonMeter(max_depth=32, max_tokens=10)
    plain.feed(b'{"first_frame": "' + base64.b64encode(os.urandom(100_000)) + b'"}')
    assert plain.tokens == 6  # two keys' quotes, one colon, one brace


# -- the request guard over ASGI ------------------------------------------------------------
def _guarded_app(limits: ServeLimits):
    app = FastAPI()
    seen = []

    @app.post("/v1/stories")
    async def stories(request: Request):
        body = await request.json()
        seen.append(body)
        return {"ok": True}

    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    config = GuardConfig(ApiKeyChecker([key_digest(KEY)]), limits)
    app.add_middleware(RequestGuard, config=lambda: config)
    return app, seen


class _Body:
    """A request body sent in chunks, counting how many chunks the server pulled."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.pulled = 0

    async def __aiter__(self):
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


def _post(app, path, body, headers=None):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, content=body, headers=headers or {})
    return asyncio.run(go())


def test_guard_refuses_before_reading_the_body():
    limits = ServeLimits(max_script_bytes=1000, max_json_depth=8, max_json_tokens=200)
    app, seen = _guarded_app(limits)

    # No key: 401 before one chunk was pulled, and the connection is closed.
    body = _Body([b'{"script": [' + b'"x",' * 100] * 50)
    response = _post(app, "/v1/stories", body)
    assert response.status_code == 401 and response.json()["error"] == "missing_api_key"
    assert body.pulled == 0 and response.headers["connection"] == "close"

    # Declared too big for a story script: 413 naming max_script_bytes, nothing read.
    big = _post(app, "/v1/stories", b"[" + b"1," * 800 + b"1]", headers=AUTH)
    assert big.status_code == 413 and big.json()["limit"] == "max_script_bytes"

    # Streamed (chunked, no Content-Length) past the limit: refused as soon as it passes.
    stream = _Body([b"[" + b" " * 299] * 20)
    refused = _post(app, "/v1/stories", stream, headers=AUTH)
    assert refused.status_code == 413 and refused.json()["limit"] == "max_script_bytes"
    assert stream.pulled == 4  # 4 x 300 bytes > 1000: the rest was never read

    # Nested deeper than max_json_depth, and a flood of values: 422 naming each.
    deep = _post(app, "/v1/stories", _Body([b'{"script": ' + b"[" * 20]), headers=AUTH)
    assert deep.status_code == 422 and deep.json()["limit"] == "max_json_depth"
    flood = _post(app, "/v1/stories", b'{"script": [' + b"0," * 300 + b"0]}", headers=AUTH)
    assert flood.status_code == 422 and flood.json()["limit"] == "max_json_tokens"
    assert seen == []  # the route never parsed any of them

    fine = _post(app, "/v1/stories", json.dumps({"script": ["[[[[[[[[[[ a prompt"]}),
                 headers={**AUTH, "Content-Type": "application/json"})
    assert fine.status_code == 200 and seen == [{"script": ["[[[[[[[[[[ a prompt"]}]


def test_proxy_guard_environment_carries_digests_and_limits_only(monkeypatch):
    from pipelines.serve.proxy_guard import (CALLBACK_ENV, GUARD_ENV, guard_config_from_env,
                                             proxy_env, proxy_middlewares)
    from pipelines.serve.settings import ServeSettings
    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.specs import ModelSpec, RenderSettings

    render = resolve_render_spec(ModelSpec(preset="tiny"), None,
                                 RenderSettings(memory=False), accelerator=False)
    settings = ServeSettings(render=render, storage_root="/tmp/x",
                             key_digests=(key_digest(KEY),),
                             limits=ServeLimits(max_script_bytes=1234))
    for bad in (key_digest(KEY) + "\n", key_digest(KEY)[:-1], KEY):  # matched whole
        with pytest.raises(SpecError, match="key_digests must be hex SHA-256"):
            ServeSettings(render=render, storage_root="/tmp/x", key_digests=(bad,))
    env = proxy_env(settings)
    assert env[CALLBACK_ENV] == "pipelines.serve.proxy_guard.proxy_middlewares"
    assert KEY not in json.dumps(env) and key_digest(KEY) in env[GUARD_ENV]
    config = guard_config_from_env(env)
    assert config.limits.max_script_bytes == 1234
    assert config.checker.authenticate(f"Bearer {KEY}").scope
    monkeypatch.setenv(GUARD_ENV, env[GUARD_ENV])
    [middleware] = proxy_middlewares()
    assert middleware.cls is RequestGuard


# -- image URIs -----------------------------------------------------------------------------
def test_uri_allow_list_matches_scheme_bucket_and_whole_segments():
    prefixes = parse_prefixes(["s3://assets", "s3://media/in/", "file:///srv/images"])
    allowed = ["s3://assets/a.png", "s3://assets/deep/b.png", "s3://media/in/c.png",
               "file:///srv/images/d.png"]
    refused = ["s3://assets-private/a.png", "s3://media/inbox/c.png", "s3://media/in",
               "s3://media/c.png", "s3a://assets/a.png", "file:///srv/images-x/d.png",
               "file:///srv/images/../etc/passwd", "s3://assets/./a.png",
               "s3://assets//a.png", "s3://assets/%2e%2e/a.png", "s3://assets/a.png?versionId=1",
               "s3://assets/a.png#x", "file://host/srv/images/d.png", "gs://assets/a.png",
               "s3://user:pw@assets/a.png", "s3://assets/a\\b.png"]
    for uri in allowed:
        place = UriPlace.parse(uri)
        assert place is not None and any(place.under(p) for p in prefixes), uri
    for uri in refused:
        place = UriPlace.parse(uri)
        assert place is None or not any(place.under(p) for p in prefixes), uri
    with pytest.raises(ValueError):
        parse_prefixes(["assets/no-scheme"])


def test_not_allowed_and_not_found_answer_alike_without_listing_prefixes(tmp_path):
    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "ok.png").write_bytes(_png())
    (tmp_path / "allowed-private").mkdir()
    (tmp_path / "allowed-private" / "secret.png").write_bytes(_png())
    (inside / "link.png").symlink_to(tmp_path / "allowed-private" / "secret.png")
    prefix = f"file://{inside}"
    limits = ServeLimits()
    assert load_images([f"{prefix}/ok.png"], "refs", limits, [prefix])[0].shape == (8, 8, 3)
    bodies = []
    for uri in (f"file://{tmp_path}/allowed-private/secret.png",  # a sibling: string prefix
                f"{prefix}/missing.png", f"{prefix}/link.png", f"{prefix}/",
                "file:///etc/passwd"):
        with pytest.raises(ImageInputError) as info:
            load_images([uri], "refs", limits, [prefix])
        body = info.value.body()
        bodies.append((info.value.status_code, body["error"],
                       body["detail"].replace(uri, "URI")))
        assert prefix not in body["detail"].replace(uri, "")
    assert len(set(bodies)) == 1 and bodies[0][:2] == (422, "image_uri_unavailable")


def test_image_uri_reads_stop_at_the_byte_limit(tmp_path):
    """An object behind an allowed URI is read with max_bytes: an object larger than the
    limit, or one that never ends (/dev/zero), costs the server the limit, no more."""
    (tmp_path / "big.png").write_bytes(_png() + b"\0" * 300_000)
    limits = ServeLimits(max_image_bytes=200_000)
    outcome = []

    def load(uri, prefix):
        try:
            load_images([uri], "refs", limits, [prefix])
        except Exception as exc:
            outcome.append(exc)

    for uri, prefix in ((f"file://{tmp_path}/big.png", f"file://{tmp_path}"),
                        ("file:///dev/zero", "file:///dev")):
        outcome.clear()
        thread = threading.Thread(target=load, args=(uri, prefix), daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), f"{uri} was read without a bound"
        [error] = outcome
        assert isinstance(error, LimitExceeded), error
        assert (error.limit, error.status_code) == ("max_image_bytes", 413)


# -- decoded pixels -------------------------------------------------------------------------
def test_request_pixel_budget_is_charged_from_headers_before_decoding():
    limits = ServeLimits(max_request_pixels=30_000)
    images = [base64.b64encode(_png((100, 100))).decode()] * 3 + \
             [base64.b64encode(_png_header_only(100, 100)).decode()]
    with pytest.raises(LimitExceeded) as info:
        load_images(images, "memory_images", limits)
    assert (info.value.limit, info.value.status_code, info.value.got) == (
        "max_request_pixels", 422, 40_000)
    assert "memory_images[3]" in info.value.detail  # charged before image 3 was decoded
    budget = PixelBudget(limits)
    load_images(images[:2], "memory_images", limits, budget=budget)
    with pytest.raises(LimitExceeded):  # one budget across the fields of a request
        load_images(images[:2], "motion_frames", limits, count_limit=None, budget=budget)


def test_replica_pixels_bound_all_requests_at_once_and_come_back_when_answered():
    """Requests decoding at once share the replica's `max_replica_pixels`: a request takes
    all its pixels in one step, from the headers of all its images, before decoding any;
    one that does not fit answers 503 `replica_busy` having taken nothing, and pixels come
    back when a request is answered. A budget released while its decoding thread still runs
    (the client went away) takes nothing more."""
    from pipelines.serve.images import (ReplicaPixels, RequestAnswered, decode_images,
                                        open_images)

    limits = ServeLimits(max_request_pixels=30_000, max_replica_pixels=50_000)
    replica = ReplicaPixels(limits)
    images = [base64.b64encode(_png((100, 100))).decode()] * 3
    first = PixelBudget(limits, replica)
    assert len(load_images(images, "memory_images", limits, budget=first)) == 3
    assert replica.held == 30_000
    with PixelBudget(limits, replica) as second:
        opened = open_images(images[:2], "memory_images", limits, budget=second)
        opened += open_images(images[:1], "first_frame", limits, count_limit=None,
                              budget=second)
        assert (second.spent, replica.held) == (30_000, 30_000)  # headers only: nothing held
        with pytest.raises(LimitExceeded) as info:
            decode_images(opened, limits, second)
        assert (info.value.status_code, info.value.code, info.value.limit, info.value.got) == (
            503, "replica_busy", "max_replica_pixels", 60_000)
        assert replica.held == 30_000  # refused whole: nothing taken
        with PixelBudget(limits, replica) as third:  # a smaller request still fits
            load_images(images[:2], "memory_images", limits, budget=third)
            assert replica.held == 50_000
    assert replica.held == 30_000  # the other requests were answered
    first.release()
    first.release()  # idempotent
    assert replica.held == 0
    with pytest.raises(RequestAnswered):
        load_images(images[:1], "memory_images", limits, budget=first)
    assert replica.held == 0
    with pytest.raises(SpecError, match="max_replica_pixels"):
        ServeLimits(max_request_pixels=30_000, max_replica_pixels=20_000)


def test_pillow_bomb_guard_stays_on():
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # something in the process switched it off
        roomy = ServeLimits(max_image_side=100_000, max_image_pixels=10**10,
                            max_request_pixels=10**10, max_replica_pixels=10**10)
        with pytest.raises(LimitExceeded) as info:
            decode_image(_png_header_only(20_000, 20_000), "first_frame", roomy)
        assert (info.value.status_code, info.value.limit, info.value.got) == (
            422, "max_image_pixels", 400_000_000)
        assert Image.MAX_IMAGE_PIXELS is not None
        # Our own limits come first and are named.
        with pytest.raises(LimitExceeded) as info:
            decode_image(_png_header_only(5000, 5000), "first_frame", ServeLimits())
        assert info.value.limit == "max_image_side"
    finally:
        Image.MAX_IMAGE_PIXELS = saved
