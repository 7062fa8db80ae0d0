"""The tiny StoryMem pipeline end to end: modes, shapes, determinism, precomputed memory, errors."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from storymem_model.presets import TINY

PROMPT = "A lighthouse keeper climbs the stairs and lights the lamp."


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (10, TINY.shot.height, TINY.shot.width, 3), dtype=np.uint8)


def test_package_import_is_light():
    code = ("import sys, storymem_model, storymem_model.presets, storymem_model.seeds; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tiny_pipeline_attributes(pipe):
    assert (pipe.default_height, pipe.default_width, pipe.default_num_frames) == (
        TINY.shot.height, TINY.shot.width, TINY.shot.num_frames)
    assert pipe.fps == TINY.shot.fps
    assert pipe.default_sampling["num_inference_steps"] == TINY.shot.num_inference_steps
    assert pipe.default_sampling["shift"] == 4.0 and pipe.default_sampling["boundary_ratio"] == 0.9
    assert pipe.model_id == "tiny" and pipe.lora_id is None
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32
    assert pipe.has_t2v and pipe.t2v_model_id == "tiny:t2v"
    assert pipe.default_t2v_sampling["shift"] == 12.0 and pipe.default_t2v_sampling["boundary_ratio"] == 0.875


@pytest.mark.parametrize("mode", ["T2V", "M2V0", "M2V", "MR2V", "MI2V", "MM2V"])
def test_modes_shapes(pipe, images, mode):
    kwargs = {
        "T2V": dict(use_t2v=True),
        "M2V0": dict(),
        "M2V": dict(memory=images[:3]),
        "MR2V": dict(memory=list(images[:2])),
        "MI2V": dict(memory=images[:3], first_frame=images[4]),
        "MM2V": dict(memory=images[:3], motion_frames=images[5:10]),
    }[mode]
    video = pipe.generate_shot(PROMPT, seed=3, **kwargs)
    dropped = {"MI2V": 1, "MM2V": 5}.get(mode, 0)
    assert video.shape == (TINY.shot.num_frames - dropped, TINY.shot.height, TINY.shot.width, 3)
    assert video.dtype == np.uint8
    assert video.std() > 1.0  # decoded content, not a constant image


def test_deterministic_and_seed_sensitive(pipe, images):
    a = pipe.generate_shot(PROMPT, memory=images[:3], seed=11)
    b = pipe.generate_shot(PROMPT, memory=images[:3], seed=11)
    assert np.array_equal(a, b)
    assert not torch.equal(latents(pipe, memory=images[:3], seed=11), latents(pipe, memory=images[:3], seed=12))


def latents(pipe, prompt=PROMPT, **kwargs):
    """Denoised shot latents (no decoding: cheaper where frames are not needed)."""
    return pipe.generate_shot_latents(prompt, **kwargs).latents


def test_deterministic_across_processes(pipe, images):
    """Another process (as a Ray worker would be) builds the same tiny model and shot."""
    code = (
        "import sys, hashlib, numpy as np, torch; torch.set_num_threads(1); import storymem_model; "
        "images = np.random.default_rng(0).integers(0, 256, (10, %d, %d, 3), dtype=np.uint8); "
        "p = storymem_model.load_pipeline('tiny'); "
        "v = p.generate_shot(%r, memory=images[:2], seed=5); "
        "print(hashlib.sha256(v.tobytes()).hexdigest())" % (TINY.shot.height, TINY.shot.width, PROMPT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": "123"})
    assert result.returncode == 0, result.stderr[-2000:]
    here = pipe.generate_shot(PROMPT, memory=images[:2], seed=5)
    assert result.stdout.strip().splitlines()[-1] == hashlib.sha256(here.tobytes()).hexdigest()


def test_t2v_request_without_t2v_experts_falls_back_to_m2v():
    from storymem_model.shot_pipeline import StoryMemPipeline
    from storymem_model.tiny_models import build_tiny_components

    parts = build_tiny_components()
    parts.update(t2v_transformer=None, t2v_transformer_2=None)
    pipe = StoryMemPipeline(**parts)
    pipe.configure(shot=TINY.shot, text_length=TINY.text_length, model_id="tiny", t2v_model_id="tiny:t2v")
    assert not pipe.has_t2v and pipe.t2v_model_id is None
    assert pipe.generate_shot_latents(PROMPT, use_t2v=True, num_inference_steps=1).mode == "M2V"


def test_memory_changes_the_shot_and_precomputed_latents_match(pipe, images):
    keyframes = pipe.encode_keyframes(images[:4], TINY.shot.height, TINY.shot.width)
    h, w = TINY.shot.height // 8, TINY.shot.width // 8
    assert keyframes.shape == (4, 16, 1, h, w) and keyframes.dtype == torch.float32
    from_images = pipe.generate_shot(PROMPT, memory=images[:4], seed=2)
    from_latents = pipe.generate_shot(PROMPT, memory_latents=keyframes, seed=2)
    assert np.array_equal(from_images, from_latents)
    assert not torch.equal(latents(pipe, memory_latents=keyframes, seed=2), latents(pipe, seed=2))


def test_keyframes_are_encoded_one_by_one(pipe, images):
    together = pipe.encode_keyframes(images[:3], 64, 64)
    alone = torch.cat([pipe.encode_keyframes(images[i:i + 1], 64, 64) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_memory_of_sixteen_frames(pipe, images):
    memory = np.concatenate([images, images[:6]])
    assert latents(pipe, memory=memory, seed=1).shape[2] == (TINY.shot.num_frames - 1) // 4 + 1


def test_prompt_changes_the_shot(pipe):
    a = latents(pipe, seed=4)
    b = latents(pipe, "A dragon flies over snowy mountains at dawn.", seed=4)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "prompt"),
    (dict(height=60), "height"),
    (dict(num_frames=16), "num_frames"),
    (dict(num_frames=5, motion_frames="m5"), "no new frame"),
    (dict(first_frame="f", motion_frames="m5"), "not both"),
    (dict(motion_frames="m3"), "5 frames"),
    (dict(memory="float"), "uint8"),
    (dict(memory_latents="badshape"), "memory_latents has shape"),
    (dict(use_t2v=True, memory="m3"), "use_t2v"),
    (dict(cfg_mode="parallel"), "cfg_mode"),
    (dict(steps=3), "unknown sampling option"),
    (dict(seed=-1), "seed"),
])
def test_bad_inputs_are_refused_clearly(pipe, images, kwargs, message):
    values = {"m5": images[:5], "m3": images[:3], "f": images[0], "float": images[:2].astype(np.float32),
              "badshape": torch.zeros(2, 16, 1, 4, 4)}
    kwargs = {k: values.get(v, v) if isinstance(v, str) and k != "prompt" and k != "cfg_mode" else v
              for k, v in kwargs.items()}
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises((ValueError, TypeError), match=message):
        pipe.generate_shot(prompt, **kwargs)
