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
