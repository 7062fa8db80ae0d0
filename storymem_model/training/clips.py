"""One clip -> the training shot's frames, or a `ClipDecodeError` naming why not.

The clip is decoded by the project's ffmpeg (the imageio-ffmpeg binary `video_io` uses),
resampled by ffmpeg's `fps` filter to the training frame rate and cut after the training
frame count (ffmpeg stops there, so a long clip costs no more than a short one). Each frame
is centre-cropped to the training aspect ratio and resized by the pipeline's one image
resize path (`conditioning.images_to_tensor`: bicubic, antialiased when shrinking), then
quantised back to uint8 exactly as a decoded shot is (`conditioning.frames_to_uint8`), so
the frames are what a render of that size would hold.

Refused: files larger than the limit, files ffmpeg cannot read, clips with fewer frames than
the training frame count at the training fps ("too short"), clips whose crop is smaller
than the training size ("too small": they would be upscaled).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from storymem_model import conditioning as cond
from storymem_model import storage


class ClipDecodeError(ValueError):
    """A clip that cannot become a training shot; the message is the errors-table reason."""


def read_clip_bytes(uri: str, max_bytes: int) -> bytes:
    try:
        fs, path = storage.filesystem(uri)
        size = fs.size(path)
    except FileNotFoundError:
        raise ClipDecodeError("not found") from None
    except (OSError, storage.StorageError) as exc:
        raise ClipDecodeError(f"unreadable: {exc}") from None
    if size is not None and size > max_bytes:
        raise ClipDecodeError(f"file of {size} bytes is larger than the {max_bytes} byte limit")
    try:
        return storage.read_bytes(uri)
    except (OSError, storage.StorageError) as exc:
        raise ClipDecodeError(f"unreadable: {exc}") from None


def crop_box(source_height: int, source_width: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width): the centred crop with the target aspect ratio."""
    if source_width * height >= width * source_height:  # wider than the target: cut the sides
        crop_h, crop_w = source_height, (source_height * width) // height
    else:
        crop_h, crop_w = (source_width * height) // width, source_width
    return (source_height - crop_h) // 2, (source_width - crop_w) // 2, crop_h, crop_w


def decode_clip(data: bytes, *, num_frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """The clip's first `num_frames` frames at `fps`, cropped and resized: (F, H, W, 3) uint8."""
    import imageio_ffmpeg

    from storymem_model.video_io import ffmpeg_exe

    os.environ.setdefault("IMAGEIO_FFMPEG_EXE", ffmpeg_exe())
    with tempfile.TemporaryDirectory(prefix="storymem-clip-") as tmp:
        path = os.path.join(tmp, "clip")
        with open(path, "wb") as handle:
            handle.write(data)
        reader = imageio_ffmpeg.read_frames(
            path, pix_fmt="rgb24", bits_per_pixel=24,
            output_params=["-vf", f"fps={float(fps)!r}", "-frames:v", str(int(num_frames))])
        try:
            meta = next(reader)
            source_width, source_height = meta["size"]
            top, left, crop_h, crop_w = crop_box(source_height, source_width, height, width)
            if crop_h < height or crop_w < width:
                raise ClipDecodeError(
                    f"too small: {source_width}x{source_height} gives a {crop_w}x{crop_h} crop, "
                    f"less than the training size {width}x{height}")
            frames = []
            for raw in reader:
                frame = np.frombuffer(raw, np.uint8).reshape(source_height, source_width, 3)
                frames.append(frame[top:top + crop_h, left:left + crop_w])
                if len(frames) == num_frames:
                    break
        except ClipDecodeError:
            raise
        except (RuntimeError, OSError, StopIteration, ValueError) as exc:
            raise ClipDecodeError(f"unreadable video: {_last_line(exc)}") from None
        finally:
            reader.close()
    if len(frames) < num_frames:
        raise ClipDecodeError(f"too short: {len(frames)} frames at {fps:g} fps, the training shot "
                              f"needs {num_frames} ({(num_frames - 1) / fps:.2f} s)")
    resized = [cond.images_to_tensor(frame, height, width, name="clip frame") for frame in frames]
    video = np.concatenate([cond.frames_to_uint8(t.permute(1, 0, 2, 3)) for t in resized])
    return video


def _last_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1][:300] if lines else type(error).__name__
