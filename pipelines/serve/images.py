"""Images sent to the Serve endpoint: base64, data URIs or storage URIs -> uint8 arrays.

A request image is a string, one of:
- a data URI: `data:image/png;base64,<...>`;
- a storage URI with a scheme (`s3://bucket/key.png`, `file:///path.png`), accepted only
  under the server's allowed prefixes (`--image-uri-prefix`; none by default, so a client
  can never make the server read arbitrary files);
- anything else is read as plain base64 (standard or URL-safe alphabet).

Allowed prefixes are matched on the parsed URI - same scheme, same bucket (or host), and
the prefix's path segments as whole leading segments of the URI's path: `s3://assets/in`
admits `s3://assets/in/a.png`, never `s3://assets-private/...` or `s3://assets/inbox/...`.
URIs with `.` / `..` / empty segments, percent escapes, backslashes, queries or fragments
are refused, and a local file must still lie under the prefix once symlinks are resolved.
A URI that is not allowed and one with no object behind it get the same answer
(`image_uri_unavailable`, 422), so a client learns nothing about what exists, and no
message lists the allowed prefixes. Objects are read with `storage.read_bytes(uri,
max_bytes=max_image_bytes)`: never more than the limit.

Every failure raises `ImageInputError` with its own code and the index of the image in the
request. Before any pixel is decoded, the image header is checked against the size limits
and the request's pixel budget (`max_request_pixels`: all images of one request together)
and taken from the replica's (`max_replica_pixels`: all requests of the replica at once,
given back when each is answered); Pillow's decompression-bomb guard stays on as a backstop.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import re
import threading
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from pipelines.serve.errors import ServeRequestError
from pipelines.serve.limits import REPLICA_PIXELS_LIMIT, LimitExceeded, ServeLimits
from storymem_model import storage

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
                       r"(?P<b64>;base64)?,(?P<data>.*)$", re.DOTALL)
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
# Pillow's own guard (warning past this many pixels, error past twice as many); kept on
# even if something in the process switched it off.
PILLOW_BOMB_GUARD_PIXELS = 89_478_485


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


# -- storage URIs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class UriPlace:
    """A storage URI taken apart: scheme, bucket or host, path segments."""

    scheme: str
    host: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, uri: str, prefix: bool = False) -> "UriPlace | None":
        """None for a URI this endpoint does not accept (see the module doc). A `prefix`
        may end with "/" and may have no path at all (a whole bucket)."""
        if not isinstance(uri, str) or any(c in uri for c in "%\\?#") or \
                any(ord(c) < 33 or ord(c) == 127 for c in uri):
            return None
        try:
            parts = urlsplit(uri)
        except ValueError:
            return None
        scheme = parts.scheme.lower()
        if not scheme or parts.query or parts.fragment or parts.username or parts.password:
            return None
        path = parts.path
        if prefix:
            path = path.rstrip("/")
        segments = tuple(path.split("/")[1:]) if path else ()
        if any(s in ("", ".", "..") for s in segments):
            return None
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            return None
        if scheme != "file" and not parts.netloc:
            return None
        return cls(scheme, parts.netloc if scheme != "file" else "", segments)

    def under(self, prefix: "UriPlace") -> bool:
        n = len(prefix.segments)
        return (self.scheme == prefix.scheme and self.host == prefix.host
                and len(self.segments) > n and self.segments[:n] == prefix.segments)

    def local_path(self) -> str:
        return "/" + "/".join(self.segments)


def parse_prefixes(prefixes) -> tuple[UriPlace, ...]:
    """The allowed prefixes, parsed; ValueError naming one that cannot be used."""
    out = []
    for text in prefixes:
        place = UriPlace.parse(text, prefix=True)
        if place is None or (place.scheme != "file" and not place.host):
            raise ValueError(f"image URI prefix {text!r} is not a usable URI prefix "
                             "(scheme://bucket[/path], no '..', '%', '?' or '#')")
        out.append(place)
    return tuple(out)


def _unavailable(where: str) -> ImageInputError:
    return ImageInputError(422, "image_uri_unavailable",
                           f"{where}: this image URI cannot be used: it is not allowed on "
                           "this server or there is no readable image at it")


def _read_uri(uri: str, where: str, limits: ServeLimits, allowed: tuple[UriPlace, ...]) -> bytes:
    place = UriPlace.parse(uri)
    match = next((p for p in allowed if place is not None and place.under(p)), None)
    if match is None:
        raise _unavailable(where)
    if place.scheme == "file":
        real = os.path.realpath(place.local_path())
        root = os.path.realpath(match.local_path())
        if not real.startswith(root.rstrip("/") + "/"):
            raise _unavailable(where)  # a symlink out of the allowed folder
    try:
        return storage.read_bytes(uri, max_bytes=limits.max_image_bytes)
    except storage.TooLarge:
        raise LimitExceeded("max_image_bytes", limits.max_image_bytes,
                            f">{limits.max_image_bytes}", f"{where} size in bytes") from None
    except Exception:  # missing, a folder, unreadable, storage down: one answer for all
        raise _unavailable(where) from None


def image_bytes(spec, where: str, limits: ServeLimits, allowed_prefixes=()) -> bytes:
    """The encoded bytes of one request image (not yet decoded). `allowed_prefixes` are
    `UriPlace`s (`parse_prefixes`) or prefix strings."""
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
        allowed = tuple(p if isinstance(p, UriPlace) else parse_prefixes([p])[0]
                        for p in allowed_prefixes)
        data = _read_uri(text, where, limits, allowed)
    else:
        data = _b64decode(text, where)
    limits.check("max_image_bytes", len(data), f"{where} size in bytes")
    return data


# -- decoding ---------------------------------------------------------------------------------
class ReplicaPixels:
    """The decoded pixels all requests of one HTTP replica hold at once
    (`max_replica_pixels`). A request takes all its images' pixels in one step, from their
    headers, before it decodes any of them (`PixelBudget.hold`), and gives them back once
    it is answered; a request that does not fit answers 503 `replica_busy` (with
    Retry-After) having taken nothing - so requests never hold part of what they need and
    block each other. Thread-safe: requests decode in worker threads."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.held = 0
        self._lock = threading.Lock()

    def take(self, pixels: int, where: str) -> None:
        with self._lock:
            self.limits.check(REPLICA_PIXELS_LIMIT, self.held + pixels,
                              f"{where}: decoded pixels held by this replica's requests")
            self.held += pixels

    def give_back(self, pixels: int) -> None:
        with self._lock:
            self.held -= pixels


class PixelBudget:
    """The decoded pixels of one request. `charge` adds an image's pixels from its header
    and checks the request's limit (`max_request_pixels`, all images together); `hold`
    takes what was charged and not yet held from the replica's pixels (`ReplicaPixels`,
    when given) before any of it is decoded; `release()` (or the end of a `with` block),
    once the request is answered, gives it back. A budget released while a decoding
    thread still runs (the client went away) refuses further charges and holds, so nothing
    is taken that is never given back."""

    def __init__(self, limits: ServeLimits, replica: ReplicaPixels | None = None):
        self.limits = limits
        self.replica = replica
        self.spent = 0  # charged: every image opened so far
        self.held = 0   # taken from the replica
        self.released = False
        self._lock = threading.Lock()

    def charge(self, pixels: int, where: str) -> None:
        with self._lock:
            self._check_open(where)
            self.limits.check("max_request_pixels", self.spent + pixels,
                              f"{where}: decoded pixels of this request's images")
            self.spent += pixels

    def hold(self, where: str) -> None:
        with self._lock:
            self._check_open(where)
            if self.replica is not None and self.spent > self.held:
                self.replica.take(self.spent - self.held, where)
            self.held = self.spent

    def release(self) -> None:
        with self._lock:
            if not self.released and self.replica is not None and self.held:
                self.replica.give_back(self.held)
            self.released = True

    def _check_open(self, where: str) -> None:
        if self.released:
            raise RequestAnswered(f"{where}: the request was already answered")

    def __enter__(self) -> "PixelBudget":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RequestAnswered(RuntimeError):
    """A decoding thread outlived its request (cancelled): it stops without decoding."""


def _bomb_guard_on() -> None:
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > PILLOW_BOMB_GUARD_PIXELS:
        Image.MAX_IMAGE_PIXELS = PILLOW_BOMB_GUARD_PIXELS


@dataclass
class OpenedImage:
    """An image whose header was read and checked; its pixels are not decoded yet."""
    image: Image.Image
    where: str


@contextlib.contextmanager
def _image_errors(where: str, limits: ServeLimits):
    """Pillow's failures as the endpoint's named errors."""
    try:
        yield
    except ServeRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's guard refuses in Image.open, before our own checks could see the size.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        raise LimitExceeded("max_image_pixels",
                            min(limits.max_image_pixels, 2 * PILLOW_BOMB_GUARD_PIXELS),
                            int(claimed.group(1)) if claimed else f">{PILLOW_BOMB_GUARD_PIXELS}",
                            f"{where} pixel count (refused by the decompression-bomb "
                            f"guard)") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError):
        raise ImageInputError(415, "not_an_image",
                              f"{where}: the data is not a readable image "
                              f"(accepted: {', '.join(ACCEPTED_FORMATS)})") from None


def open_image(data: bytes, where: str, limits: ServeLimits,
               budget: PixelBudget | None = None) -> OpenedImage:
    """Read an encoded image's header: its size against the limits, its format, and its
    pixels charged to the request's `budget` - nothing decoded yet."""
    _bomb_guard_on()
    with _image_errors(where, limits):
        with warnings.catch_warnings():
            # Our own named limits are checked first; past twice Pillow's guard, Pillow
            # refuses in Image.open itself.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        limits.check("max_image_side", max(width, height), f"{where} side in pixels")
        limits.check("max_image_pixels", width * height, f"{where} pixel count")
        if image.format not in ACCEPTED_FORMATS:
            raise ImageInputError(
                415, "unsupported_image",
                f"{where}: image format {image.format} is not one of {ACCEPTED_FORMATS}")
        if budget is not None:
            budget.charge(width * height, where)
    return OpenedImage(image, where)


def decode_opened(opened: OpenedImage, limits: ServeLimits) -> np.ndarray:
    """An opened image's pixels -> (H, W, 3) uint8."""
    with _image_errors(opened.where, limits):
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened.image.load()
            return np.array(opened.image.convert("RGB"), dtype=np.uint8)  # writable, contiguous


def decode_image(data: bytes, where: str, limits: ServeLimits,
                 budget: PixelBudget | None = None) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8; the header is checked against the limits
    and the request's pixel budget (held from the replica's pixels) before any pixel is
    decoded."""
    return decode_images([open_image(data, where, limits, budget)], limits, budget)[0]


def open_images(specs, field: str, limits: ServeLimits, allowed_prefixes=(),
                count_limit: str | None = "max_images",
                budget: PixelBudget | None = None) -> list[OpenedImage]:
    """Read and check the headers of a list of request images named `field` (e.g.
    `memory_images`); `count_limit` names the limit on their number (None when the caller
    fixes the count itself); their pixels are charged to `budget`."""
    if specs is None:
        return []
    if count_limit is not None:
        limits.check(count_limit, len(specs), f"number of {field}")
    return [open_image(image_bytes(spec, f"{field}[{i}]", limits, allowed_prefixes),
                       f"{field}[{i}]", limits, budget)
            for i, spec in enumerate(specs)]


def decode_images(opened: list[OpenedImage], limits: ServeLimits,
                  budget: PixelBudget | None = None) -> list[np.ndarray]:
    """Decode opened images, after holding every pixel the request charged so far (all its
    fields at once) from the replica's pixels."""
    if budget is not None and opened:
        budget.hold(opened[0].where)
    return [decode_opened(image, limits) for image in opened]


def load_images(specs, field: str, limits: ServeLimits, allowed_prefixes=(),
                count_limit: str | None = "max_images",
                budget: PixelBudget | None = None) -> list[np.ndarray]:
    """Open and decode a list of request images (`open_images`, then `decode_images`);
    `budget` is the request's pixel budget (a new one when None)."""
    budget = budget if budget is not None else PixelBudget(limits)
    return decode_images(open_images(specs, field, limits, allowed_prefixes, count_limit,
                                     budget), limits, budget)
