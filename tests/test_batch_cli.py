"""`storymem batch` flags and the errors that stop a batch before any Ray work."""
from __future__ import annotations

import json

import pytest

from flows.cli import main
from pipelines.batch_render import BatchError, BatchOptions, model_args_from, run_batch


def test_help_lists_the_batch_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--scripts", "--out", "--workers", "--gpus-per-worker", "--ray-address",
                 "--preset", "--model-dir", "--lora-dir", "--steps", "--scorer-batch-size",
                 "--scorer-max-wait", "--hps-checkpoint", "--max-attempts", "--consistency"):
        assert flag in text, flag


@pytest.mark.parametrize("argv, message", [
    (["--scripts", "{tmp}/missing", "--preset", "tiny"], "no such file, folder or prefix"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--workers", "0"],
     "workers must be at least 1"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--hps-checkpoint", "x.pt"],
     "needs both --hps-checkpoint and --hps-base-model"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--num-frames", "10"],
     "num_frames must be 4k+1"),
    (["--scripts", "{tmp}/ok.json"], "give --preset tiny or --model-dir"),
    (["--scripts", "{tmp}/ok.json", "--model-dir", "{tmp}"], "--clip-checkpoint"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--references", "{tmp}/nope.png"],
     "nope.png"),
])
def test_unusable_settings_exit_2_with_a_message_before_ray_starts(tmp_path, capsys, argv,
                                                                    message):
    (tmp_path / "ok.json").write_text(json.dumps(["a lighthouse at night"]))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["batch", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_python_entry_point_checks_its_arguments(tmp_path):
    with pytest.raises(BatchError, match="unknown model options"):
        model_args_from({"preset": "tiny", "no_such_flag": 1})
    with pytest.raises(BatchError, match="invalid model flags"):
        model_args_from(["--preset", "huge"])
    assert model_args_from(None).preset == "tiny"
    assert model_args_from({"preset": "tiny", "seed": 4}).seed == 4
    with pytest.raises(BatchError, match="max_attempts"):
        run_batch(str(tmp_path), str(tmp_path / "out"), options=BatchOptions(max_attempts=0))
    with pytest.raises(BatchError, match="run_id"):
        run_batch(str(tmp_path), str(tmp_path / "out"), run_id="../escape")


@pytest.mark.ray
def test_a_batch_bigger_than_the_local_cluster_is_refused(ray_cluster, tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps(["a lighthouse at night"]))
    options = BatchOptions(workers=8, cpus_per_worker=1.0, progress=False)
    with pytest.raises(BatchError, match="CPUs .cluster has 2"):
        run_batch(str(tmp_path / "ok.json"), str(tmp_path / "out"), ["--preset", "tiny"],
                  options=options)
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_a_model_no_worker_can_load_stops_the_batch_with_the_cause(ray_cluster, tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps(["a lighthouse at night"]))
    options = BatchOptions(workers=1, cpus_per_worker=0.25, progress=False)
    args = ["--preset", "tiny", "--lora-dir", str(tmp_path / "no-such-lora")]
    with pytest.raises(BatchError, match="could not load the model") as info:
        run_batch(str(tmp_path / "ok.json"), str(tmp_path / "out"), args, options=options)
    assert "no-such-lora" in str(info.value)
    assert not (tmp_path / "out").exists()
