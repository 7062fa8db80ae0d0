"""H.264 video files: reproducible bytes, exact frame counts, stitching without re-encoding."""
from __future__ import annotations

import numpy as np
import pytest

from storymem_model.video_io import VideoError, decode_mp4, encode_mp4, stitch_mp4, video_info


def _frames(count: int, seed: int) -> np.ndarray:
    """Smooth moving gradients (chroma subsampling would wreck per-pixel noise)."""
    y, x = np.mgrid[0:32, 0:48]
    t = np.arange(count)[:, None, None]
    red = (x * 4 + t * 5 + seed * 40) % 256
    green = (y * 6 + t * 3) % 256
    blue = np.broadcast_to((x + y + seed * 20) % 256, red.shape)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def test_same_frames_same_bytes_and_exact_counts():
    a, b = _frames(16, 0), _frames(12, 1)
    first, again = encode_mp4(a, 16), encode_mp4(a.copy(), 16)
    assert first == again
    assert encode_mp4(b, 16) != first
    info = video_info(first)
    assert (info["frames"], info["width"], info["height"], info["fps"], info["codec"]) == (
        16, 48, 32, 16.0, "h264")
    decoded = decode_mp4(first)
    assert decoded.shape == a.shape
    assert np.abs(decoded.astype(int) - a).mean() < 12  # lossy but close


def test_stitch_keeps_every_frame_in_order_and_is_reproducible():
    parts = [_frames(16, 0), _frames(15, 1), _frames(12, 2)]
    videos = [encode_mp4(p, 16) for p in parts]
    story = stitch_mp4(videos)
    assert story == stitch_mp4(list(videos))
    frames = decode_mp4(story)
    assert frames.shape[0] == 43
    assert np.array_equal(frames[:16], decode_mp4(videos[0]))
    assert np.array_equal(frames[31:], decode_mp4(videos[2]))


def test_bad_input_errors():
    with pytest.raises(VideoError, match="even height and width"):
        encode_mp4(np.zeros((3, 33, 48, 3), np.uint8), 16)
    with pytest.raises(VideoError, match=r"\(F, H, W, 3\) uint8"):
        encode_mp4(np.zeros((3, 32, 48), np.uint8), 16)
    with pytest.raises(VideoError, match="no frames"):
        encode_mp4(np.zeros((0, 32, 48, 3), np.uint8), 16)
    with pytest.raises(VideoError, match="nothing to stitch"):
        stitch_mp4([])
    with pytest.raises(VideoError, match="ffmpeg failed"):
        stitch_mp4([b"not a video"])
