"""The script planner: list a source, validate each script, sort stories by what is left to do.

    source --list_scripts--> listed scripts --read + validate--> story ids
           --config hash + storage--> pending | committed | invalid

`plan_items(source, out, config_hash)` streams `PlannedStory` / `InvalidScript` items in
listing order, reading each script once; the batch driver consumes it lazily (a script is
read only when a worker is free for it), and `storymem plan` and the Prefect flows use the
same code. (A Serve story job renders one inline script into a new job folder: it has
nothing to plan, and validates with the same `story_script` code, its ScriptError problems
answered as 422 `invalid_script`.) So every host names problems the same way:

    ManifestRowError  a manifest row that names no script
    ScriptError       a script that fails validation (every problem listed), or that
                      cannot be parsed at all (whatever the parser raised, named)
    ScriptNotFound    a listed script that is gone, or unreadable storage
    DuplicateStory    a second script with the same story id (same content): rendered once

`StoryPlan.build(...)` collects a whole plan (small rows only, scripts are not kept).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipelines.script_source import ListedScript, ListingProblem, list_scripts, read_script
from storymem_model import output_layout, storage
from storymem_model.records import Record
from storymem_model.story_script import ScriptError, ScriptNotFound, StoryScript


class PlanStatus(enum.StrEnum):
    PENDING = "pending"
    COMMITTED = "committed"
    INVALID = "invalid"


class PlanErrorType(enum.StrEnum):
    MANIFEST_ROW = "ManifestRowError"
    SCRIPT = "ScriptError"
    NOT_FOUND = "ScriptNotFound"
    DUPLICATE = "DuplicateStory"


@dataclass(frozen=True)
class PlannedStory(Record):
    """A valid story of the source: where it goes and whether it is done."""

    position: int
    source: str
    story_id: str
    story_name: str
    num_shots: int
    story_uri: str | None  # None when planned without a config hash
    status: str | None  # PlanStatus value: pending or committed; None without a config hash
    uri: str | None = None  # the script file, or None for an inline manifest row
    name: str | None = None  # the manifest row's name
    inline: Any = field(default=None, compare=False, repr=False,
                        metadata={"arrow": "string"})
    script: StoryScript | None = field(default=None, compare=False, repr=False,
                                       metadata={"arrow": "string"})

    def brief(self) -> dict:
        """The plan row as JSON (no script content)."""
        return {"position": self.position, "source": self.source, "story_id": self.story_id,
                "story_name": self.story_name, "num_shots": self.num_shots,
                "story_uri": self.story_uri, "status": self.status}

    def manifest_row(self) -> dict:
        """The JSONL manifest row `pipelines.script_source` reads back as this same story,
        with its place in the source and its source (the batch numbers and names its rows
        as the plan does; an unnamed inline script is read with its source as its name,
        hence gets the same story id)."""
        row: dict = {"uri": self.uri} if self.uri is not None else {"script": self.inline}
        if self.name is not None:
            row["name"] = self.name
        row.update(position=self.position, source=self.source)
        return row


@dataclass(frozen=True)
class InvalidScript(Record):
    """A listed item that cannot be rendered, with its error type and message."""

    position: int
    source: str
    error_type: str  # a PlanErrorType value
    message: str
    story_id: str | None = None

    def brief(self) -> dict:
        return {"position": self.position, "source": self.source,
                "error_type": self.error_type, "message": self.message,
                "story_id": self.story_id, "status": PlanStatus.INVALID.value}


def plan_items(source: str, out: str, config_hash: str | None, *,
               exclude: str | None = None) -> Iterator[PlannedStory | InvalidScript]:
    """Every item of `source` in listing order, each read and validated once (lazily).
    With `config_hash` None the scripts are only read and validated: no story folder is
    named and no commit marker read (`story_uri` and `status` None).

    Raises `pipelines.script_source.ScriptSourceError` when `source` itself is unusable
    (a run with a wrong source must fail loudly, not report "nothing to do"); the error is
    raised by the first `next()`.
    """
    seen: dict[str, tuple[int, str]] = {}
    for item in list_scripts(source, exclude=exclude):
        if isinstance(item, ListingProblem):
            yield InvalidScript(item.position, item.origin, PlanErrorType.MANIFEST_ROW.value,
                                item.message)
            continue
        script, problem = _read(item)
        if problem is not None:
            yield problem
            continue
        first = seen.get(script.story_id)
        if first is not None:
            yield InvalidScript(
                item.position, item.origin, PlanErrorType.DUPLICATE.value,
                f"{item.origin}: same story id {script.story_id} as {first[1]} (position "
                f"{first[0]}, identical content); rendered once", script.story_id)
            continue
        seen[script.story_id] = (item.position, item.origin)
        story_uri = status = None
        if config_hash is not None:
            story_uri = output_layout.story_uri(out, script.story_id, config_hash)
            status = (PlanStatus.COMMITTED if storage.is_committed(story_uri)
                      else PlanStatus.PENDING).value
        yield PlannedStory(
            position=item.position, source=item.origin, story_id=script.story_id,
            story_name=script.story_name, num_shots=len(script.shots), story_uri=story_uri,
            status=status, uri=item.uri, name=item.name, inline=item.inline, script=script)


def _read(item: ListedScript) -> tuple[StoryScript | None, InvalidScript | None]:
    try:
        return read_script(item), None
    except ScriptNotFound as exc:
        kind, message = PlanErrorType.NOT_FOUND, str(exc)
    except ScriptError as exc:
        kind, message = PlanErrorType.SCRIPT, str(exc)
    except (FileNotFoundError, storage.StorageError) as exc:
        kind, message = PlanErrorType.NOT_FOUND, f"{item.origin}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one unreadable item never stops the listing
        kind = PlanErrorType.SCRIPT
        message = (f"story script {item.origin} cannot be read: {type(exc).__name__}: "
                   f"{str(exc)[:500]}")
    return None, InvalidScript(item.position, item.origin, kind.value, message)


@dataclass
class StoryPlan:
    """A whole plan: what the run has to do (small rows, no script content)."""

    source: str
    out: str
    config_hash: str
    pending: list[PlannedStory] = field(default_factory=list)
    committed: list[PlannedStory] = field(default_factory=list)
    invalid: list[InvalidScript] = field(default_factory=list)

    @classmethod
    def build(cls, source: str, out: str, config_hash: str) -> "StoryPlan":
        plan = cls(source=source, out=out, config_hash=config_hash)
        for item in plan_items(source, out, config_hash, exclude=out):
            if isinstance(item, InvalidScript):
                plan.invalid.append(item)
                continue
            light = PlannedStory(**{**item.__dict__, "script": None})
            (plan.committed if item.status == PlanStatus.COMMITTED.value
             else plan.pending).append(light)
        return plan

    @property
    def listed(self) -> int:
        return len(self.pending) + len(self.committed) + len(self.invalid)

    def counts(self) -> dict:
        return {"listed": self.listed, "pending": len(self.pending),
                "committed": len(self.committed), "invalid": len(self.invalid)}

    def to_dict(self) -> dict:
        stories = sorted([s.brief() for s in self.pending + self.committed]
                         + [e.brief() for e in self.invalid], key=lambda r: r["position"])
        return {"source": self.source, "out": self.out, "config_hash": self.config_hash,
                **self.counts(), "stories": stories}

    def manifest_bytes(self) -> bytes:
        """The pending stories as a JSONL manifest (`pipelines.script_source` format),
        each row keeping its source position."""
        lines = [json.dumps(s.manifest_row(), ensure_ascii=False) for s in self.pending]
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
