"""Serve building blocks without a cluster: API keys, request images, limits, records."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pipelines.serve.auth import (
    ApiKeyChecker, ApiKeyConfigError, AuthError, key_digest, load_key_digests)
from pipelines.serve.images import ImageInputError, decode_image, image_bytes, load_images
from pipelines.serve.limits import LimitExceeded, ServeLimits

KEY = "a-long-enough-test-key-123456"


def _png(size=(8, 8), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[0], size[1], 3), 200, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


# -- API keys ------------------------------------------------------------------------------
def test_keys_from_env_and_file_are_kept_as_digests_only(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-0123456789abcdef\n\n")
    digests = load_key_digests(key_file, environ={"STORYMEM_API_KEYS": f" {KEY} ,"})
    assert digests == sorted([key_digest(KEY), key_digest("file-key-0123456789abcdef")])
    assert all(KEY not in d for d in digests)


@pytest.mark.parametrize("environ, message", [
    ({}, "no API keys configured"),
    ({"STORYMEM_API_KEYS": "short"}, "shorter than 16"),
    ({"STORYMEM_API_KEY_FILE": "/nonexistent/keys"}, "cannot read API key file"),
])
def test_bad_key_configuration_is_refused_without_echoing_keys(environ, message):
    with pytest.raises(ApiKeyConfigError, match=message) as info:
        load_key_digests(environ=environ)
    assert "short" not in str(info.value).replace("shorter", "")


def test_checker_401_for_missing_or_malformed_403_for_unknown():
    checker = ApiKeyChecker([key_digest(KEY), key_digest("other-key-0123456789abc")])
    for header in (None, "", "Bearer", "Bearer   ", f"Basic {KEY}", KEY):
        with pytest.raises(AuthError) as info:
            checker.authenticate(header)
        assert info.value.status_code == 401, header
    with pytest.raises(AuthError) as info:
        checker.authenticate("Bearer wrong-key-0123456789abcdef")
    assert info.value.status_code == 403 and KEY not in info.value.detail
    one, two = checker.authenticate(f"Bearer {KEY}"), checker.authenticate(f"bearer  {KEY} ")
    other = checker.authenticate("Bearer other-key-0123456789abc")
    assert one.scope == two.scope != other.scope
    assert KEY not in one.scope and len(one.scope) == 24


# -- images -------------------------------------------------------------------------------
def test_images_from_base64_urlsafe_and_data_uri():
    limits = ServeLimits()
    raw = _png((8, 6))
    plain = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    images = load_images([plain, urlsafe, "data:image/png;base64," + plain], "memory_images", limits)
    assert [im.shape for im in images] == [(8, 6, 3)] * 3 and images[0].dtype == np.uint8
    assert decode_image(_png(fmt="JPEG"), "x", limits).shape == (8, 8, 3)


@pytest.mark.parametrize("spec, status, code", [
    ("%%%not-base64%%%", 400, "invalid_base64"),
    ("", 400, "invalid_base64"),
    ("data:image/png,rawtext", 400, "invalid_data_uri"),
    (base64.b64encode(b"GIF89a but not really").decode(), 415, "not_an_image"),
    (base64.b64encode(_png(fmt="TIFF")).decode(), 415, "unsupported_image"),
    ("s3://somewhere/else.png", 422, "image_uri_unavailable"),
    (123, 422, "invalid_image_field"),
])
def test_each_bad_image_has_its_own_error(spec, status, code):
    with pytest.raises(ImageInputError) as info:
        load_images([spec], "memory_images", ServeLimits())
    assert (info.value.status_code, info.value.code) == (status, code)
    assert "memory_images[0]" in info.value.detail


def test_image_uris_only_under_allowed_prefixes(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    prefix = f"file://{tmp_path}/"
    limits = ServeLimits()
    assert load_images([prefix + "ok.png"], "refs", limits, [prefix])[0].shape == (8, 8, 3)
    # Not allowed and not found answer alike (no existence oracle, no prefix listed).
    for uri in (prefix + "missing.png", prefix + "../x.png", "file:///etc/passwd"):
        with pytest.raises(ImageInputError) as info:
            load_images([uri], "refs", limits, [prefix])
        assert (info.value.status_code, info.value.code) == (422, "image_uri_unavailable")
        assert str(tmp_path) not in info.value.detail.replace(uri, "")


def test_image_limits_are_checked_before_decoding():
    limits = ServeLimits(max_image_bytes=10_000, max_image_side=32, max_image_pixels=600)
    with pytest.raises(LimitExceeded) as info:
        decode_image(_png((8, 40)), "first_frame", limits)
    assert info.value.limit == "max_image_side" and info.value.status_code == 422
    with pytest.raises(LimitExceeded) as info:
        decode_image(_png((30, 30)), "first_frame", limits)
    assert info.value.limit == "max_image_pixels"
    with pytest.raises(LimitExceeded) as info:
        image_bytes("A" * 20_000, "first_frame", limits)
    assert info.value.limit == "max_image_bytes" and info.value.status_code == 413
    with pytest.raises(LimitExceeded) as info:
        load_images([base64.b64encode(_png()).decode()] * 3, "memory_images",
                    ServeLimits(max_images=2))
    assert info.value.body()["limit"] == "max_images" and info.value.body()["got"] == 3


# -- limits -------------------------------------------------------------------------------
def test_limit_overrides_are_checked():
    assert ServeLimits.from_overrides({"max_steps": 8}).max_steps == 8
    with pytest.raises(ValueError, match="unknown serve limit"):
        ServeLimits.from_overrides({"max_stepz": 8})
    with pytest.raises(ValueError, match="positive"):
        ServeLimits.from_overrides({"max_steps": 0})
    limits = ServeLimits(max_prompt_chars=5)
    with pytest.raises(LimitExceeded, match="max_prompt_chars=5"):
        limits.check_prompt("abcdef")
    limits.check_sampling(num_frames=None, height=480)  # unset values are never over


# -- records ------------------------------------------------------------------------------
def test_job_and_session_records_are_scoped_and_ids_checked(tmp_path):
    from pipelines.serve.errors import ServeRequestError
    from pipelines.serve.jobs import JobRegistry, JobStatus, StoryJob, UnknownJob, new_job_id
    from pipelines.serve.sessions import SessionRecord, SessionStore, new_session_id
    from storymem_model.render_config import RenderConfig

    jobs = JobRegistry(str(tmp_path))
    job = jobs.create(StoryJob(job_id=new_job_id(), scope="scopeA", status=JobStatus.QUEUED,
                               story_id="s-1", config_hash="abc", shots_total=2, seed=1,
                               transition="mi2v", attempts=1), {"story_name": "s"})
    assert jobs.get("scopeA", job.job_id).story_id == "s-1"
    assert jobs.script(job) == {"story_name": "s"}
    for scope, job_id in (("scopeB", job.job_id), ("scopeA", "../../etc/passwd")):
        with pytest.raises(UnknownJob):
            jobs.get(scope, job_id)
    jobs.record_claim(job, "worker-1")
    assert [(c["attempt"], c["worker"]) for c in jobs.claims("scopeA", job.job_id)] == [
        (1, "worker-1")]
    assert not {"scope", "worker", "attempts", "request_id"} & set(job.public())

    store = SessionStore(str(tmp_path))
    session_id = new_session_id()
    store.save(SessionRecord(session_id=session_id, scope="scopeA",
                             config=RenderConfig(model_id="m")), other_bytes=100)
    record = store.get("scopeA", session_id)
    assert record.session_id == session_id and store.exists("scopeA", session_id)
    # stored_bytes counts the record's own JSON besides the other files
    record_file = tmp_path / "sessions" / "scopeA" / session_id / "session.json"
    assert record.stored_bytes == 100 + record_file.stat().st_size
    assert record.bytes_besides_record() == 100
    for scope, sid in (("scopeB", session_id), ("scopeA", "x" * 32), ("scopeA", "../" * 11)):
        with pytest.raises(ServeRequestError) as info:
            store.get(scope, sid)
        assert info.value.status_code == 404
        assert not store.exists(scope, sid)
    assert store.delete("scopeA", session_id).session_id == session_id
    assert not store.exists("scopeA", session_id)
    with pytest.raises(ServeRequestError):
        store.get("scopeA", session_id)


# -- the CLI ------------------------------------------------------------------------------
def _serve_args(argv, monkeypatch=None):
    import argparse

    from flows.cli.serve import add_serve_command

    parser = argparse.ArgumentParser(prog="storymem")
    add_serve_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_flags_defaults_and_render_model_flags():
    args = _serve_args(["--preset", "tiny"])
    assert (args.host, args.port, args.replicas) == ("127.0.0.1", 8000, 1)
    # The model flags are render's (add_model_arguments), with the same names.
    for flag in ("model_dir", "lora_dir", "t2v_model_dir", "transition", "seed",
                 "num_inference_steps", "rope_shift", "device"):
        assert hasattr(args, flag), flag


def test_serve_settings_replicas_gpus_limits_and_deployment_options(monkeypatch, tmp_path):
    from flows.cli.serve import settings_from_args
    from pipelines.serve.app import build_app

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    monkeypatch.chdir(tmp_path)
    args = _serve_args(["--preset", "tiny", "--replicas", "3", "--gpus-per-replica", "0.5",
                        "--limit", "max_steps=8", "--storage", "data"])
    settings = settings_from_args(args)
    assert settings.storage_root == str(tmp_path / "data")
    assert settings.limits.max_steps == 8 and KEY not in repr(settings)
    ingress = build_app(settings)._bound_deployment
    generator = ingress.init_args[1]._bound_deployment
    assert (generator.name, generator.num_replicas) == ("shot_generator", 3)
    assert generator.ray_actor_options["num_gpus"] == 0.5
    assert ingress.max_ongoing_requests >= 64  # health checks never queue behind shots
    # Default GPUs: one per replica when Ray sees a GPU, none on a CPU-only cluster.
    default = _serve_args(["--preset", "tiny"])
    assert settings_from_args(default, gpus_available=0).gpus_per_replica == 0
    on_gpu = settings_from_args(default, gpus_available=2)
    assert on_gpu.gpus_per_replica == 1 and on_gpu.render.model.device == "cuda"
    # What start_serve does once Ray shows a GPU: the same settings, only the render spec
    # resolved again for it.
    from flows.cli.serve import serve_render_spec

    assert settings_from_args(default).replace(
        gpus_per_replica=1.0, render=serve_render_spec(default, 1.0)) == on_gpu


@pytest.mark.parametrize("argv, environ, message", [
    (["--preset", "tiny"], {}, "no API keys configured"),
    ([], {"STORYMEM_API_KEYS": KEY}, "--preset tiny or --model-dir"),
    (["--preset", "tiny", "--limit", "max_stepz=3"], {"STORYMEM_API_KEYS": KEY},
     "unknown serve limit"),
    (["--preset", "tiny", "--replicas", "0"], {"STORYMEM_API_KEYS": KEY},
     "replicas must be >= 1"),
    (["--preset", "tiny", "--references", "a.png"], {"STORYMEM_API_KEYS": KEY},
     "reference_images"),
    (["--preset", "tiny", "--height", "50"], {"STORYMEM_API_KEYS": KEY},
     "height must be a positive multiple of 16"),
])
def test_serve_refuses_bad_setup_before_starting_ray(argv, environ, message, monkeypatch, capsys):
    import ray

    from flows.cli.serve import run_serve

    monkeypatch.delenv("STORYMEM_API_KEYS", raising=False)
    monkeypatch.delenv("STORYMEM_API_KEY_FILE", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    was_running = ray.is_initialized()
    assert run_serve(_serve_args(argv)) == 2
    assert message in capsys.readouterr().err
    assert ray.is_initialized() == was_running


# -- settings: one spec, built at the edge ------------------------------------------------
def test_serve_settings_are_a_spec_with_render_config_of_storymem_render(monkeypatch, tmp_path):
    """The replicas get a frozen, JSON-round-tripping spec whose RenderConfig is the one
    `storymem render` builds from the same flags (same config hash)."""
    import argparse

    from flows.cli.model_flags import render_spec_from_args
    from flows.cli.render import add_render_command
    from flows.cli.serve import settings_from_args
    from pipelines.serve.settings import ServeSettings

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    flags = ["--preset", "tiny", "--seed", "5", "--transition", "mm2v", "--steps", "3"]
    settings = settings_from_args(_serve_args([*flags, "--storage", str(tmp_path)]))
    assert ServeSettings.from_json(settings.to_json()) == settings
    with pytest.raises(Exception):
        settings.replicas = 2  # frozen
    parser = argparse.ArgumentParser(prog="storymem")
    add_render_command(parser.add_subparsers(dest="command"))
    render_args = parser.parse_args(["render", "story.json", "--out", "out", *flags])
    render = render_spec_from_args(render_args, accelerator=False)
    assert settings.render.config == render.config
    assert settings.render.config_hash == render.config_hash
    assert settings.render.scorers.device == "cpu"  # --scorer-gpus 0


def test_memory_off_starts_no_scorer_deployments(monkeypatch):
    from flows.cli.serve import settings_from_args
    from pipelines.serve.app import build_app

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    names = {}
    for argv in (["--preset", "tiny"], ["--preset", "tiny", "--no-memory"]):
        settings = settings_from_args(_serve_args(argv))
        generator = build_app(settings)._bound_deployment.init_args[1]._bound_deployment
        _settings, embedder, gate = generator.init_args
        names[settings.has_scorers] = [d._bound_deployment.name for d in (embedder, gate)
                                       if d is not None]
    assert names == {True: ["image_embedder", "image_gate"], False: []}


# -- typed errors across the Ray hop ------------------------------------------------------
def test_request_errors_pickle_whole():
    """Deployments raise these; Ray pickles them to the ingress, which answers with their
    status, code and extra fields."""
    import pickle

    from pipelines.serve.errors import ServeRequestError

    for error in (ServeRequestError(422, "invalid_script", "bad", problems=["a", "b"]),
                  LimitExceeded("max_story_shots", 64, 65, "shots in the script"),
                  ImageInputError(415, "not_an_image", "memory_images[0]: no"),
                  AuthError(403, "invalid_api_key", "API key not accepted")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert (copy.status_code, copy.body()) == (error.status_code, error.body())
    limit = pickle.loads(pickle.dumps(LimitExceeded("max_image_bytes", 10, 11, "image")))
    assert (limit.limit, limit.maximum, limit.got, limit.status_code) == (
        "max_image_bytes", 10, 11, 413)


def test_request_modes_are_shot_modes():
    from pydantic import ValidationError

    from pipelines.serve.schemas import REQUEST_MODES, ShotRequest
    from storymem_model.shot_modes import ShotMode

    assert set(REQUEST_MODES) - {"auto"} <= {m.value for m in ShotMode}
    assert ShotRequest(prompt="x", mode="mm2v").mode == ShotMode.MM2V
    for mode in ("mr2v", "m2v-no-memory", "i2v"):  # story-only modes are not requests
        with pytest.raises(ValidationError):
            ShotRequest(prompt="x", mode=mode)


# -- the single-shot step without a cluster --------------------------------------------
def test_single_shot_without_scorers_conditions_on_memory_and_selects_nothing(
        pipe, monkeypatch, tmp_path):
    """A server with memory off has no scorers: a single shot still uses the request's
    memory images, writes the story layout and selects no keyframe."""
    from flows.cli.serve import settings_from_args
    from pipelines.serve.schemas import ShotRequest
    from pipelines.serve.single_shot import render_single_shot
    from storymem_model import storage

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    settings = settings_from_args(_serve_args(["--preset", "tiny", "--no-memory"]))
    assert settings.render.scorers is None and not settings.render.config.memory
    request = ShotRequest(prompt="a boat at dawn", seed=3, return_video="uri",
                          sampling={"num_inference_steps": 2, "num_frames": 9})
    memory = [np.full((40, 24, 3), 90, np.uint8)]
    shot = render_single_shot(pipe, None, settings.render.config, str(tmp_path), "scopeA",
                              request, memory, None, None)
    assert (shot.mode, shot.num_frames, shot.memory_count, shot.keyframes) == (
        "m2v", 9, 1, [])
    folder = tmp_path / "shots" / "scopeA" / shot.shot_id
    assert storage.list_files(str(folder)) == ["shots/01_01.json", "shots/01_01.mp4"]
    no_memory = render_single_shot(pipe, None, settings.render.config, str(tmp_path),
                                   "scopeA", request, [], None, None)
    assert no_memory.memory_count == 0 and no_memory.video_sha256 != shot.video_sha256


def test_story_settings_change_the_config_as_render_flags_do(monkeypatch):
    from flows.cli.serve import settings_from_args
    from pipelines.serve.session_state import story_config

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    for flags, transition in ((["--preset", "tiny"], "mm2v"),
                              (["--preset", "tiny", "--no-memory"], "none")):
        base = settings_from_args(_serve_args(flags)).render.config
        render = settings_from_args(_serve_args([*flags, "--seed", "9", "--transition",
                                                 "mm2v"])).render.config
        config = story_config(base, 9, "mm2v")
        assert config.transition == transition and config == render
        assert story_config(base) is base


# -- story jobs, retention and quotas at the edge ------------------------------------------
def test_retention_job_and_quota_flags_become_settings(monkeypatch):
    from flows.cli.serve import duration_s, settings_from_args
    from pipelines.serve.settings import ServeSettings

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    settings = settings_from_args(_serve_args([
        "--preset", "tiny", "--ttl", "shots=2d", "--ttl", "jobs=36h", "--cleanup-every", "15m",
        "--job-workers", "2", "--max-job-attempts", "5", "--limit", "max_queued_jobs=8",
        "--limit", "max_sessions_per_key=7", "--image-uri-prefix", "s3://assets/in"]))
    retention = settings.retention
    assert (retention.shots_ttl_s, retention.jobs_ttl_s, retention.cleanup_every_s) == (
        2 * 86400, 36 * 3600, 900)
    assert retention.sessions_ttl_s == 7 * 86400  # the default
    assert (settings.job_workers, settings.max_job_attempts) == (2, 5)
    assert (settings.limits.max_queued_jobs, settings.limits.max_sessions_per_key) == (8, 7)
    assert ServeSettings.from_json(settings.to_json()) == settings
    assert duration_s("90") == 90 and duration_s("1.5h") == 5400


@pytest.mark.parametrize("argv, message", [
    (["--ttl", "videos=2d"], "KIND=DURATION"),
    (["--ttl", "shots=-1"], "positive duration"),
    (["--cleanup-every", "soon"], "positive duration"),
    (["--job-workers", "0"], "job_workers must be >= 1"),
    (["--job-stale-after-s", "1"], "job_stale_after_s must be >= 2"),
    (["--torch-threads", "0"], "torch_threads must be >= 1"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--image-uri-prefix", "s3://assets/../x"], "image URI prefix"),
    (["--limit", "max_request_pixels=0"], "positive"),
])
def test_bad_retention_job_and_prefix_flags_exit_2(argv, message, monkeypatch, capsys):
    from flows.cli.serve import run_serve

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    try:
        status = run_serve(_serve_args(["--preset", "tiny", *argv]))
    except SystemExit as exc:  # argparse refuses a bad value itself
        status = exc.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_requests_may_name_the_sampling_preset(tmp_path):
    """`sampling_preset` in a shot, session or story request: the same name as
    `--sampling` and `RenderSettings.sampling_preset`, the preset's sampling in the config."""
    from pipelines.serve.schemas import SessionCreate, ShotRequest, StoryRequest
    from pipelines.serve.session_state import PresetConfigs, story_config
    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec

    render = resolve_render_spec(ModelSpec(preset="tiny"), ScorerSpec(preset="tiny"),
                                 RenderSettings(), accelerator=False)
    configs = PresetConfigs(render)
    assert configs.config(None) is render.config
    fast = configs.config("fast")
    assert fast.sampling_preset == "fast" and fast.sampling["step_list"] == [1000, 750, 500, 250]
    assert fast.t2v_sampling == render.config.t2v_sampling  # T2V shots keep their sampling
    # the same config as rendering with --sampling fast
    assert fast == resolve_render_spec(ModelSpec(preset="tiny"), ScorerSpec(preset="tiny"),
                                       RenderSettings(sampling_preset="fast"),
                                       accelerator=False).config
    assert configs.config("standard") == render.config
    for model in (ShotRequest, SessionCreate, StoryRequest):
        assert "sampling_preset" in model.model_fields
    assert ShotRequest(prompt="a", sampling_preset="fast").sampling_preset == "fast"
    with pytest.raises(ValueError):
        SessionCreate(sampling_preset="turbo")
    session = story_config(configs.config(SessionCreate(seed=3, sampling_preset="fast")
                                          .sampling_preset), 3, None)
    assert session.sampling_preset == "fast" and session.seed == 3
