"""The run recorder: every story outcome and error row is on storage the moment it is known.

    {out}/runs/{run_id}/parts/stories/{position:09d}-{story_id}.json   one StoryRow each
    {out}/runs/{run_id}/parts/errors/{position:09d}-{stage}.json       one ErrorRow each

Each part is one small JSON file written whole (`storage.write_bytes`, atomic), under a key
that only depends on the listing position, so writing it again is harmless. A driver that
is killed loses nothing it had recorded. At the end `finish()` compacts the parts into
stories.parquet / errors.parquet (and shots.parquet, `pipelines.run_tables`); the parts
stay, small, as the run's journal.

Continuing: `RunRecorder.open(out, run_id)` removes what writes of a killed invocation
left unfinished (`storage.remove_unfinished_writes`) and reads the parts it recorded (each part is
size-checked before it is read: a part over `MAX_PART_BYTES` is a StorageError naming it); the driver does not render again a story whose outcome is recorded
(`recorded_story`), and rows recorded again (an invalid script listed again) replace
their earlier part. A run id therefore names one listing: continue it with the same
`--scripts`.
"""
from __future__ import annotations

import json
import posixpath

from pipelines.run_tables import (ErrorRow, RunTableUris, StoryRow, count_statuses, run_uri,
                                  write_run_tables)
from storymem_model import storage

PARTS_DIR = "parts"
STORY_PARTS = "stories"
ERROR_PARTS = "errors"
MAX_PART_BYTES = 1024 * 1024  # a row part is a few hundred bytes; an error message a few KB


class RunRecorder:
    """Writes a run's rows as parts as they come; compacts them into the run tables."""

    def __init__(self, out: str, run_id: str):
        self.run_id = run_id
        self.uri = run_uri(out, run_id)
        self.parts_uri = storage.join(self.uri, PARTS_DIR)
        self._stories: dict[str, StoryRow] = {}
        self._errors: dict[str, ErrorRow] = {}
        self.recorded_before = 0  # rows read back from an earlier invocation

    @classmethod
    def open(cls, out: str, run_id: str) -> "RunRecorder":
        """A recorder holding every part already on storage for this run id."""
        recorder = cls(out, run_id)
        storage.remove_unfinished_writes(recorder.uri)  # we hold the output lock: they are leftovers
        for key, row in read_parts(recorder.parts_uri, STORY_PARTS, StoryRow).items():
            recorder._stories[key] = row
        for key, row in read_parts(recorder.parts_uri, ERROR_PARTS, ErrorRow).items():
            recorder._errors[key] = row
        recorder.recorded_before = len(recorder._stories) + len(recorder._errors)
        return recorder

    # -- rows as they come -------------------------------------------------------------
    def record_story(self, row: StoryRow) -> None:
        key = story_part_key(row.position, row.story_id)
        self._write(STORY_PARTS, key, row)
        self._stories[key] = row

    def record_error(self, row: ErrorRow) -> None:
        key = error_part_key(row.position, row.stage)
        self._write(ERROR_PARTS, key, row)
        self._errors[key] = row

    def recorded_story(self, position: int, story_id: str) -> StoryRow | None:
        """The outcome recorded for this listed story, if any (this or an earlier
        invocation of the run)."""
        return self._stories.get(story_part_key(position, story_id))

    @property
    def stories(self) -> list[StoryRow]:
        return sorted(self._stories.values(), key=lambda r: r.position)

    @property
    def errors(self) -> list[ErrorRow]:
        return sorted(self._errors.values(), key=lambda r: (r.position, r.stage))

    def counts(self) -> dict[str, int]:
        return count_statuses(self._stories.values(), self._errors.values())

    # -- the end -----------------------------------------------------------------------
    def finish(self) -> RunTableUris:
        """Compact every recorded row into the run's Parquet tables."""
        return write_run_tables(self.uri, self.run_id, self.stories, self.errors)

    def _write(self, kind: str, key: str, row) -> None:
        data = json.dumps(row.to_row(), sort_keys=True, ensure_ascii=False).encode("utf-8")
        storage.write_bytes(storage.join(self.parts_uri, kind, key + ".json"), data)


def story_part_key(position: int, story_id: str) -> str:
    return f"{int(position):09d}-{story_id}"


def error_part_key(position: int, stage: str) -> str:
    return f"{int(position):09d}-{stage}"


def read_parts(parts_uri: str, kind: str, record_cls) -> dict:
    """{key: record} of the parts of one kind under `parts_uri` (fetched concurrently, each
    size-checked first)."""
    folder = storage.join(parts_uri, kind)
    fs, root = storage.filesystem(folder)
    root = root.rstrip("/")
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(root)
    if not fs.exists(root):
        return {}
    sizes = {}
    for path, info in fs.find(root, maxdepth=1, detail=True).items():
        name = posixpath.basename(path)
        if name.endswith(".json") and not name.startswith("."):
            sizes[name] = (path, int(info.get("size") or 0))
    too_big = [f"{folder}/{n} ({size} bytes)" for n, (_, size) in sorted(sizes.items())
               if size > MAX_PART_BYTES]
    if too_big:
        raise storage.StorageError(f"run part(s) larger than the limit of {MAX_PART_BYTES} "
                                   f"bytes, not read: {', '.join(too_big)}")
    names = sorted(sizes)
    if not names:
        return {}
    paths = [sizes[name][0] for name in names]
    contents = fs.cat(paths)
    out = {}
    for name, path in zip(names, paths):
        try:
            row = record_cls.from_row(json.loads(contents[path]))
        except (ValueError, TypeError) as exc:
            raise storage.StorageError(f"{folder}/{name}: not a {record_cls.__name__} part "
                                       f"({exc})") from exc
        out[name[:-len(".json")]] = row
    return out
