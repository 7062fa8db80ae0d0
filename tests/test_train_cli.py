"""`storymem train` flags -> typed specs, checked before anything runs (no Ray, no model):
defaults, JSON round trips, every unusable value named, exit status 2 in seconds."""
from __future__ import annotations

import argparse
import json
import time

import pytest

from storymem_model.spec_json import SpecError
from storymem_model.specs import ModelSpec, ScorerSpec
from storymem_model.training.specs import FitSpec, PrepareSpec, ValidationSpec


def _parse(argv):
    from flows.cli import build_parser

    return build_parser().parse_args(argv)


def test_prepare_flags_become_a_prepare_spec():
    from flows.cli.train import prepare_spec_from_args

    args = _parse(["train", "prepare", "--clips", "s3://b/clips.jsonl", "--out", "s3://b/prepared",
                   "--preset", "tiny", "--workers", "3", "--gpus-per-worker", "1", "--group-threshold", "0.8"])
    spec = prepare_spec_from_args(args)
    assert spec == PrepareSpec(clips="s3://b/clips.jsonl", out="s3://b/prepared", model=ModelSpec(preset="tiny"),
                               scorers=ScorerSpec(preset="tiny"), height=64, width=64, num_frames=17, fps=16.0,
                               group_threshold=0.8, workers=3, gpus_per_worker=1.0)
    assert PrepareSpec.from_json(spec.to_json()) == spec
    real = prepare_spec_from_args(_parse(["train", "prepare", "--clips", "c.jsonl", "--out", "o",
                                          "--model-dir", "/models/wan", "--clip-checkpoint", "clip.pt",
                                          "--aesthetic-head", "head.pth", "--aesthetic-clip-checkpoint", "l14.pt"]))
    assert (real.height, real.width, real.num_frames) == (480, 832, 81)  # the released training size


def test_fit_flags_become_a_fit_spec():
    from flows.cli.train import fit_spec_from_args

    args = _parse(["train", "fit", "--data", "d", "--out", "o", "--preset", "tiny", "--steps", "20", "--expert", "low",
                   "--workers", "4", "--gpus-per-worker", "1", "--mm2v-prob", "0.5", "--mi2v-prob", "0",
                   "--rope-shift", "0", "--parallel", "ddp", "--no-gradient-checkpointing"])
    spec = fit_spec_from_args(args)
    assert spec.experts == ("low",) and spec.rope_shift is None and spec.parallel == "ddp"
    assert not spec.gradient_checkpointing and spec.samples_per_step == 4
    assert spec.rank == 8 and spec.alpha == 8.0  # the tiny preset's LoRA rank, alpha = rank
    assert (spec.lr, spec.max_memory, spec.checkpoint_uri) == (1e-5, 10, "o/checkpoints")
    assert FitSpec.from_json(spec.to_json()) == spec
    real = FitSpec(data="d", out="o", model=ModelSpec(model_dir="/m"), steps=1)
    assert (real.rank, real.alpha, real.experts) == (128, 128.0, ("high", "low"))


def test_validation_flags_use_the_training_settings(tmp_path):
    from flows.cli.train import fit_spec_from_args
    from storymem_model import storage
    from storymem_model.training.prepared import MANIFEST_FILE, PREPARED_FORMAT

    (tmp_path / MANIFEST_FILE).write_text(json.dumps({
        "format": PREPARED_FORMAT, "shards": [{"key": "shards/00000.parquet", "rows": 1}],
        "geometry": {"height": 32, "width": 48, "num_frames": 9}}))
    storage.write_commit_marker(str(tmp_path), [MANIFEST_FILE])  # committed prepared data
    args = _parse(["train", "fit", "--data", str(tmp_path), "--out", "o", "--preset", "tiny", "--steps", "4",
                   "--validate-every", "2", "--validation-script", "story.json", "--validation-steps", "3",
                   "--mm2v-prob", "0.6", "--mi2v-prob", "0.1", "--fix-mem", "2"])
    validation = fit_spec_from_args(args).validation
    assert isinstance(validation, ValidationSpec) and validation.script == "story.json"
    settings = validation.settings
    assert (settings.height, settings.width, settings.num_frames) == (32, 48, 9)
    assert (settings.transition, settings.fix_mem, settings.rope_shift) == ("mm2v", 2, 5)
    assert settings.sampling.num_inference_steps == 3 and validation.scorers == ScorerSpec(preset="tiny")
    assert validation.video_encoder.preset == "tiny" and validation.video_encoder.viclip is None
    from flows.cli.model_flags import ArgumentsError

    real = _parse(["train", "fit", "--data", "d", "--out", "o", "--model-dir", "/m", "--clip-checkpoint", "c.pt",
                   "--aesthetic-head", "h.pth", "--aesthetic-clip-checkpoint", "l.pt", "--steps", "4",
                   "--validate-every", "2", "--validation-script", "story.json"])
    with pytest.raises(ArgumentsError, match="needs --validation-encoder"):
        fit_spec_from_args(real)
    real.validation_encoder = "/models/ViCLIP-L-14.pth"
    assert fit_spec_from_args(real).validation.video_encoder.viclip == "/models/ViCLIP-L-14.pth"


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--steps", "5", "--mi2v-prob", "0.7", "--mm2v-prob", "0.6"], "mi2v_prob + mm2v_prob must be <= 1"),
    (["--steps", "5", "--validate-every", "2"], "--validate-every needs --validation-script"),
    (["--steps", "5", "--boundary-ratio", "1"], "leaves the high-noise expert no timesteps"),
])
def test_unusable_fit_flags_exit_2_naming_the_problem(argv, message, capsys):
    from flows.cli import main

    started = time.perf_counter()
    rc = main(["train", "fit", "--data", "d", "--out", "o", "--preset", "tiny", *argv])
    assert rc == 2 and message in capsys.readouterr().err
    assert time.perf_counter() - started < 10


def test_unusable_prepare_flags_exit_2(capsys):
    from flows.cli import main

    assert main(["train", "prepare", "--clips", "c.jsonl", "--out", "o", "--preset", "tiny",
                 "--num-frames", "10"]) == 2
    assert "num_frames must be 4k+1" in capsys.readouterr().err
    assert main(["train", "prepare", "--clips", "c.jsonl", "--out", "o", "--model-dir", "/m"]) == 2
    assert "real models need real keyframe scorers" in capsys.readouterr().err
    assert main(["train", "prepare", "--clips", "c.jsonl", "--out", "o", "--preset", "tiny",
                 "--device", "cuda"]) == 2
    assert "needs GPU workers" in capsys.readouterr().err


def test_specs_refuse_bad_values_by_name():
    with pytest.raises(SpecError, match="leave lora_dir and distill_lora_dir unset"):
        FitSpec(data="d", out="o", model=ModelSpec(preset="tiny", lora_dir="x"), steps=1)
    with pytest.raises(SpecError, match="leave model.device unset"):
        FitSpec(data="d", out="o", model=ModelSpec(preset="tiny", device="cuda"), steps=1)
    with pytest.raises(SpecError, match="parallel must be one of fsdp, ddp"):
        FitSpec(data="d", out="o", model=ModelSpec(preset="tiny"), steps=1, parallel="zero3")
    with pytest.raises(SpecError, match="memory_sink"):
        PrepareSpec(clips="c", out="o", model=ModelSpec(preset="tiny"), scorers=ScorerSpec(preset="tiny"),
                    height=32, width=32, num_frames=9, memory_candidates=2, memory_sink=3)
    with pytest.raises(SpecError, match="height must be a multiple of 16"):
        PrepareSpec(clips="c", out="o", model=ModelSpec(preset="tiny"), scorers=ScorerSpec(preset="tiny"),
                    height=40, width=32, num_frames=9)
    with pytest.raises(SpecError, match="unknown field"):
        FitSpec.from_dict({"data": "d", "out": "o", "model": {"preset": "tiny"}, "steps": 1, "epochs": 3})


def test_fit_on_data_that_is_not_prepared_fails_in_seconds(tmp_path, capsys):
    from flows.cli import main

    started = time.perf_counter()
    assert main(["train", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "tiny",
                 "--steps", "2"]) == 2
    assert "no committed prepared data" in capsys.readouterr().err
    # prepared with another model: refused before training
    (tmp_path / "_COMMITTED.json").write_text(json.dumps({"files": []}))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "shards": [{"key": "s", "rows": 1}],
                                                        "model": {"model_id": "wan-other"}}))
    assert main(["train", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "tiny",
                 "--steps", "2"]) == 2
    assert "was prepared with model wan-other" in capsys.readouterr().err
    assert time.perf_counter() - started < 10


def test_a_parquet_manifest_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storymem_model.training.clip_manifest import clip_id_for, read_clip_inputs

    path = tmp_path / "clips.parquet"
    pq.write_table(pa.table({"clip_uri": ["a.mp4", "b.mp4", "c.mp4"], "caption": ["one", "two", "three"],
                             "group_id": ["g", "g", None], "order": [1, 0, None]}), path)
    clips, errors = read_clip_inputs(str(path))
    assert errors == []
    assert [(c.clip_uri, c.caption, c.group_id, c.order, c.position) for c in clips] == \
        [("a.mp4", "one", "g", 1, 0), ("b.mp4", "two", "g", 0, 1), ("c.mp4", "three", None, None, 2)]
    assert clips[0].clip_id == clip_id_for("a.mp4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clip_uri": "a.mp4", "caption": "x", "order": 2}\n{"clip_uri": "b.mp4", "caption": "y", '
                   '"group_id": "g", "order": 1.5}\n')
    clips, errors = read_clip_inputs(str(bad))
    assert clips == [] and [e.reason for e in errors] == ["order without group_id", "order must be an integer, got 1.5"]


def test_nothing_below_the_cli_takes_a_namespace():
    """The layers under flows/cli receive specs: their entry points take no Namespace."""
    import inspect

    from flows import train_lora
    from pipelines.training import fit, prepare

    for function in (prepare.run_prepare, fit.run_fit, train_lora.train_lora.fn):
        for parameter in inspect.signature(function).parameters.values():
            assert parameter.annotation is not argparse.Namespace
    assert "argparse" not in inspect.getsource(fit) + inspect.getsource(prepare)


def test_the_model_layer_of_training_is_pure_torch():
    """storymem_model/training never imports Ray, Prefect or argparse."""
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "storymem_model" / "training"
    for path in folder.glob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(ray|prefect|argparse|fastapi)\b", source, re.M), path.name
