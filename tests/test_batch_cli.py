"""`storymem batch` flags, `--spec`, and the errors that stop a batch before any Ray work."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from pipelines.batch import BatchError, BatchOptions, BatchSpec, run_batch
from storymem_model.spec_json import SpecError


def test_help_lists_the_batch_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--scripts", "--out", "--workers", "--gpus-per-worker", "--ray-address",
                 "--preset", "--model-dir", "--lora-dir", "--steps", "--scorer-batch-size",
                 "--scorer-max-wait", "--hps-checkpoint", "--max-attempts", "--consistency",
                 "--spec"):
        assert flag in text, flag


@pytest.mark.parametrize("argv, message", [
    (["--scripts", "{tmp}/missing", "--preset", "tiny"], "no such file, folder or prefix"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--workers", "0"],
     "workers must be >= 1"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--hps-checkpoint", "x.pt"],
     "needs both hps_checkpoint and hps_base_model"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--num-frames", "10"],
     "num_frames must be 4k+1"),
    (["--scripts", "{tmp}/ok.json"], "give --preset tiny or --model-dir"),
    (["--scripts", "{tmp}/ok.json", "--model-dir", "{tmp}"], "--clip-checkpoint"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--references", "{tmp}/nope.png"],
     "nope.png"),
    (["--scripts", "{tmp}/ok.json", "--preset", "tiny", "--no-memory", "--consistency"],
     "consistency is measured with the CLIP scorer"),
    (["--preset", "tiny"], "give --scripts URI and --out URI"),
    (["--spec", "{tmp}/no-spec.json"], "no-spec.json: no such file"),
    (["--spec", "{tmp}/ok.json"], "BatchSpec"),
    (["--spec", "{tmp}/spec.json", "--workers", "2"], "drop --workers"),
])
def test_unusable_settings_exit_2_with_a_message_before_ray_starts(tmp_path, capsys, argv,
                                                                    message,
                                                                    small_tiny_render):
    (tmp_path / "ok.json").write_text(json.dumps(["a lighthouse at night"]))
    spec = BatchSpec(scripts=str(tmp_path / "ok.json"), out=str(tmp_path / "out"),
                     render=small_tiny_render)
    (tmp_path / "spec.json").write_text(spec.to_json())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--spec" not in argv and "--scripts" in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main(["batch", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_flags_become_one_batch_spec_that_round_trips_through_json(tmp_path,
                                                                   small_tiny_render):
    import argparse

    from conftest import SMALL_TINY_FLAGS
    from flows.cli.batch import add_batch_command, batch_spec_from_args

    parser = argparse.ArgumentParser(prog="storymem")
    add_batch_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", "--scripts", "s3://b/scripts", "--out", "s3://b/out",
                              "--workers", "3", "--clip-actors", "2", "--story-timeout", "60",
                              "--run-id", "night-1", *SMALL_TINY_FLAGS])
    spec = batch_spec_from_args(args)
    assert spec.render == small_tiny_render  # the same resolution as every other host
    assert spec.render.config_hash == small_tiny_render.config_hash
    assert (spec.options.workers, spec.options.scorers.clip_actors,
            spec.options.story_timeout_s, spec.run_id) == (3, 2, 60.0, "night-1")
    assert spec.render.model.device == "cpu"  # no GPU per worker: resolved for the CPU
    assert BatchSpec.from_json(spec.to_json()) == spec
    gpu = batch_spec_from_args(parser.parse_args(["batch", "--scripts", "x", "--out", "y",
                                                  "--gpus-per-worker", "1", "--preset",
                                                  "tiny"]))
    assert (gpu.render.model.device, gpu.render.model.dtype) == ("cuda", "bfloat16")


def test_python_entry_point_checks_its_arguments(tmp_path, small_tiny_render):
    with pytest.raises(SpecError, match="max_attempts"):
        BatchOptions(max_attempts=0)
    with pytest.raises(SpecError, match="run_id"):
        BatchSpec(scripts=str(tmp_path), out=str(tmp_path / "out"), render=small_tiny_render,
                  run_id="../escape")
    with pytest.raises(SpecError, match="workers get no GPU"):
        BatchSpec(scripts=str(tmp_path), out=str(tmp_path / "out"),
                  render=small_tiny_render.replace(
                      model=small_tiny_render.model.replace(device="cuda")))
    with pytest.raises(SpecError, match="unknown field"):
        BatchSpec.from_dict({**BatchSpec(scripts="a", out="b", render=small_tiny_render)
                             .to_dict(), "model_args": ["--preset", "tiny"]})
    with pytest.raises(TypeError, match="BatchSpec"):
        run_batch({"scripts": str(tmp_path), "out": str(tmp_path / "out")})


@pytest.mark.ray
def test_a_batch_bigger_than_the_local_cluster_is_refused(ray_cluster, tmp_path,
                                                          small_tiny_render):
    (tmp_path / "ok.json").write_text(json.dumps(["a lighthouse at night"]))
    options = BatchOptions(workers=8, cpus_per_worker=1.0, progress="log")
    with pytest.raises(BatchError, match="CPUs .cluster has 2"):
        run_batch(BatchSpec(scripts=str(tmp_path / "ok.json"), out=str(tmp_path / "out"),
                            render=small_tiny_render, options=options))
    assert _nothing_but_a_released_lock(tmp_path / "out")


def _nothing_but_a_released_lock(out: Path, logs_of: str | None = None) -> bool:
    """The batch held the output lock (OUT/_locks/) and released it; nothing else exists:
    no story, no run table - only, with `logs_of`, that run's logs (written as it went)."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    logs = f"runs/{logs_of}/logs/parts/" if logs_of else None
    return not (out / "_locks" / "render.json").exists() and \
        all(f.startswith("_locks/") or (logs and f.startswith(logs)) for f in files)


def unloadable_model(folder: Path) -> Path:
    """An original-layout Wan2.2 folder whose content ids resolve (every file is there) but
    whose experts cannot load: their config.json lacks the architecture."""
    for sub in ("high_noise_model", "low_noise_model"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps({"model_type": "i2v"}))
    for sub in ("vae", "text_encoder", "tokenizer"):
        (folder / "components" / sub).mkdir(parents=True)
        (folder / "components" / sub / "config.json").write_text("{}")
    return folder


@pytest.mark.ray
def test_a_model_no_worker_can_load_stops_the_batch_with_the_cause(ray_cluster, tmp_path):
    """Without memory there are no scorers: the batch starts no scorer actor at all."""
    import ray

    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.specs import ModelSpec, RenderSettings

    (tmp_path / "ok.json").write_text(json.dumps(["a lighthouse at night"]))
    folder = unloadable_model(tmp_path / "unloadable-model")
    render = resolve_render_spec(
        ModelSpec(model_dir=str(folder), components_dir=str(folder / "components")), None,
        RenderSettings(memory=False), accelerator=False)
    assert render.scorers is None
    options = BatchOptions(workers=1, cpus_per_worker=0.25, progress="log")
    spec = BatchSpec(scripts=str(tmp_path / "ok.json"), out=str(tmp_path / "out"),
                     render=render, options=options, run_id="unloadable")
    with pytest.raises(BatchError, match="could not load the model") as info:
        run_batch(spec)
    assert "unloadable-model/high_noise_model" in str(info.value)
    assert "original Wan config lacks" in str(info.value)
    assert _nothing_but_a_released_lock(tmp_path / "out", logs_of="unloadable")
    worker_log = next((tmp_path / "out" / "runs" / "unloadable" / "logs" / "parts" /
                       "storymem-unloadable-worker-0").iterdir()).read_text()
    assert "original Wan config lacks" in worker_log  # the failed run's log is kept
    # every actor this cluster ever had, dead ones included (GCS table, no dashboard here)
    names = [a["Name"] for a in ray._private.state.actors().values()]
    assert "storymem-unloadable-worker-0" in names
    assert not [n for n in names if n.startswith("storymem-unloadable-")
                and n != "storymem-unloadable-worker-0" and not n.endswith("-progress")]


@pytest.mark.ray
def test_spec_file_runs_the_batch_without_memory_and_without_scorer_actors(
        ray_cluster, tmp_path, capsys, small_tiny_render):
    """`storymem batch --spec FILE`: the path a Ray job takes. Memory off: no scorers."""
    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.specs import ModelSpec, RenderSettings, SamplingOverrides

    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "a.json").write_text(json.dumps(["a lighthouse", "a storm"]))
    render = resolve_render_spec(
        ModelSpec(preset="tiny"), None,
        RenderSettings(memory=False, num_frames=9, height=32, width=32,
                       sampling=SamplingOverrides(num_inference_steps=2)), accelerator=False)
    out = tmp_path / "out"
    spec = BatchSpec(scripts=str(tmp_path / "scripts"), out=str(out), render=render,
                     options=BatchOptions(workers=1, cpus_per_worker=0.25, progress="log"),
                     run_id="from-spec")
    (tmp_path / "spec.json").write_text(spec.to_json(indent=1))
    assert main(["batch", "--spec", str(tmp_path / "spec.json")]) == 0
    assert "run from-spec: 1 rendered, 0 skipped, 0 failed" in capsys.readouterr().out
    saved = json.loads((out / "runs" / "from-spec" / "summary.json").read_text())
    assert saved["config_hash"] == render.config_hash != small_tiny_render.config_hash
    assert saved["scorers"] == {} and saved["scorer_calls_per_shot"] == 0.0
    stories = pq.read_table(io.BytesIO((out / "runs" / "from-spec" / "stories.parquet")
                                       .read_bytes())).to_pylist()
    assert [(r["status"], r["shots_rendered"]) for r in stories] == [("rendered", 2)]
    shots = pq.read_table(str(out / "runs" / "from-spec" / "shots.parquet")).to_pylist()
    assert {r["mode"] for r in shots} <= {"t2v", "m2v-no-memory"}
    assert all(r["keyframe_ids"] == [] for r in shots)


# ---------------------------------------------------------------------------------------
# The output lock: the batch driver holds OUT/_locks/render.json while it runs.
def test_a_batch_on_a_locked_output_exits_2_at_once_naming_the_holder(tmp_path, capsys):
    import time

    from conftest import SMALL_TINY_FLAGS
    from storymem_model.output_lock import OutputLock

    (tmp_path / "ok.json").write_text(json.dumps(["a lighthouse at night"]))
    out = str(tmp_path / "out")
    with OutputLock(out, owner="storymem render of a colleague", ttl_s=60):
        started = time.monotonic()
        code = main(["batch", "--scripts", str(tmp_path / "ok.json"), "--out", out,
                     "--progress", "log", *SMALL_TINY_FLAGS])
        assert code == 2 and time.monotonic() - started < 15  # no Ray was started
    err = capsys.readouterr().err
    assert "locked by another run" in err and "'storymem render of a colleague'" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_locks"]


@pytest.mark.ray
def test_a_batch_that_loses_the_lock_stops_and_kills_its_workers(ray_cluster, tmp_path,
                                                                  small_tiny_render):
    """Another run takes the lease over mid-run: the driver stops submitting, kills its
    workers and raises OutputLockLost naming the lock; rows recorded so far stay."""
    import time

    import ray

    from storymem_model.output_lock import lock_uri
    from pipelines.batch.driver import OutputLockLost
    from storymem_model import storage

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for i in range(3):
        (scripts / f"{i}.json").write_text(json.dumps(
            [f"story {i}: a lighthouse", f"story {i}: a storm", f"story {i}: calm sea"]))
    out = str(tmp_path / "out")
    foreign = {"owner": "the run that took over", "token": "theirs", "acquired_at": 0,
               "renewed_at": 0, "expires_at": time.time() + 600}

    def take_over(event):
        if type(event).__name__ == "ShotRendered" and not storage.exists(lock_uri(out) + ".x"):
            storage.write_bytes(lock_uri(out) + ".x", b"")  # once
            storage.write_bytes(lock_uri(out), json.dumps(foreign).encode())

    options = BatchOptions(workers=1, cpus_per_worker=0.25, progress="log")
    spec = BatchSpec(scripts=str(scripts), out=out, render=small_tiny_render, options=options,
                     run_id="lost-lock", lock_ttl_s=0.6)
    started = time.monotonic()
    with pytest.raises(OutputLockLost) as info:
        run_batch(spec, on_event=take_over)
    assert f"the output lock {lock_uri(out)} was lost" in str(info.value)
    assert "workers are killed" in str(info.value)
    assert time.monotonic() - started < 300
    with pytest.raises(ValueError):  # killed for good: the name is free
        ray.get_actor("storymem-lost-lock-worker-0")
    run = tmp_path / "out" / "runs" / "lost-lock"
    assert not (run / "summary.json").exists()
    committed = [p for p in (tmp_path / "out").glob("*/*/_COMMITTED.json")]
    assert len(committed) < 3  # it stopped before the end
    assert json.loads(Path(lock_uri(out)).read_text())["owner"] == "the run that took over"
