"""Details the reference release does that change real renders: the T2V first shot's
sampling, the keyframe preprocessing, the optional fix_mem mask value."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from storymem_model import storage
from storymem_model.conditioning import build_condition, condition_mask
from storymem_model.keyframe_preprocess import reference_frames, smart_resize_size
from storymem_model.keyframe_selection import extract_keyframes
from storymem_model.render_spec import resolve_render_spec
from storymem_model.scorers import ScorerSpec, build_scorers
from storymem_model.specs import ModelSpec, RenderSettings, SamplingOverrides
from test_keyframe_selection import reference_select

TINY_MODEL, TINY_SCORERS = ModelSpec(preset="tiny"), ScorerSpec(preset="tiny")


# -- T2V first shot ------------------------------------------------------------------------
def test_t2v_first_shot_defaults_are_the_reference_story_pipelines():
    config = resolve_render_spec(TINY_MODEL, TINY_SCORERS, RenderSettings(),
                                 accelerator=False).config
    t2v = config.t2v_sampling
    assert (t2v["guidance_scale"], t2v["guidance_scale_2"]) == (3.5, 3.5)
    assert (t2v["shift"], t2v["boundary_ratio"]) == (12.0, 0.875)
    # every override still works and moves the hash
    for override in ({"guidance_scale": 4.0, "guidance_scale_2": 3.0}, {"shift": 10.0},
                     {"boundary_ratio": 0.9}):
        changed = resolve_render_spec(
            TINY_MODEL, TINY_SCORERS,
            RenderSettings(t2v_sampling=SamplingOverrides(**override)), accelerator=False)
        assert all(changed.config.t2v_sampling[k] == v for k, v in override.items())
        assert changed.config_hash != config.config_hash()


def test_config_json_records_the_t2v_sampling(tmp_path):
    from storymem_model.runner import open_runner
    from storymem_model.story_script import load_script

    spec = resolve_render_spec(TINY_MODEL, TINY_SCORERS,
                               RenderSettings(sampling=SamplingOverrides(num_inference_steps=1)),
                               accelerator=False)
    result = open_runner(spec).render(load_script(["A lighthouse at dusk."]), str(tmp_path),
                                      progress=False)
    saved = json.loads(storage.read_bytes(storage.join(result.story_uri, "config.json")))
    assert saved["t2v_sampling"]["guidance_scale"] == saved["t2v_sampling"][
        "guidance_scale_2"] == 3.5
    assert result.rows[0].mode == "t2v"


# -- keyframe preprocessing ------------------------------------------------------------------
def _qwen2vl_smart_resize(height, width, factor=28, min_pixels=56 * 56,
                          max_pixels=256 * 28 * 28):
    """Written out here from Qwen2-VL's rule, independently of the project's helper."""
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@pytest.mark.parametrize("size, expected", [((480, 832), (336, 588)), ((64, 64), (56, 56)),
                                            ((720, 1280), (336, 588)), ((28, 28), (56, 56))])
def test_smart_resize_sizes(size, expected):
    assert smart_resize_size(*size) == expected == _qwen2vl_smart_resize(*size)


def _reference_pipeline(frames, clip, head_layers, memory_frames=()):
    """A transcription of the reference release's keyframe path: smart-resize (bilinear,
    antialias, uint8), the gate on those frames, CLIP on each squashed to its input size
    (bilinear, no antialias, no crop) with CLIP's mean/std; then the reference selection."""
    def prepare(images):
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        size = list(_qwen2vl_smart_resize(images.shape[1], images.shape[2]))
        resized = TF.resize(pixels, size, interpolation=TF.InterpolationMode.BILINEAR,
                            antialias=True)
        x = F.interpolate(resized.float() / 255.0, size=clip.image_size, mode="bilinear",
                          align_corners=False)
        mean = torch.tensor(clip.model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(clip.model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            features = clip.model.encode_image((x - mean) / std)
        return F.normalize(features.float(), dim=-1).numpy()

    embeddings = prepare(frames)
    scores = torch.from_numpy(embeddings)
    for weight, bias in head_layers:  # the tiny gate: the aesthetic head on these embeddings
        scores = F.linear(scores, weight, bias)
    scores = scores[:, 0].numpy()
    memory = prepare(np.stack(memory_frames)) if len(memory_frames) else []
    return embeddings, scores, memory


def test_reference_preprocessing_equals_a_transcription_of_the_reference():
    scorers = build_scorers(ScorerSpec(preset="tiny", keyframe_preprocess="reference"))
    rng = np.random.default_rng(7)
    # a drifting 17-frame shot (so keyframes are found) and two stored keyframes
    base = rng.integers(0, 256, (64, 64, 3)).astype(np.float32)
    frames = np.stack([np.clip(base + 30 * i * rng.standard_normal((64, 64, 3)), 0, 255)
                       for i in range(17)]).astype(np.uint8)
    stored = frames[[3, 12]]
    embeddings, scores, memory = _reference_pipeline(frames, scorers.embedder,
                                                     scorers.gate.layers, stored)
    threshold = scorers.gate_threshold
    stored_embeddings = scorers.embedder.embed_images(reference_frames(stored))
    ours = extract_keyframes(frames, scorers, stored_embeddings, preprocess="reference",
                             min_score=threshold)
    np.testing.assert_allclose(ours.embeddings, embeddings, atol=1e-5)
    np.testing.assert_allclose(ours.scores, scores, atol=1e-4)
    expected = reference_select(embeddings, scores, list(memory), threshold)
    assert list(ours.indices) == expected
    # the direct mode sees other pixels: other numbers
    direct = build_scorers(ScorerSpec(preset="tiny", keyframe_preprocess="direct"))
    other = extract_keyframes(frames, direct, None, preprocess="direct", min_score=threshold)
    assert not np.allclose(other.embeddings, embeddings, atol=1e-3)


def test_runner_references_and_memory_check_use_the_same_path(tmp_path):
    """MR2V references are embedded as keyframes are (smart-resized first)."""
    from storymem_model.runner import StorySession, open_runner

    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "ref.png"
    from storymem_model.images import image_png

    path.write_bytes(image_png(image))
    spec = resolve_render_spec(TINY_MODEL, TINY_SCORERS,
                               RenderSettings(references=(str(path),)), accelerator=False)
    runner = open_runner(spec)
    session = StorySession(runner, "s", str(tmp_path / "out"))
    stored = session.bank.stored[0].clip_embedding
    np.testing.assert_allclose(
        stored, runner.scorers.embedder.embed_images(reference_frames(image[None]))[0],
        atol=1e-6)


# -- fix_mem mask -----------------------------------------------------------------------
def test_fix_mem_marks_later_memory_frames_2():
    plain = condition_mask(4, 17, 1, 2, 3)
    assert plain[:, :4].unique().tolist() == [1.0]
    fixed = condition_mask(4, 17, 1, 2, 3, fix_mem=1)
    assert fixed[:, :1].unique().tolist() == [1.0]
    assert fixed[:, 1:4].unique().tolist() == [2.0]
    assert torch.equal(fixed[:, 4:], plain[:, 4:])  # the shot's mask is unchanged
    assert torch.equal(condition_mask(4, 17, 0, 2, 3, fix_mem=4), condition_mask(4, 17, 0, 2, 3))
    assert condition_mask(4, 17, 0, 2, 3, fix_mem=0)[:, :4].unique().tolist() == [2.0]
    y = build_condition(torch.zeros(3, 16, 1, 2, 3), torch.zeros(16, 5, 2, 3), 17, 0, fix_mem=2)
    assert y[:4, :3, 0, 0].tolist() == [[1.0, 1.0, 2.0]] * 4
    with pytest.raises(ValueError, match="fix_mem must be None or an int >= 0"):
        condition_mask(4, 17, 0, 2, 3, fix_mem=-1)


def test_fix_mem_is_off_by_default_and_reaches_the_shot():
    import storymem_model

    spec = resolve_render_spec(TINY_MODEL, TINY_SCORERS, RenderSettings(), accelerator=False)
    assert spec.config.fix_mem is None
    fixed = resolve_render_spec(TINY_MODEL, TINY_SCORERS, RenderSettings(fix_mem=1),
                                accelerator=False)
    assert fixed.config.fix_mem == 1 and fixed.config_hash != spec.config_hash
    pipe = storymem_model.load_pipeline("tiny")
    memory = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    shot = dict(height=64, width=64, num_frames=17, num_inference_steps=2, seed=1)
    plain = pipe.generate_shot_latents("a boat", memory=memory, **shot).latents
    marked = pipe.generate_shot_latents("a boat", memory=memory, fix_mem=1, **shot).latents
    assert not torch.equal(plain, marked)


def test_fix_mem_of_the_config_reaches_every_memory_shot_of_a_render(tmp_path):
    """A render with `fix_mem` passes it to the pipeline for every shot (the memory shots'
    mask then marks the later memory frames); without it the pipeline never gets one."""
    from storymem_model.runner import open_runner
    from storymem_model.story_script import load_script

    script = load_script(["a boat leaves", "it sails on", "it reaches the isle"])
    calls = {}
    for fix_mem in (None, 1):
        settings = RenderSettings(fix_mem=fix_mem, height=32, width=32, num_frames=9,
                                  transition="none")
        runner = open_runner(resolve_render_spec(TINY_MODEL, TINY_SCORERS, settings,
                                                 accelerator=False))
        real = runner.pipeline.generate_shot
        seen = calls[fix_mem] = []

        def recording(prompt, _real=real, _seen=seen, **kwargs):
            _seen.append((kwargs.get("fix_mem", "absent"), "memory_latents" in kwargs))
            return _real(prompt, **kwargs)

        runner.pipeline.generate_shot = recording
        runner.render(script, str(tmp_path / str(fix_mem)), progress=False)
    assert calls[None] == [("absent", False), ("absent", True), ("absent", True)]
    assert calls[1] == [(1, False), (1, True), (1, True)]
