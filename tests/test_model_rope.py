"""Negative RoPE shift: explicit temporal positions in Wan's 3D rope (docs/method.md#negative-rope-shift)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

import storymem_model
from storymem_model.rope import FramePositionRotaryEmbed, frame_positions, install_frame_position_rope
from storymem_model.tiny_models import build_tiny_transformer


def test_positions_memory_first_then_shot():
    positions = storymem_model.memory_rope_positions(3, 21, 5)
    assert positions.dtype == torch.long
    assert positions.tolist() == [-15, -10, -5] + list(range(21))
    assert storymem_model.memory_rope_positions(0, 4, 5).tolist() == [0, 1, 2, 3]
    for shift in (0, None):
        assert storymem_model.memory_rope_positions(3, 4, shift).tolist() == list(range(7))
    assert storymem_model.memory_rope_positions(2, 2, 1).tolist() == [-2, -1, 0, 1]


@pytest.mark.parametrize("bad", [dict(num_memory=-1), dict(shift=-2), dict(shift=1.5), dict(num_latent_frames=0)])
def test_positions_refuse_bad_arguments(bad):
    arguments = dict(num_memory=2, num_latent_frames=3, shift=5) | bad
    with pytest.raises(ValueError):
        storymem_model.memory_rope_positions(**arguments)


@pytest.mark.parametrize("head_dim, frames, size", [(128, 31, (6, 10)), (16, 7, (8, 8)), (12, 3, (4, 6))])
def test_contiguous_positions_reproduce_stock_rope(head_dim, frames, size):
    stock = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    ours = FramePositionRotaryEmbed.replacing(stock)
    assert (ours.t_dim, ours.h_dim, ours.w_dim) == (stock.t_dim, stock.h_dim, stock.w_dim)
    x = torch.zeros(1, 16, frames, *size)
    expected, got_default = stock(x), ours(x)
    ours.positions = torch.arange(frames)
    got_explicit = ours(x)
    for got in (got_default, got_explicit):
        for a, b in zip(expected, got):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert (a - b).abs().max().item() <= 1e-6


def test_shifted_positions_give_the_formula():
    rope = FramePositionRotaryEmbed(16, (1, 2, 2))
    rope.positions = storymem_model.memory_rope_positions(2, 3, 5)
    cos, sin = rope(torch.zeros(1, 16, 5, 2, 2))
    t_dim = rope.t_dim
    table = cos[0, :, 0, :t_dim].view(5, 1, 1, t_dim)[:, 0, 0]  # 1x1 spatial grid per frame
    frequencies = 1.0 / (10000.0 ** (torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim))
    for row, position in zip(table, [-10, -5, 0, 1, 2]):
        expected = torch.cos(position * frequencies).repeat_interleave(2).float()
        torch.testing.assert_close(row, expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def transformers():
    torch.manual_seed(0)
    stock = build_tiny_transformer(36).eval()
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_(0, 0.2)
    ours = copy.deepcopy(stock)
    install_frame_position_rope(ours)
    return stock, ours


def _forward(model, x, text):
    with torch.no_grad():
        return model(x, torch.tensor([700]), text, return_dict=False)[0]


def test_memory_with_zero_shift_equals_stock_transformer(transformers):
    stock, ours = transformers
    generator = torch.Generator().manual_seed(1)
    memory, frames = 4, 5
    x = torch.randn(1, 36, memory + frames, 8, 8, generator=generator)
    text = torch.randn(1, 16, stock.config.text_dim, generator=generator)
    expected = _forward(stock, x, text)
    with frame_positions(ours, storymem_model.memory_rope_positions(memory, frames, 0)):
        same = _forward(ours, x, text)
    assert (same - expected).abs().max().item() <= 1e-6
    with frame_positions(ours, storymem_model.memory_rope_positions(memory, frames, 5)):
        shifted = _forward(ours, x, text)
    assert (shifted - expected).abs().max().item() > 1e-3
    # only relative positions matter: offsetting every position changes nothing
    offset = storymem_model.memory_rope_positions(memory, frames, 5) + 7
    with frame_positions(ours, offset):
        moved = _forward(ours, x, text)
    torch.testing.assert_close(moved, shifted, atol=1e-4, rtol=1e-4)
    assert ours.rope.positions is None  # restored after the block


def test_position_count_must_match_latent_frames(transformers):
    _, ours = transformers
    x = torch.zeros(1, 36, 3, 4, 4)
    with frame_positions(ours, torch.arange(5)), pytest.raises(ValueError, match="5 temporal positions"):
        _forward(ours, x, torch.zeros(1, 4, ours.config.text_dim))


def test_pipeline_shift_acts_only_with_memory():
    torch.set_num_threads(1)
    pipe = storymem_model.load_pipeline("tiny")
    memory = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)

    def shot(**kwargs):
        return pipe.generate_shot_latents("a cat", seed=1, **kwargs).latents

    contiguous = shot(memory=memory, rope_shift=0)
    assert torch.equal(contiguous, shot(memory=memory, rope_shift=None))
    assert not torch.allclose(contiguous, shot(memory=memory, rope_shift=5))
    assert torch.equal(shot(rope_shift=0), shot(rope_shift=5))
