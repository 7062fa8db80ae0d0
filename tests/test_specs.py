"""Specs: frozen, validated, JSON round trip; resolved without loading any weights."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pipelines.batch.spec import BatchOptions, BatchSpec, ScorerPoolOptions
from storymem_model.render_config import RenderConfig
from storymem_model.render_spec import RenderSpec, resolve_render_spec
from storymem_model.spec_json import SpecError
from storymem_model.specs import (ModelSpec, RenderSettings, SamplingOverrides, ScorerSpec)

TINY_MODEL = ModelSpec(preset="tiny")
TINY_SCORERS = ScorerSpec(preset="tiny")


def _every_spec():
    settings = RenderSettings(transition="mm2v", seed=7, max_memory=8, memory_sink=2,
                              rope_shift=None, negative_prompt="blurry",
                              sampling=SamplingOverrides(num_inference_steps=3,
                                                         cfg_mode="sequential"),
                              t2v_sampling=SamplingOverrides(shift=10.0), height=48)
    render = resolve_render_spec(TINY_MODEL, TINY_SCORERS, settings, accelerator=False)
    batch = BatchSpec(scripts="s3://b/scripts/", out="s3://b/out", render=render,
                      options=BatchOptions(workers=2, story_timeout_s=30.0,
                                           scorers=ScorerPoolOptions(clip_actors=2)),
                      run_id="nightly-1")
    return [TINY_MODEL.resolved(False), TINY_SCORERS, settings, settings.sampling,
            render, render.config, batch,
            ModelSpec(model_dir="/m/i2v", t2v_model_dir="/m/t2v", lora_dir="/m/lora",
                      lora_strength=0.5, device="cuda:1", dtype="bf16", offload="model"),
            ScorerSpec(clip_checkpoint="/c.pt", hps_checkpoint="/h.safetensors",
                       hps_base_model="/qwen", gate_threshold=2.5)]


@pytest.mark.parametrize("spec", _every_spec(), ids=lambda s: type(s).__name__)
def test_specs_round_trip_through_json(spec):
    text = spec.to_json()
    json.loads(text)  # plain JSON
    again = type(spec).from_json(text)
    assert again == spec
    assert again.to_json() == text
    assert dataclasses.is_dataclass(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, dataclasses.fields(spec)[0].name, None)


def test_round_trip_keeps_the_config_hash_and_nested_types():
    render = _every_spec()[4]
    again = RenderSpec.from_json(render.to_json())
    assert isinstance(again.model, ModelSpec) and isinstance(again.config, RenderConfig)
    assert again.config_hash == render.config_hash
    assert again.config.rope_shift is None and again.config.transition == "mm2v"
    assert again.config.t2v_sampling["shift"] == 10.0
    assert again.config.sampling["cfg_mode"] == "sequential"


@pytest.mark.parametrize("cls, data, message", [
    (ModelSpec, {}, "give exactly one of preset (tiny) or model_dir"),
    (ModelSpec, {"preset": "tiny", "model_dir": "/m"}, "give exactly one of preset"),
    (ModelSpec, {"preset": "huge"}, "preset must be one of tiny"),
    (ModelSpec, {"preset": "tiny", "dtype": "int8"}, "dtype must be one of"),
    (ModelSpec, {"preset": "tiny", "device": "cpu", "offload": "model"}, "needs device cuda"),
    (ModelSpec, {"preset": "tiny", "colour": "red"}, "unknown field(s) ['colour']"),
    (ModelSpec, {"preset": "tiny", "lora_strength": "strong"}, "expected a number"),
    (ScorerSpec, {}, "need clip_checkpoint"),
    (ScorerSpec, {"clip_checkpoint": "/c", "hps_checkpoint": "/h"}, "needs both hps_checkpoint"),
    (ScorerSpec, {"preset": "tiny", "clip_checkpoint": "/c"}, "builds its own CLIP"),
    (RenderSettings, {"transition": "fade"}, "transition must be one of mi2v, mm2v, none"),
    (RenderSettings, {"seed": -1}, "seed must be >= 0"),
    (RenderSettings, {"memory": False, "references": ["a.png"]}, "cannot use reference"),
    (RenderSettings, {"sampling": {"steps": 3}}, "unknown field(s) ['steps']"),
    (RenderSettings, {"sampling": {"cfg_mode": "both"}}, "cfg_mode must be one of"),
    (SamplingOverrides, {"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
    (SamplingOverrides, {"boundary_ratio": 1.5}, "boundary_ratio must be <= 1"),
    (BatchOptions, {"workers": 0}, "workers must be >= 1"),
    (BatchOptions, {"progress": "loud"}, "progress must be one of auto, bar, log"),
])
def test_bad_specs_are_refused_naming_the_field(cls, data, message):
    with pytest.raises(SpecError) as info:
        cls.from_dict(data)
    assert message in str(info.value)


def test_memory_off_means_no_transition_and_no_scorers():
    settings = RenderSettings(memory=False, transition="mi2v")
    assert settings.transition == "none"
    render = resolve_render_spec(TINY_MODEL, TINY_SCORERS, settings, accelerator=False)
    assert render.scorers is None
    assert (render.config.embedder_id, render.config.gate_id) == ("", "")
    with pytest.raises(ValueError, match="needs keyframe scorers"):
        resolve_render_spec(TINY_MODEL, None, RenderSettings(), accelerator=False)


def test_device_and_dtype_are_resolved_at_the_edge():
    assert TINY_MODEL.resolved(False).to_dict() == {
        **TINY_MODEL.to_dict(), "device": "cpu", "dtype": "float32"}
    gpu = TINY_MODEL.resolved(True)
    assert (gpu.device, gpu.dtype) == ("cuda", "bfloat16")
    assert ModelSpec(preset="tiny", dtype="fp16").resolved(True).dtype == "float16"
    cpu = resolve_render_spec(TINY_MODEL, TINY_SCORERS, RenderSettings(), accelerator=False)
    gpu = resolve_render_spec(TINY_MODEL, TINY_SCORERS, RenderSettings(), accelerator=True)
    assert cpu.config.dtype == "float32" and gpu.config.dtype == "bfloat16"
    assert cpu.config_hash != gpu.config_hash  # dtype changes pixels; the device alone not
    cuda1 = resolve_render_spec(TINY_MODEL.replace(device="cuda:1"), TINY_SCORERS,
                                RenderSettings(), accelerator=True)
    assert cuda1.config_hash == gpu.config_hash


def test_resolution_loads_no_weights_and_matches_the_loaded_model():
    code = (
        "import sys, json\n"
        "from storymem_model.render_spec import resolve_render_spec\n"
        "from storymem_model.specs import ModelSpec, ScorerSpec, RenderSettings\n"
        "spec = resolve_render_spec(ModelSpec(preset='tiny'), ScorerSpec(preset='tiny'),\n"
        "                           RenderSettings(seed=3), accelerator=False)\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'open_clip', 'transformers')\n"
        "               if m in sys.modules)\n"
        "print(json.dumps({'hash': spec.config_hash, 'heavy': heavy}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []  # not even imported, let alone loaded
    import storymem_model
    from storymem_model.scorers import build_scorers

    loaded = RenderConfig.for_pipeline(storymem_model.load_pipeline("tiny"),
                                       build_scorers("tiny"), seed=3)
    assert loaded.config_hash() == result["hash"]
