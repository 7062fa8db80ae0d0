"""RenderConfig: every pixel-changing field changes the hash; bad values are refused."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from storymem_model.render_config import ConfigError, RenderConfig

BASE = RenderConfig(model_id="tiny", height=64, width=64, num_frames=17,
                    sampling={"num_inference_steps": 4, "shift": 4.0})

CHANGES = {
    "model_id": "other", "lora_id": "lora:abc", "t2v_model_id": "t2v", "dtype": "bfloat16",
    "transition": "mm2v", "seed": 1, "max_memory": 9, "memory_sink": 2, "rope_shift": None,
    "prompt_aware_memory": True, "negative_prompt": "blurry",
    "sampling": {"num_inference_steps": 5, "shift": 4.0}, "height": 48, "width": 80,
    "num_frames": 21, "fps": 24, "keyframe_threshold": 0.8, "keyframe_step": 0.02,
    "max_keyframes": 2, "gate_threshold": 2.5, "duplicate_threshold": 0.95,
    "embedder_id": "clip-b", "gate_id": "hps", "references_sha256": ("ab" * 32,),
    "memory": False, "t2v_sampling": {"num_inference_steps": 4, "shift": 12.0},
    "distill_lora_id": "distill:abc", "storage_dtype": "float8_e4m3fn",
    "attention_backend": "flash", "compiled": True, "fix_mem": 2, "sampling_preset": "fast",
    "keyframe_preprocess": "direct",
}


def test_every_field_is_in_the_hash():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(RenderConfig)}
    hashes = {BASE.config_hash()}
    for name, value in CHANGES.items():
        changed = BASE.replace(**{name: value})
        hashes.add(changed.config_hash())
    assert len(hashes) == len(CHANGES) + 1
    assert len(BASE.config_hash()) == 12
    assert BASE.config_hash() == RenderConfig.from_dict(BASE.to_dict()).config_hash()
    reordered = BASE.replace(sampling={"shift": 4.0, "num_inference_steps": 4})
    assert reordered.config_hash() == BASE.config_hash()


def test_frames_for_mode():
    assert {mode: BASE.frames_for_mode(mode) for mode in ("t2v", "m2v", "mr2v", "mi2v", "mm2v")
            } == {"t2v": 17, "m2v": 17, "mr2v": 17, "mi2v": 16, "mm2v": 12}


@pytest.mark.parametrize("change, message", [
    ({"transition": "fade"}, "transition must be one of mi2v, mm2v, none"),
    ({"memory_sink": 11}, "memory_sink must be between 0 and max_memory (10)"),
    ({"max_memory": 0}, "max_memory must be at least 1"),
    ({"height": 40}, "height must be a positive multiple of 16"),
    ({"num_frames": 18}, "num_frames must be 4k+1"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"sampling": {"steps": 3}}, "unknown sampling keys ['steps']"),
    # one check of sampling values (SamplingConfig.problems): types too, not only bounds
    ({"sampling": {"reference_sigmas": "no"}}, "reference_sigmas must be true or false"),
    ({"sampling": {"guidance_scale": "3.5"}}, "guidance_scale must be a number"),
    ({"t2v_sampling": {"shift": float("inf")}}, "shift must be a number"),
    ({"transition": "mm2v", "num_frames": 5}, "transition mm2v drops 5 conditioned frames"),
    ({"keyframe_threshold": 1.5}, "keyframe_threshold must be in (0, 1]"),
    ({"t2v_sampling": {"steps": 3}}, "unknown t2v_sampling keys ['steps']"),
    ({"memory": "no"}, "memory must be True or False"),
    ({"fix_mem": -1}, "fix_mem must be None or an integer >= 0"),
    ({"sampling_preset": "turbo"}, "sampling_preset must be one of standard, fast"),
    ({"keyframe_preprocess": "crop"}, "keyframe_preprocess must be one of reference, direct"),
    ({"memory": False, "references_sha256": ("ab" * 32,)},
     "reference images (the MR2V initial memory) cannot be used with it"),
])
def test_bad_values_are_refused(change, message):
    with pytest.raises(ConfigError) as info:
        BASE.replace(**change)
    assert message in str(info.value)
    with pytest.raises(ConfigError, match="unknown RenderConfig fields"):
        RenderConfig.from_dict({**BASE.to_dict(), "colour": "red"})


def test_for_pipeline_takes_ids_and_defaults_from_the_loaded_model():
    pipeline = SimpleNamespace(
        model_id="/models/i2v", lora_id="lora:x", has_t2v=True, dtype="torch.bfloat16",
        default_height=480, default_width=832, default_num_frames=81, fps=16,
        default_sampling={"num_inference_steps": 40, "guidance_scale": 3.5, "other": 1})
    scorers = SimpleNamespace(embedder=SimpleNamespace(name="clip"),
                              gate=SimpleNamespace(name="aesthetic"), gate_threshold=4.5)
    config = RenderConfig.for_pipeline(pipeline, scorers, seed=3,
                                       sampling={"num_inference_steps": 8, "shift": None})
    assert (config.model_id, config.lora_id, config.t2v_model_id, config.dtype) == (
        "/models/i2v", "lora:x", "/models/i2v:t2v", "bfloat16")
    assert (config.height, config.width, config.num_frames, config.fps) == (480, 832, 81, 16)
    assert config.sampling == {"guidance_scale": 3.5, "num_inference_steps": 8}
    assert (config.embedder_id, config.gate_id, config.gate_threshold) == (
        "clip", "aesthetic", 4.5)
    assert config.seed == 3


def _t2v_pipeline(has_t2v=True):
    return SimpleNamespace(
        model_id="/models/i2v", has_t2v=has_t2v, default_height=480, default_width=832,
        default_num_frames=81, fps=16,
        default_sampling={"num_inference_steps": 40, "guidance_scale": 3.5,
                          "guidance_scale_2": 3.5, "shift": 4.0, "boundary_ratio": 0.9},
        default_t2v_sampling={"num_inference_steps": 40, "guidance_scale": 4.0,
                              "guidance_scale_2": 3.0, "shift": 12.0, "boundary_ratio": 0.875})


def test_for_pipeline_keeps_t2v_sampling_apart_from_m2v_overrides():
    config = RenderConfig.for_pipeline(_t2v_pipeline(), sampling={
        "num_inference_steps": 8, "shift": 5.0, "boundary_ratio": 0.8, "cfg_mode": "sequential"})
    assert config.sampling["shift"] == 5.0 and config.sampling["boundary_ratio"] == 0.8
    # only the shared overrides (steps, cfg mode, sigma grid) reach the T2V shots
    assert config.t2v_sampling == {"num_inference_steps": 8, "guidance_scale": 4.0,
                                   "guidance_scale_2": 3.0, "shift": 12.0,
                                   "boundary_ratio": 0.875, "cfg_mode": "sequential"}
    explicit = RenderConfig.for_pipeline(_t2v_pipeline(), t2v_sampling={"shift": 10.0})
    assert explicit.t2v_sampling["shift"] == 10.0
    assert explicit.config_hash() != RenderConfig.for_pipeline(_t2v_pipeline()).config_hash()
    # no T2V experts: no T2V shots, nothing to configure, and asking for it is an error
    assert RenderConfig.for_pipeline(_t2v_pipeline(has_t2v=False)).t2v_sampling == {}
    with pytest.raises(ConfigError, match="no T2V experts"):
        RenderConfig.for_pipeline(_t2v_pipeline(has_t2v=False), t2v_sampling={"shift": 10.0})


def test_configs_saved_before_the_new_fields_still_load():
    old = BASE.to_dict()
    del old["memory"], old["t2v_sampling"]
    loaded = RenderConfig.from_dict(old)
    assert loaded.memory is True and loaded.t2v_sampling == {}
