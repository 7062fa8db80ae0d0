"""Retry classification, flow settings and the `storymem flow` command line."""
from __future__ import annotations

import errno

import pytest

from flows.retry_policy import is_transient, retry_options
from storymem_model.storage import StorageError


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (TimeoutError("read timed out"), True),
    (OSError(errno.ETIMEDOUT, "timed out"), True),
    (ConnectionError("Failed to connect to Ray at address: http://head:8265."), True),
    (RuntimeError("Request failed with status code 503: starting"), True),
    (FileNotFoundError("s3://b/missing"), False),
    (PermissionError("denied"), False),
    (ValueError("--scripts x: no such file, folder or prefix"), False),
    (RuntimeError("Request failed with status code 400: bad entrypoint"), False),
    (StorageError("not a storage URI: ''"), False),
])
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_transient_cause_is_found_through_wrappers():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except OSError as inner:
            raise StorageError("cannot read s3://b/k: reset") from inner
    except StorageError as outer:
        assert is_transient(outer)


def test_retry_options_back_off_exponentially():
    options = retry_options(3, 2.0)
    assert options["retries"] == 3 and options["retry_delay_seconds"](3) == [2.0, 4.0, 8.0]
    with pytest.raises(ValueError):
        retry_options(-1, 1)


def test_flow_flags_become_typed_parameters_that_survive_json():
    """`storymem flow` turns its flags into the flow's typed parameters; as JSON (what a
    deployment stores) Prefect validates them back into the same specs."""
    import json

    from flows.cli import build_parser
    from flows.cli.flow import flow_kwargs
    from flows.nightly_render import nightly_render
    from storymem_model.specs import ModelSpec, ScorerSpec

    argv = ["flow", "nightly", "--source", "s3://b/scripts/", "--out", "s3://b/out",
            "--preset", "tiny", "--seed", "7", "--transition", "mm2v", "--steps", "2",
            "--no-reference-sigmas", "--prompt-aware-memory", "--batch-args",
            "--clip-actors 2 --max-attempts 5", "--workers", "2"]
    kwargs = flow_kwargs(build_parser().parse_args(argv))
    assert kwargs["model"] == ModelSpec(preset="tiny")
    assert kwargs["scorers"] == ScorerSpec(preset="tiny")
    render = kwargs["render"]
    assert (render.seed, render.transition, render.prompt_aware_memory) == (7, "mm2v", True)
    assert render.sampling.num_inference_steps == 2
    assert render.sampling.reference_sigmas is False
    batch = kwargs["batch"]
    assert (batch.workers, batch.max_attempts, batch.scorers.clip_actors) == (2, 5, 2)
    stored = json.loads(json.dumps({k: v.to_dict() if hasattr(v, "to_dict") else v
                                    for k, v in kwargs.items()}))
    validated = nightly_render.validate_parameters(stored)
    for name in ("model", "scorers", "render", "batch"):
        assert validated[name] == kwargs[name], name


def test_batch_args_take_run_options_only(capsys):
    from flows.cli import main

    common = ["flow", "nightly", "--source", "x", "--out", "y", "--preset", "tiny"]
    assert main([*common, "--batch-args=--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err
    assert main([*common, "--batch-args=--seed 3"]) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "to `storymem flow` itself" in err
    assert main([*common, "--batch-args=--max-attempts 0"]) == 2
    assert "max_attempts must be >= 1" in capsys.readouterr().err


def test_flow_command_needs_a_model(capsys):
    from flows.cli import main

    assert main(["flow", "nightly", "--source", "x", "--out", "y"]) == 2
    assert "--preset tiny or --model-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flow", "dataset", "--out", "y", "--preset", "tiny"])  # no --source


def test_settings_are_checked_before_any_work():
    """Flow parameters are typed specs: Prefect refuses a bad value before the run does
    any work, naming the field."""
    from prefect.exceptions import ParameterTypeError

    from flows.nightly_render import nightly_render

    base = {"source": "s3://b/scripts/", "out": "s3://b/out"}
    for params, message in (
            ({"model": {"preset": "tiny", "model_dir": "/m"}}, "exactly one of preset"),
            ({"model": {}}, "exactly one of preset"),
            ({"model": {"preset": "tiny"}, "batch": {"workers": 0}}, "workers must be >= 1"),
            ({"model": {"preset": "tiny"}, "render": {"transition": "sideways"}},
             "sideways"),
            ({"model": {"preset": "tiny", "lora": "/l"}}, "lora"),
            ({}, "model")):
        with pytest.raises(ParameterTypeError, match=message):
            nightly_render.validate_parameters({**base, **params})


def test_flow_batch_options_do_not_resolve_the_render_spec(monkeypatch):
    """`storymem flow` resolves the render spec once, in the flow; reading the batch
    options resolves nothing (no model or scorer file is read for them)."""
    import flows.cli.batch as batch_cli
    import flows.cli.model_flags as model_flags
    from flows.cli import build_parser
    from flows.cli.flow import flow_kwargs

    def forbidden(*args, **kwargs):
        raise AssertionError("the render spec was resolved for the batch options")

    monkeypatch.setattr(batch_cli, "render_spec_from_args", forbidden)
    monkeypatch.setattr(model_flags, "render_spec_from_args", forbidden)
    kwargs = flow_kwargs(build_parser().parse_args(
        ["flow", "nightly", "--source", "s3://b/s/", "--out", "s3://b/o", "--preset", "tiny",
         "--workers", "2", "--batch-args", "--story-timeout 60"]))
    assert (kwargs["batch"].workers, kwargs["batch"].story_timeout_s) == (2, 60.0)


def test_flow_lock_flags_belong_to_the_flow_and_run_ids_are_checked(capsys):
    from flows.cli import main

    common = ["flow", "nightly", "--source", "x", "--out", "y", "--preset", "tiny"]
    assert main([*common, "--batch-args=--wait-lock 5"]) == 2
    err = capsys.readouterr().err
    assert "--wait-lock" in err and "--lock-wait/--lock-ttl" in err
    for bad in ("../escape", "night 1", "a" * 129, "-night"):
        assert main([*common, f"--run-id={bad}"]) == 2
        assert "run_id" in capsys.readouterr().err


def test_a_ray_job_past_its_timeout_is_stopped_and_not_retried():
    from flows.ray_job import RayJobTimeout, wait_for_job

    class StuckJobs:
        def __init__(self):
            self.status, self.stops = "RUNNING", []

        def get_job_info(self, submission_id):
            class Info:
                status = self.status
                message = ""
            return Info()

        def get_job_status(self, submission_id):
            return self.status

        def stop_job(self, submission_id):
            self.stops.append(submission_id)
            self.status = "STOPPED"
            return True

    client = StuckJobs()
    with pytest.raises(RayJobTimeout) as info:
        wait_for_job(client, "storymem-nightly-x", poll_s=0.01, timeout_s=0.05)
    assert client.stops == ["storymem-nightly-x"]
    assert "it was stopped (STOPPED)" in str(info.value)
    assert not is_transient(info.value)  # a limit on the work: the task is not retried
