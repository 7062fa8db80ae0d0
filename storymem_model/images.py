"""Images as the project stores and hashes them: lossless PNG bytes and pixel digests.

Keyframes, memory images, the frames a shot continues from and reference images are kept
as PNG (lossless), so conditioning never goes through a lossy file. Model inputs are resized
in one place only: `conditioning.images_to_tensor` (bicubic, no crop).
"""
from __future__ import annotations

import hashlib
import io

import numpy as np


def image_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_image(data: bytes) -> np.ndarray:
    """PNG (or any Pillow-readable) bytes -> (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).copy()


def images_sha256(images) -> tuple[str, ...]:
    """Hash of each image's pixels and shape (what RenderConfig.references_sha256 holds)."""
    out = []
    for image in images:
        arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        out.append(hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest())
    return tuple(out)
