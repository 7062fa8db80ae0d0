"""What a scheduled run has to do: list the scripts, validate them, drop committed stories.

The plan is written as a JSONL manifest (`pipelines.script_source` reads it) holding only
the stories that still need rendering, so the batch pipeline never sees the rest. Listing
streams (`list_scripts` is lazy) and each script is read once; only small rows are kept.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pipelines.script_source import ListingProblem, list_scripts, read_script
from storymem_model import output_layout, storage
from storymem_model.story_script import ScriptError


@dataclass
class PlannedStory:
    position: int
    source: str
    story_id: str
    story_name: str
    num_shots: int
    story_uri: str
    committed: bool
    uri: str | None = None
    inline: object = None
    name: str | None = None


@dataclass
class InvalidScript:
    position: int
    source: str
    stage: str  # listing (a bad manifest row) | validation (the script itself)
    error_type: str
    message: str


@dataclass
class StoryPlan:
    source: str
    out: str
    config_hash: str | None  # None: unknown here, the batch drops committed stories
    pending: list[PlannedStory] = field(default_factory=list)
    committed: list[PlannedStory] = field(default_factory=list)
    invalid: list[InvalidScript] = field(default_factory=list)

    @property
    def listed(self) -> int:
        return len(self.pending) + len(self.committed) + len(self.invalid)

    def counts(self) -> dict:
        return {"listed": self.listed, "pending": len(self.pending),
                "already_committed": len(self.committed), "invalid": len(self.invalid)}

    def to_dict(self) -> dict:
        return {"source": self.source, "out": self.out, "config_hash": self.config_hash,
                **self.counts(),
                "pending": [_brief(s) for s in self.pending],
                "committed": [_brief(s) for s in self.committed],
                "invalid": [asdict(e) for e in self.invalid]}


def _brief(story: PlannedStory) -> dict:
    return {"position": story.position, "source": story.source, "story_id": story.story_id,
            "story_name": story.story_name, "num_shots": story.num_shots,
            "story_uri": story.story_uri}


def plan_stories(source: str, out: str, config_hash: str | None) -> StoryPlan:
    """List `source`, validate every script, and split into pending / committed / invalid.

    With `config_hash=None` nothing is checked for commits here (every valid story is
    pending; the batch skips committed ones from their markers).

    Raises `pipelines.script_source.ScriptSourceError` when `source` itself is unusable
    (a run with a wrong source must fail loudly, not report "nothing to do").
    """
    plan = StoryPlan(source=source, out=out, config_hash=config_hash)
    for item in list_scripts(source):
        if isinstance(item, ListingProblem):
            plan.invalid.append(InvalidScript(item.position, item.origin, "listing",
                                              "ListingProblem", item.message))
            continue
        try:
            script = read_script(item)
        except ScriptError as exc:
            plan.invalid.append(InvalidScript(item.position, item.origin, "validation",
                                              type(exc).__name__, str(exc)))
            continue
        except FileNotFoundError as exc:  # listed, then gone: that script's problem only
            plan.invalid.append(InvalidScript(item.position, item.origin, "validation",
                                              type(exc).__name__, f"{item.origin}: {exc}"))
            continue
        if config_hash is None:
            story_uri, committed = "", False
        else:
            story_uri = output_layout.story_uri(out, script.story_id, config_hash)
            committed = storage.is_committed(story_uri)
        planned = PlannedStory(
            position=item.position, source=item.origin, story_id=script.story_id,
            story_name=script.story_name, num_shots=len(script.shots), story_uri=story_uri,
            committed=committed, uri=item.uri, inline=item.inline, name=item.name)
        (plan.committed if committed else plan.pending).append(planned)
    _check_unique_ids(plan)
    return plan


def _check_unique_ids(plan: StoryPlan) -> None:
    """Two scripts with one story id would write one folder: keep the first, flag the rest."""
    seen: dict[str, str] = {}
    keep = []
    for story in sorted(plan.pending + plan.committed, key=lambda s: s.position):
        if story.story_id in seen:
            plan.invalid.append(InvalidScript(
                story.position, story.source, "validation", "DuplicateStoryId",
                f"{story.source}: story id {story.story_id!r} is also used by "
                f"{seen[story.story_id]}; rename one of the stories"))
            continue
        seen[story.story_id] = story.source
        keep.append(story)
    plan.pending = [s for s in keep if not s.committed]
    plan.committed = [s for s in keep if s.committed]
    plan.invalid.sort(key=lambda e: e.position)


def manifest_lines(stories: list[PlannedStory]) -> bytes:
    """JSONL rows `pipelines.script_source` understands: `{"uri": ...}` or `{"script": ...}`."""
    lines = []
    for story in stories:
        row: dict = {"uri": story.uri} if story.uri is not None else {"script": story.inline}
        if story.name is not None:
            row["name"] = story.name
        lines.append(json.dumps(row, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def write_manifest(stories: list[PlannedStory], uri: str) -> str:
    storage.write_bytes(uri, manifest_lines(stories))
    return uri
