"""Images sent to the Serve endpoint: base64, data URIs or storage URIs -> uint8 arrays.

A request image is a string, one of:
- a data URI: `data:image/png;base64,<...>`;
- a storage URI with a scheme (`s3://bucket/key.png`, `file:///path.png`), accepted only
  under the server's allowed prefixes (`--image-uri-prefix`; none by default, so a client
  can never make the server read arbitrary files);
- anything else is read as plain base64 (standard or URL-safe alphabet).

Every failure raises `ImageInputError` with its own code and the index of the image in the
request, so the client knows which one to fix. The image header is checked against the
size limits before the pixels are decoded (no decompression bombs).
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image

from pipelines.serve.errors import ServeRequestError
from pipelines.serve.limits import ServeLimits
from storymem_model import storage

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
                       r"(?P<b64>;base64)?,(?P<data>.*)$", re.DOTALL)
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


class ImageInputError(ServeRequestError, ValueError):
    """One request image that cannot be used."""


def _b64decode(text: str, where: str) -> bytes:
    compact = "".join(text.split())
    if not compact:
        raise ImageInputError(400, "invalid_base64", f"{where}: empty image data")
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    padded = compact + "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            400, "invalid_base64",
            f"{where}: not valid base64 (and not a data: URI or a storage URI)") from None


def _read_uri(uri: str, where: str, limits: ServeLimits, allowed_prefixes) -> bytes:
    if not any(uri.startswith(prefix) for prefix in allowed_prefixes):
        allowed = ", ".join(allowed_prefixes) or "none (image URIs are disabled)"
        raise ImageInputError(422, "image_uri_not_allowed",
                              f"{where}: URI {uri!r} is outside the allowed prefixes: {allowed}")
    if ".." in uri.split("://", 1)[1].split("/"):
        raise ImageInputError(422, "image_uri_not_allowed", f"{where}: '..' is not allowed in {uri!r}")
    try:
        fs, path = storage.filesystem(uri)
        size = fs.size(path)
    except FileNotFoundError:
        raise ImageInputError(422, "image_uri_not_found", f"{where}: no object at {uri!r}") from None
    except Exception as exc:  # storage errors of every backend
        raise ImageInputError(422, "image_uri_unreadable",
                              f"{where}: cannot read {uri!r}: {type(exc).__name__}") from None
    if size is not None and size > limits.max_image_bytes:
        limits.check("max_image_bytes", size, f"{where} size in bytes")
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ImageInputError(422, "image_uri_not_found", f"{where}: no object at {uri!r}") from None
    except Exception as exc:
        raise ImageInputError(422, "image_uri_unreadable",
                              f"{where}: cannot read {uri!r}: {type(exc).__name__}") from None


def image_bytes(spec, where: str, limits: ServeLimits, allowed_prefixes=()) -> bytes:
    """The encoded bytes of one request image (not yet decoded)."""
    if not isinstance(spec, str):
        raise ImageInputError(422, "invalid_image_field",
                              f"{where}: expected a string (base64, data: URI or storage URI)")
    text = spec.strip()
    # A cheap bound before decoding: base64 is 4/3 of the bytes.
    limits.check("max_image_bytes", len(text) * 3 // 4, f"{where} size in bytes")
    if text.startswith("data:"):
        match = _DATA_URI.match(text)
        if not match or not match.group("b64"):
            raise ImageInputError(400, "invalid_data_uri",
                                  f"{where}: data URI must look like data:image/png;base64,...")
        data = _b64decode(match.group("data"), where)
    elif _SCHEME.match(text):
        data = _read_uri(text, where, limits, tuple(allowed_prefixes))
    else:
        data = _b64decode(text, where)
    limits.check("max_image_bytes", len(data), f"{where} size in bytes")
    return data


def decode_image(data: bytes, where: str, limits: ServeLimits) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8, with header checks before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            fmt = image.format
            limits.check("max_image_side", max(width, height), f"{where} side in pixels")
            limits.check("max_image_pixels", width * height, f"{where} pixel count")
            if fmt not in ACCEPTED_FORMATS:
                raise ImageInputError(415, "unsupported_image",
                                      f"{where}: image format {fmt} is not one of {ACCEPTED_FORMATS}")
            image.load()
            array = np.array(image.convert("RGB"), dtype=np.uint8)  # writable, contiguous
    except (ImageInputError,):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(413, "image_too_large", f"{where}: image is too large to decode") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError):
        raise ImageInputError(415, "not_an_image",
                              f"{where}: the data is not a readable image "
                              f"(accepted: {', '.join(ACCEPTED_FORMATS)})") from None
    return array


def load_images(specs, field: str, limits: ServeLimits, allowed_prefixes=(),
                count_limit: str | None = "max_images") -> list[np.ndarray]:
    """Decode a list of request images named `field` (e.g. `memory_images`); `count_limit`
    names the limit on their number (None when the caller fixes the count itself)."""
    if specs is None:
        return []
    if count_limit is not None:
        limits.check(count_limit, len(specs), f"number of {field}")
    return [decode_image(image_bytes(spec, f"{field}[{i}]", limits, allowed_prefixes),
                         f"{field}[{i}]", limits)
            for i, spec in enumerate(specs)]
