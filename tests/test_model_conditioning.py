"""Latent, mask and conditioning layouts of M2V / MI2V / MM2V / MR2V, value by value (docs/method.md#conditioning-layout-and-mask)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from storymem_model import conditioning as cond
from storymem_model.presets import TINY


def expected_shot_mask(num_frames: int, given: int) -> torch.Tensor:
    """(4, f): latent frame 0 = pixel frame 0 four times, latent j>0 = pixel frames 4j-3..4j."""
    flags = [1.0 if i < given else 0.0 for i in range(num_frames)]
    columns = [[flags[0]] * 4] + [flags[4 * j - 3: 4 * j + 1] for j in range(1, (num_frames - 1) // 4 + 1)]
    return torch.tensor(columns).t()


@pytest.mark.parametrize("memory, given", [(0, 0), (3, 0), (10, 0), (2, 1), (4, 5), (0, 5)])
def test_mask_layout(memory, given):
    mask = cond.condition_mask(memory, 81, given, 3, 2)
    assert mask.shape == (4, memory + 21, 3, 2)
    assert torch.all(mask[:, :memory] == 1)
    shot = expected_shot_mask(81, given)
    assert torch.equal(mask[:, memory:], shot[:, :, None, None].expand(4, 21, 3, 2))
    # MI2V: only latent frame 0 is given; MM2V: latent frames 0 and 1 (pixel frames 0-4)
    given_latents = {0: 0, 1: 1, 5: 2}[given]
    assert torch.all(mask[:, memory: memory + given_latents] == 1)
    assert torch.all(mask[:, memory + given_latents:] == 0)


def test_condition_stacks_mask_then_memory_then_shot_latents():
    memory = torch.randn(3, 16, 1, 2, 4)
    shot = torch.randn(16, 5, 2, 4)
    y = cond.build_condition(memory, shot, num_frames=17, num_given_frames=1)
    assert y.shape == (20, 8, 2, 4)
    assert torch.equal(y[:4], cond.condition_mask(3, 17, 1, 2, 4))
    for m in range(3):
        assert torch.equal(y[4:, m], memory[m, :, 0])
    assert torch.equal(y[4:, 3:], shot)


def test_conditioning_video_and_image_conversion():
    images = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    pixels = cond.images_to_tensor(images, 8, 8)
    assert pixels.shape == (2, 3, 8, 8) and pixels[0].eq(-1).all() and pixels[1].eq(1).all()
    resized = cond.images_to_tensor(np.full((20, 30, 3), 255, np.uint8), 16, 32)
    assert resized.shape == (1, 3, 16, 32) and torch.allclose(resized, torch.ones_like(resized))
    video = cond.conditioning_video(pixels, 9, 8, 8)
    assert video.shape == (3, 9, 8, 8)
    assert torch.equal(video[:, 0], pixels[0]) and torch.equal(video[:, 1], pixels[1])
    assert torch.all(video[:, 2:] == 0)
    with pytest.raises(ValueError, match="uint8"):
        cond.images_to_tensor(images.astype(np.float32), 8, 8)
    with pytest.raises(ValueError, match="RGB"):
        cond.images_to_tensor(np.zeros((8, 8, 4), np.uint8), 8, 8)


class InputSpy:
    """Records the first `hidden_states` each expert receives in a shot."""

    def __init__(self, *experts):
        self.inputs, self.handles = [], []
        for expert in experts:
            self.handles.append(expert.register_forward_pre_hook(self._record, with_kwargs=True))

    def _record(self, module, args, kwargs):
        self.inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(3).integers(0, 256, (10, TINY.shot.height, TINY.shot.width, 3), dtype=np.uint8)


def model_input(pipe, **kwargs):
    spy = InputSpy(pipe.transformer, pipe.transformer_2)
    try:
        pipe.generate_shot_latents("a harbour at dawn", seed=0, num_inference_steps=1, **kwargs)
    finally:
        spy.close()
    return spy.inputs[0][0]  # first forward, conditional half of the batch


@pytest.mark.parametrize("mode", ["M2V", "MR2V", "MI2V", "MM2V"])
def test_model_input_layout_per_mode(pipe, frames, mode):
    memory = {"M2V": frames[:3], "MR2V": frames[3:5], "MI2V": frames[:3], "MM2V": frames[:3]}[mode]
    extra = {"MI2V": dict(first_frame=frames[6]), "MM2V": dict(motion_frames=frames[5:10])}.get(mode, {})
    given = {"MI2V": 1, "MM2V": 5}.get(mode, 0)
    x = model_input(pipe, memory=memory, **extra)
    m, f = len(memory), cond.num_latent_frames(TINY.shot.num_frames)
    h, w = TINY.shot.height // 8, TINY.shot.width // 8
    assert x.shape == (36, m + f, h, w)
    mask, latents = x[16:20], x[20:36]
    torch.testing.assert_close(mask, cond.condition_mask(m, TINY.shot.num_frames, given, h, w))
    # memory: each keyframe encoded as its own 1-frame video, in order, in front of the shot
    keyframes = pipe.encode_keyframes(memory, TINY.shot.height, TINY.shot.width)
    torch.testing.assert_close(latents[:, :m], keyframes[:, :, 0].permute(1, 0, 2, 3), atol=1e-6, rtol=0)
    # shot part: VAE encoding of the conditioning video (given frames, then zeros)
    given_pixels = None
    if given == 1:
        given_pixels = cond.images_to_tensor(frames[6], TINY.shot.height, TINY.shot.width)
    elif given == 5:
        given_pixels = cond.images_to_tensor(frames[5:10], TINY.shot.height, TINY.shot.width)
    video = cond.conditioning_video(given_pixels, TINY.shot.num_frames, TINY.shot.height, TINY.shot.width)
    expected_shot = pipe._vae_encode(video[None])[0]
    torch.testing.assert_close(latents[:, m:], expected_shot, atol=1e-6, rtol=0)
    if given:  # the first frame is really encoded (the reference's MI2V defect is not reproduced)
        zeros = pipe._vae_encode(cond.conditioning_video(None, TINY.shot.num_frames, 64, 64)[None])[0]
        assert (latents[:, m] - zeros[:, 0]).abs().max() > 1e-3


def test_noise_covers_memory_and_memory_frames_are_dropped(pipe, frames):
    x = model_input(pipe, memory=frames[:4])
    assert x[:16].shape[1] == 4 + cond.num_latent_frames(TINY.shot.num_frames)
    result = pipe.generate_shot_latents("a harbour at dawn", memory=frames[:4], seed=0, num_inference_steps=1)
    assert result.latents.shape[2] == cond.num_latent_frames(TINY.shot.num_frames)
    assert result.mode == "M2V"


def test_shot_noise_does_not_depend_on_memory_count(pipe, frames):
    a = model_input(pipe, memory=frames[:2])[:16, 2:]
    b = model_input(pipe, memory=frames[:5])[:16, 5:]
    assert torch.equal(a, b)


def test_t2v_input_has_no_conditioning(pipe):
    spy = InputSpy(pipe.t2v_transformer, pipe.t2v_transformer_2)
    try:
        result = pipe.generate_shot_latents("a harbour at dawn", use_t2v=True, seed=0, num_inference_steps=1)
    finally:
        spy.close()
    assert spy.inputs[0].shape[1] == 16 and result.mode == "T2V"
