"""Wan's 3D rotary embedding with explicit temporal positions (StoryMem's negative RoPE shift).

diffusers' `WanRotaryPosEmbed` precomputes a table from position 0 and always uses frame
positions 0..T-1. StoryMem places the M memory latents at temporal positions
{-M*S, ..., -2S, -S} and the shot's latents at {0, ..., f-1} (docs/method.md#negative-rope-shift).
`FramePositionRotaryEmbed` is a drop-in replacement for the transformer's `rope` module
that computes the same cos/sin tables (same per-head split t/h/w, same diffusers helper)
for any given temporal positions; `frame_positions(transformer, positions)` sets them
for the forwards inside a `with` block.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn

DEFAULT_ROPE_SHIFT = 5  # S: the authors' January 2026 release uses 5 (docs/method.md#negative-rope-shift)


def memory_rope_positions(num_memory: int, num_latent_frames: int, shift: int | None) -> torch.Tensor:
    """Temporal RoPE positions, memory first then the shot, as a LongTensor (M + f,).

    shift S > 0: memory at {-M*S, ..., -S}, shot at {0, ..., f-1}.
    shift None or 0: contiguous positions {0, ..., M+f-1} (the December reference release).
    """
    for name, value in (("num_memory", num_memory), ("num_latent_frames", num_latent_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"memory_rope_positions: {name} must be an int >= 0, got {value!r}")
    if num_latent_frames < 1:
        raise ValueError("memory_rope_positions: num_latent_frames must be >= 1")
    if shift is None or shift == 0:
        return torch.arange(num_memory + num_latent_frames, dtype=torch.long)
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"memory_rope_positions: shift must be None or an int >= 0, got {shift!r}")
    memory = -shift * torch.arange(num_memory, 0, -1, dtype=torch.long)
    return torch.cat([memory, torch.arange(num_latent_frames, dtype=torch.long)])


class FramePositionRotaryEmbed(nn.Module):
    """Wan 3D RoPE whose temporal positions are given explicitly (default: 0..T-1)."""

    def __init__(self, attention_head_dim: int, patch_size: tuple[int, int, int], theta: float = 10000.0):
        super().__init__()
        self.attention_head_dim = attention_head_dim
        self.patch_size = tuple(patch_size)
        self.theta = theta
        self.h_dim = self.w_dim = 2 * (attention_head_dim // 6)
        self.t_dim = attention_head_dim - self.h_dim - self.w_dim
        self.positions: torch.Tensor | None = None
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def replacing(cls, stock: nn.Module) -> "FramePositionRotaryEmbed":
        """Build the replacement for a diffusers `WanRotaryPosEmbed` with its settings."""
        return cls(stock.attention_head_dim, stock.patch_size)

    def _table(self, positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return get_1d_rotary_pos_embed(
            dim, positions.to(torch.float64), self.theta, use_real=True,
            repeat_interleave_real=True, freqs_dtype=torch.float64)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        positions = self.positions
        if positions is None:
            positions = torch.arange(ppf, dtype=torch.long)
        elif positions.numel() != ppf:
            raise ValueError(
                f"rope: {positions.numel()} temporal positions were set but the input has {ppf} latent frames")
        key = (tuple(positions.tolist()), pph, ppw, hidden_states.device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        cos_t, sin_t = self._table(positions.cpu(), self.t_dim)
        cos_h, sin_h = self._table(torch.arange(pph), self.h_dim)
        cos_w, sin_w = self._table(torch.arange(ppw), self.w_dim)

        def grid(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            t = t.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            h = h.view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            w = w.view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            table = torch.cat([t, h, w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1)
            return table.to(hidden_states.device)

        result = (grid(cos_t, cos_h, cos_w), grid(sin_t, sin_h, sin_w))
        self._cache = (key, result)
        return result


def install_frame_position_rope(transformer: nn.Module) -> FramePositionRotaryEmbed:
    """Replace `transformer.rope` (diffusers' stock module) by a `FramePositionRotaryEmbed`."""
    if isinstance(transformer.rope, FramePositionRotaryEmbed):
        return transformer.rope
    rope = FramePositionRotaryEmbed.replacing(transformer.rope)
    transformer.rope = rope
    return rope


@contextlib.contextmanager
def frame_positions(transformer: nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Use `positions` as temporal RoPE positions for forwards of `transformer` in this block."""
    rope = transformer.rope
    if not isinstance(rope, FramePositionRotaryEmbed):
        raise TypeError("frame_positions: the transformer still has the stock rope; call install_frame_position_rope")
    previous = rope.positions
    rope.positions = None if positions is None else torch.as_tensor(positions, dtype=torch.long).cpu()
    try:
        yield
    finally:
        rope.positions = previous
