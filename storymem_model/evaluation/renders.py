"""Committed story renders in an output folder, as the evaluation reads them.

The runner writes `{out}/{story_id}/{config_hash}/` (`storymem_model.output_layout`). Only
committed renders (`_COMMITTED.json`) count; an unfinished or broken one is reported with
the reason, never guessed at. Folders whose name starts with "_" or "." (such as the
evaluation's own `_eval`) are not stories.

Each config hash is one "method", a Table 1 row: "storymem", or "independent" for the
no-memory baseline (`storymem bench-stbench --baseline independent`, `storymem render
--no-memory`: its config says `memory: false`; renders made before that option have a
model id ending in "+independent"). Two different configs with the same label get their
hash appended, so they are never averaged together.
"""
from __future__ import annotations

import io
import json
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from storymem_model import output_layout as layout
from storymem_model import storage
from storymem_model.evaluation.rows import EvalRow
from storymem_model.records import ShotRecord

# model id suffix of the no-memory baseline before RenderConfig.memory existed (old renders)
LEGACY_INDEPENDENT_SUFFIX = "+independent"
# A story's shots.parquet (at most 200 shots) is our own object, read with a limit all the
# same: storage is shared, a file can be replaced or damaged.
MAX_SHOTS_TABLE_BYTES = 64 * 1024 * 1024


class EvaluationError(RuntimeError):
    """A story render (or output folder) that cannot be evaluated, with the reason."""


@dataclass
class RenderedStory:
    """One committed story render found in an output folder."""

    story_id: str
    config_hash: str
    uri: str
    config: dict
    story_name: str = ""
    overview: str | None = None
    shots: list[ShotRecord] = field(default_factory=list)  # in shot_index order
    method: str = "storymem"


def method_label(config: dict) -> str:
    """"independent" for the no-memory baseline, else "storymem"; "-fast" appended for
    renders made with the `fast` sampling preset."""
    if config.get("memory") is False \
            or str(config.get("model_id", "")).endswith(LEGACY_INDEPENDENT_SUFFIX):
        label = "independent"
    else:
        label = "storymem"
    return f"{label}-fast" if config.get("sampling_preset") == "fast" else label


def find_rendered_stories(out_uri: str, scripts: dict | None = None
                          ) -> tuple[list[RenderedStory], list[EvalRow]]:
    """Committed renders under `out_uri`, and a not-evaluated story row for every folder
    that is not one.

    `scripts` ({story_id: StoryScript}) restricts the search to those stories and supplies
    their overview and name; a script without any committed render is reported too.
    """
    fs, root = storage.filesystem(out_uri)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if not fs.exists(root):
        raise EvaluationError(f"output folder {out_uri} does not exist")
    found: list[RenderedStory] = []
    problems: list[EvalRow] = []
    story_ids = _child_names(fs, root)
    if scripts is not None:
        problems += [EvalRow.not_evaluated(
            story_id, "", "", f"no render of script {scripts[story_id].source} under {out_uri}",
            story_name=scripts[story_id].story_name)
            for story_id in sorted(set(scripts) - set(story_ids))]
        story_ids = [s for s in story_ids if s in scripts]
    for story_id in story_ids:
        for config_hash in _child_names(fs, posixpath.join(root, story_id)):
            uri = layout.story_uri(out_uri, story_id, config_hash)
            script = scripts.get(story_id) if scripts is not None else None
            try:
                story = load_render(uri, story_id, config_hash, script)
            except (EvaluationError, storage.StorageError, ValueError, OSError) as exc:
                problems.append(EvalRow.not_evaluated(story_id, config_hash, uri, str(exc)))
                continue
            found.append(story)
    _assign_methods(found)
    return found, problems


def read_shots_table(uri: str):
    """A story's shots.parquet at `uri` as a pyarrow Table (TooLarge past
    MAX_SHOTS_TABLE_BYTES, FileNotFoundError when absent)."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri, max_bytes=MAX_SHOTS_TABLE_BYTES)))


def load_render(uri: str, story_id: str, config_hash: str, script=None) -> RenderedStory:
    """The committed render at `uri` (EvaluationError when it is not one). `script`: its
    StoryScript when known (overview and name); else the render's own script.json."""
    marker = storage.read_commit_marker(uri)
    if marker is None:
        raise EvaluationError(f"{uri} is not committed (no {layout.COMMIT_MARKER}): "
                              "unfinished or failed render")
    config = marker.get("config") or _read_json(storage.join(uri, layout.CONFIG_FILE)) or {}
    try:
        table = read_shots_table(
            storage.join(uri, marker.get("shots_parquet", layout.SHOTS_PARQUET)))
    except FileNotFoundError:
        raise EvaluationError(f"{uri}: committed but {layout.SHOTS_PARQUET} is missing") from None
    try:
        shots = sorted((ShotRecord.from_row(row) for row in table.to_pylist()),
                       key=lambda r: r.shot_index)
    except TypeError as exc:  # a required column missing
        raise EvaluationError(f"{uri}: {layout.SHOTS_PARQUET} is not a shots table: "
                              f"{exc}") from None
    if not shots:
        raise EvaluationError(f"{uri}: {layout.SHOTS_PARQUET} has no shots")
    saved = _read_json(storage.join(uri, layout.SCRIPT_FILE)) or {}
    overview = (script.overview if script is not None else None) \
        or saved.get("story_overview") or None
    name = (script.story_name if script is not None else "") \
        or shots[0].story_name or saved.get("story_name") or story_id
    return RenderedStory(story_id, config_hash, uri, config, name, overview, shots,
                         method_label(config))


def decode_shot(story: RenderedStory, shot: ShotRecord) -> np.ndarray:
    """The frames of one shot's video, (F, H, W, 3) uint8, checked against its record."""
    from storymem_model.video_io import decode_mp4

    key = shot.video_key or layout.shot_video_key(shot.scene, shot.shot)
    try:
        frames = decode_mp4(storage.read_bytes(storage.join(story.uri, key)))
    except FileNotFoundError:
        raise EvaluationError(f"{story.uri}: shot video {key} is missing") from None
    if frames.shape[0] < 1:
        raise EvaluationError(f"{story.uri}: shot video {key} has no frames")
    if shot.num_frames and int(shot.num_frames) != frames.shape[0]:
        raise EvaluationError(f"{story.uri}: {key} decodes to {frames.shape[0]} frames, "
                              f"{layout.SHOTS_PARQUET} says {shot.num_frames}")
    return frames


def _child_names(fs, path: str) -> list[str]:
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        if entry.get("type") == "directory":
            name = posixpath.basename(entry["name"].rstrip("/"))
            if name and not name.startswith(("_", ".")):
                names.append(name)
    return sorted(names)


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None


def _assign_methods(stories: list[RenderedStory]) -> None:
    hashes: dict[str, set[str]] = defaultdict(set)
    for story in stories:
        hashes[story.method].add(story.config_hash)
    for story in stories:
        if len(hashes[story.method]) > 1:
            story.method = f"{story.method}-{story.config_hash}"
