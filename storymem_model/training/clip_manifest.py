"""The clips to train on: a manifest (JSONL or Parquet) or the dataset flow's output.

A manifest row names one clip: `clip_uri` (local path or s3://), `caption`, and optionally
`group_id` (clips of one group form a pseudo-story; their keyframes are each other's memory)
and `order` (the position of the clip in its group). The dataset flow writes one row per
rendered shot under `data/split=*/*.parquet`; those rows are read as they are: `video_uri`
is the clip, `prompt` its caption, `story_id` its group and `shot_index` its order.

Rows that cannot be used (no clip URI, no caption, a duplicate clip, a bad order) become
`ClipError` rows with their reason; the others go on. A manifest that is not readable at
all, or lacks the required columns, raises `ManifestError`.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass

from storymem_model import storage
from storymem_model.records import Record

MANIFEST_COLUMNS = ("clip_uri", "caption")
DATASET_COLUMNS = ("video_uri", "prompt", "story_id", "shot_index")
DATASET_DATA_DIR = "data"
DATASET_CARD = "dataset_card.json"
MAX_MANIFEST_BYTES = 1 << 30


class ManifestError(ValueError):
    """A clip list that cannot be read at all (names the URI and the problem)."""


@dataclass(frozen=True)
class ClipInput(Record):
    """One clip to prepare. `clip_id` is derived from the clip URI (stable across runs);
    `position` is its row in the input; `group_id` / `order` None when not given."""

    clip_id: str
    clip_uri: str
    caption: str
    position: int
    group_id: str | None = None
    order: int | None = None


@dataclass(frozen=True)
class ClipError(Record):
    """A clip left out of the prepared data, and why (the prepare's errors table)."""

    clip_uri: str
    stage: str  # "manifest", "decode" or "encode"
    reason: str
    position: int = -1
    clip_id: str = ""
    caption: str = ""


def clip_id_for(clip_uri: str) -> str:
    return hashlib.sha256(clip_uri.encode("utf-8")).hexdigest()[:16]


def read_clip_inputs(uri: str) -> tuple[list[ClipInput], list[ClipError]]:
    """(usable clips, refused rows) of a manifest or a dataset folder."""
    rows, dataset = _read_rows(uri)
    if dataset:
        rows = [{"clip_uri": r.get("video_uri"), "caption": r.get("prompt"),
                 "group_id": r.get("story_id"), "order": r.get("shot_index")} for r in rows]
    clips: list[ClipInput] = []
    errors: list[ClipError] = []
    seen: dict[str, int] = {}
    for position, row in enumerate(rows):
        clip_uri, caption = row.get("clip_uri"), row.get("caption")
        group, order = row.get("group_id"), row.get("order")

        def refuse(reason: str) -> None:
            uri = clip_uri.strip() if isinstance(clip_uri, str) else ""
            errors.append(ClipError(clip_uri=uri, stage="manifest", reason=reason, position=position,
                                    clip_id=clip_id_for(uri) if uri else "", caption=str(caption or "")))

        if not isinstance(clip_uri, str) or not clip_uri.strip():
            refuse("no clip_uri")
            continue
        clip_uri = clip_uri.strip()
        if not isinstance(caption, str) or not caption.strip():
            refuse("no caption")
            continue
        if clip_uri in seen:
            refuse(f"duplicate clip_uri (first at row {seen[clip_uri]})")
            continue
        if group is not None and not isinstance(group, (str, int)) or isinstance(group, bool):
            refuse(f"group_id must be a string, got {group!r}")
            continue
        if order is not None and (isinstance(order, bool) or not isinstance(order, (int, float))
                                  or float(order) != int(order)):
            refuse(f"order must be an integer, got {order!r}")
            continue
        if order is not None and group is None:
            refuse("order without group_id")
            continue
        seen[clip_uri] = position
        clips.append(ClipInput(
            clip_id=clip_id_for(clip_uri), clip_uri=clip_uri, caption=caption.strip(),
            position=position, group_id=None if group is None or str(group) == "" else str(group),
            order=None if order is None else int(order)))
    return clips, errors


def _read_rows(uri: str) -> tuple[list[dict], bool]:
    """(rows, whether they are dataset-flow rows)."""
    try:
        fs, path = storage.filesystem(uri)
        is_dir = fs.isdir(path)
    except (storage.StorageError, OSError) as exc:
        raise ManifestError(f"{uri}: cannot open the clip list: {exc}") from exc
    if is_dir:
        return _dataset_rows(uri), True
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise ManifestError(f"{uri}: clip manifest not found") from None
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{uri}: manifest of {size} bytes is larger than "
                            f"{MAX_MANIFEST_BYTES} bytes; split it")
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        rows = _parquet_rows(data, uri)
    elif uri.endswith(".jsonl") or uri.endswith(".json"):
        rows = _jsonl_rows(data, uri)
    else:
        raise ManifestError(f"{uri}: a clip manifest is .jsonl or .parquet (or the dataset "
                            "flow's output folder)")
    if rows and all(c in rows[0] for c in DATASET_COLUMNS) and "clip_uri" not in rows[0]:
        return rows, True
    _require_columns(rows, MANIFEST_COLUMNS, uri)
    return rows, False


def _parquet_rows(data: bytes, where: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise ManifestError(f"{where}: not a readable Parquet file ({exc})") from exc


def _jsonl_rows(data: bytes, where: str) -> list[dict]:
    rows = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ManifestError(f"{where}: line {number} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _require_columns(rows: list[dict], columns: tuple[str, ...], where: str) -> None:
    if not rows:
        raise ManifestError(f"{where}: no clips listed")
    names = set().union(*(r.keys() for r in rows))
    missing = [c for c in columns if c not in names]
    if missing:
        raise ManifestError(f"{where}: missing column(s) {missing}; a clip manifest has "
                            f"clip_uri, caption and optionally group_id and order (found "
                            f"{sorted(names)[:20]})")


def _dataset_rows(uri: str) -> list[dict]:
    """Rows of the dataset flow's output (only a committed dataset is read)."""
    if not storage.is_committed(uri):
        raise ManifestError(f"{uri}: a folder given as clips must be the dataset flow's "
                            f"committed output ({storage.COMMIT_MARKER} missing)")
    files = [rel for rel in storage.list_files(storage.join(uri, DATASET_DATA_DIR))
             if rel.endswith(".parquet")]
    if not files:
        raise ManifestError(f"{uri}: no {DATASET_DATA_DIR}/split=*/*.parquet files")
    rows: list[dict] = []
    for rel in sorted(files):
        table = _parquet_rows(storage.read_bytes(storage.join(uri, DATASET_DATA_DIR, rel)),
                              posixpath.join(uri, DATASET_DATA_DIR, rel))
        rows += [{k: r.get(k) for k in DATASET_COLUMNS} for r in table]
    _require_columns(rows, DATASET_COLUMNS, uri)
    return rows


def inputs_fingerprint(clips: list[ClipInput]) -> str:
    """A content id of the clip list (URIs, captions, groups, orders, in input order)."""
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(json.dumps(clip.to_row(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()
