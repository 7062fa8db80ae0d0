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


def test_model_flags_round_trip_through_the_cli():
    from flows.cli import build_parser
    from flows.cli_flow import flow_kwargs, model_flags

    argv = ["flow", "nightly", "--source", "s3://b/scripts/", "--out", "s3://b/out",
            "--preset", "tiny", "--seed", "7", "--transition", "mm2v", "--steps", "2",
            "--no-reference-sigmas", "--prompt-aware-memory", "--batch-args",
            "--clip-actors 2 --max-attempts 5", "--workers", "2"]
    args = build_parser().parse_args(argv)
    flags = model_flags(args)
    assert flags[:2] == ["--preset", "tiny"]
    assert {"--no-reference-sigmas", "--prompt-aware-memory"} <= set(flags)
    kwargs = flow_kwargs(args)
    assert kwargs["preset"] == "tiny" and "--preset" not in kwargs["render_args"]
    assert kwargs["render_args"][kwargs["render_args"].index("--seed") + 1] == "7"
    assert kwargs["batch_args"] == ["--clip-actors", "2", "--max-attempts", "5"]
    # The flags give back the same settings when parsed again.
    again = build_parser().parse_args(["flow", "nightly", "--source", "x", "--out", "y",
                                       *flags])
    for name in ("seed", "transition", "num_inference_steps", "reference_sigmas",
                 "prompt_aware_memory", "preset"):
        assert getattr(again, name) == getattr(args, name)


def test_flow_command_needs_a_model(capsys):
    from flows.cli import main

    assert main(["flow", "nightly", "--source", "x", "--out", "y"]) == 2
    assert "--preset tiny or --model-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flow", "dataset", "--out", "y", "--preset", "tiny"])  # no --source


def test_settings_are_checked_before_any_work(tmp_path):
    from flows.batch_launch import BatchArgsError
    from flows.render_options import RenderOptionsError, model_argv
    from flows.render_stage import check_settings

    with pytest.raises(RenderOptionsError, match="not both"):
        model_argv(preset="tiny", model_dir="/m")
    with pytest.raises(RenderOptionsError, match="no model"):
        model_argv()
    with pytest.raises(BatchArgsError, match="--no-such-flag"):
        check_settings(str(tmp_path), ["--preset", "tiny"], 1, 0.0, ["--no-such-flag"])
    with pytest.raises(ValueError, match="workers"):
        check_settings(str(tmp_path), ["--preset", "tiny"], 0, 0.0, [])
