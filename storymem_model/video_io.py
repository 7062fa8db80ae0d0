"""H.264 mp4 files through ffmpeg-python, using the ffmpeg binary that imageio-ffmpeg ships.

Encoding is reproducible: the same frames and fps give the same bytes (one encoder thread,
bit-exact flags, no metadata, no encoder version string). Stitching concatenates the shot
files without re-encoding, so the story video holds exactly the shots' frames.
"""
from __future__ import annotations

import os
import tempfile

import ffmpeg
import imageio_ffmpeg
import numpy as np

CRF = 17  # visually lossless for H.264
PRESET = "medium"


class VideoError(RuntimeError):
    """A video that cannot be written or read, with ffmpeg's own message."""


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


_REPRODUCIBLE = {
    "threads": 1,
    "fflags": "+bitexact",
    "flags:v": "+bitexact",
    "map_metadata": -1,
    "map_chapters": -1,
    "movflags": "+faststart",
}


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """(F, H, W, 3) uint8 frames -> bytes of an H.264 (yuv420p) mp4 at `fps`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"frames must be a (F, H, W, 3) uint8 array, got shape "
                         f"{frames.shape} dtype {frames.dtype}")
    count, height, width, _ = frames.shape
    if count < 1:
        raise VideoError("cannot encode a video with no frames")
    if height % 2 or width % 2:
        raise VideoError(f"H.264 yuv420p needs even height and width, got {height}x{width}")
    with tempfile.TemporaryDirectory(prefix="storymem-enc-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        stream = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24",
                         s=f"{width}x{height}", framerate=fps)
            .output(path, vcodec="libx264", pix_fmt="yuv420p", crf=CRF, preset=PRESET,
                    r=fps, an=None, **_REPRODUCIBLE)
            .global_args("-nostdin")
        )
        _run(stream, np.ascontiguousarray(frames).tobytes())
        with open(path, "rb") as handle:
            return handle.read()


def stitch_mp4(videos: list[bytes]) -> bytes:
    """Concatenate mp4s made by `encode_mp4` (same size and fps) without re-encoding."""
    if not videos:
        raise VideoError("nothing to stitch: no shot videos")
    with tempfile.TemporaryDirectory(prefix="storymem-cat-") as tmp:
        names = []
        for i, data in enumerate(videos):
            name = os.path.join(tmp, f"part{i:04d}.mp4")
            with open(name, "wb") as handle:
                handle.write(data)
            names.append(name)
        listing = os.path.join(tmp, "list.txt")
        with open(listing, "w") as handle:
            handle.writelines(f"file '{os.path.basename(n)}'\n" for n in names)
        out = os.path.join(tmp, "story.mp4")
        stream = (
            ffmpeg.input(listing, format="concat", safe=0)
            .output(out, c="copy", **_REPRODUCIBLE)
            .global_args("-nostdin")
        )
        _run(stream, None)
        with open(out, "rb") as handle:
            return handle.read()


def decode_mp4(data: bytes) -> np.ndarray:
    """Bytes of a video -> (F, H, W, 3) uint8 frames (for tests and evaluation)."""
    with tempfile.TemporaryDirectory(prefix="storymem-dec-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", bits_per_pixel=24)
            meta = next(reader)
            width, height = meta["size"]
            frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
        except (RuntimeError, OSError, StopIteration) as exc:
            raise VideoError(f"cannot decode video: {exc}") from exc
    if not frames:
        return np.zeros((0, height, width, 3), np.uint8)
    return np.stack(frames)


def video_info(data: bytes) -> dict:
    """{"frames", "width", "height", "fps"} of a video, by decoding it."""
    with tempfile.TemporaryDirectory(prefix="storymem-info-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        with open(path, "wb") as handle:
            handle.write(data)
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        reader.close()
        count, _ = imageio_ffmpeg.count_frames_and_secs(path)
    width, height = meta["size"]
    return {"frames": int(count), "width": int(width), "height": int(height),
            "fps": float(meta["fps"]), "codec": meta.get("codec")}


def _run(stream, input_bytes: bytes | None) -> None:
    try:
        stream.run(cmd=ffmpeg_exe(), input=input_bytes, capture_stdout=True,
                   capture_stderr=True, overwrite_output=True)
    except ffmpeg.Error as exc:
        tail = (exc.stderr or b"").decode("utf-8", "replace")[-2000:]
        raise VideoError(f"ffmpeg failed: {tail}") from None
