"""Story scripts: the ST-Bench JSON format (read with json5) or a plain list of shot prompts.

A script is validated completely before any model work: every problem is collected and
reported at once in a `ScriptError`, each message naming the file, the scene and the shot.

Accepted input
- ST-Bench format: ``{"story_name", "story_overview", "scenes": [{"scene_num",
  "video_prompts": [...], "first_frame_prompt": [...], "cut": [...]}]}``, JSON5 allowed
  (comments, trailing commas, single quotes). ``cut`` values are booleans or the strings
  "True"/"False" (any letter case). ``cut`` may be left out: every shot is then a hard cut.
  ``first_frame_prompt`` may be left out or null.
- A plain list of shot prompts: one scene, every shot a hard cut.

Policies
- The first shot of a story must be a cut (there is no earlier shot to continue from);
  a script whose first shot says ``cut: false`` is refused, not silently fixed.
  The first shot of a later scene may continue the previous scene's last shot.
- ``scene_num``, when given, must equal the scene's position (1, 2, 3, ...).
- Size limits: see MAX_* below.

Story ids
``story_id = slug(story_name) + "-" + first 10 hex digits of sha256(canonical story)``.
The slug keeps ASCII letters and digits (accents are folded, apostrophes dropped, case is
lowered), turns every other run into a single "-" and is cut to 48 characters; without a story name the file stem (or
the ``name`` argument) is used, and "story" when nothing is left. The canonical story is
the parsed content (name, overview, and every shot's scene, shot, prompt, cut and
first-frame prompt) as sorted-key JSON, so the id does not depend on JSON5 formatting,
comments or "True" vs true. The id therefore only holds ``[a-z0-9-]`` (safe as a path and
as an object key: no traversal), two different stories never share an id (up to a
40-bit hash collision), and an edited script gets a new id instead of resuming into the
outputs of its old version.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import json5

MAX_SCRIPT_BYTES = 1_000_000
MAX_NESTING = 32  # a script is 4 levels deep; deeper input is refused before parsing
MAX_REPORTED_PROBLEMS = 20  # a ScriptError lists this many and counts the rest
MAX_SHOTS = 200
MAX_SCENES = 100
MAX_PROMPT_CHARS = 4000
MAX_NAME_CHARS = 300
MAX_OVERVIEW_CHARS = 20_000
SLUG_MAX_CHARS = 48
ID_HASH_CHARS = 10


class ScriptError(ValueError):
    """A story script that cannot be rendered; `problems` lists every problem found."""

    def __init__(self, source: str, problems: list[str], total: int | None = None):
        self.source = source
        self.problems = list(problems)[:MAX_REPORTED_PROBLEMS]
        self.total = max(len(problems), total or 0)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        more = (f" (the first {len(self.problems)} listed)"
                if self.total > len(self.problems) else "")
        super().__init__(f"story script {source} has {self.total} problem(s){more}:\n{lines}")


class ScriptNotFound(ScriptError):
    """A script file that does not exist (or cannot be read); a ScriptError."""


@dataclass(frozen=True)
class ShotSpec:
    scene: int  # 1-based scene number
    shot: int  # 1-based shot number within its scene
    shot_index: int  # 0-based position in the whole story
    prompt: str
    cut: bool
    first_frame_prompt: str | None = None


@dataclass(frozen=True)
class StoryScript:
    story_id: str
    story_name: str
    overview: str
    shots: list[ShotSpec] = field(default_factory=list)
    source: str = "<memory>"

    @property
    def num_scenes(self) -> int:
        return len({s.scene for s in self.shots})

    def to_dict(self) -> dict:
        """The script back in ST-Bench form (booleans for cuts)."""
        scenes: list[dict] = []
        for spec in self.shots:
            if not scenes or scenes[-1]["scene_num"] != spec.scene:
                scenes.append({"scene_num": spec.scene, "video_prompts": [],
                               "first_frame_prompt": [], "cut": []})
            scenes[-1]["video_prompts"].append(spec.prompt)
            scenes[-1]["first_frame_prompt"].append(spec.first_frame_prompt or "")
            scenes[-1]["cut"].append(spec.cut)
        return {"story_name": self.story_name, "story_overview": self.overview,
                "scenes": scenes}


def load_script(script: str | Path | dict | list, name: str | None = None) -> StoryScript:
    """Read and validate a story script.

    `script` is a local path, an fsspec URI (s3://...), or already-parsed JSON (a dict
    in ST-Bench form or a list of prompts). `name` labels in-memory scripts in messages
    and stands in for the file stem when the script has no story_name.
    Raises ScriptError listing every problem, with file, scene and shot.
    """
    if isinstance(script, (dict, list)):
        source = name or "<memory>"
        stem = name or "story"
        depth = value_nesting_depth(script)
        if depth > MAX_NESTING:
            raise ScriptError(source, [f"{source}: nested more than {MAX_NESTING} levels "
                                       f"deep (a script needs 4)"])
        return _build(script, source, stem)
    if not isinstance(script, (str, Path)):
        raise ScriptError(name or "<memory>", [
            f"<memory>: a script must be a path, a URI, a dict or a list, "
            f"got {type(script).__name__}"])
    source = str(script)
    stem = name or _stem(source)
    raw = _read(source)
    return _build(parse_script_text(raw, source), source, stem)


def parse_script_text(raw: bytes, source: str = "<memory>") -> Any:
    """Bytes of a script file -> parsed value; ScriptError for size, UTF-8, nesting, syntax.

    Standard JSON is tried first (fast, in C); JSON5 (comments, trailing commas, single
    quotes; pure Python, ~80 KB/s) only when that fails. Nesting deeper than MAX_NESTING is
    refused before either parser sees the text (both recurse per level)."""
    if len(raw) > MAX_SCRIPT_BYTES:
        raise ScriptError(source, [
            f"{source}: file is {len(raw)} bytes, more than the limit of "
            f"{MAX_SCRIPT_BYTES} bytes"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScriptError(source, [
            f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start} cannot be decoded)"]) from None
    if not text.strip():
        raise ScriptError(source, [f"{source}: file is empty"])
    depth = text_nesting_depth(text)
    if depth > MAX_NESTING:
        raise ScriptError(source, [f"{source}: nested {depth} levels deep, more than the "
                                   f"limit of {MAX_NESTING} (a script needs 4)"])
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return json5.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ScriptError(source, [f"{source}: not valid JSON/JSON5: {exc}"]) from None


def text_nesting_depth(text: str) -> int:
    """Deepest [ / { nesting of JSON or JSON5 text, strings and comments skipped; one pass."""
    depth = deepest = 0
    quote = None
    i, end = 0, len(text)
    while i < end:
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "/" and text.startswith("//", i):
            newline = text.find("\n", i)
            i = end if newline < 0 else newline
        elif char == "/" and text.startswith("/*", i):
            close = text.find("*/", i + 2)
            i = end if close < 0 else close + 1
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
        i += 1
    return deepest


def value_nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """Nesting depth of parsed JSON values (lists and dicts), counted without recursion and
    stopped once past `limit`."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (list, dict)))
    return deepest


def story_id_for(story_name: str, canonical: dict) -> str:
    """The story id rule (see the module docstring)."""
    slug = slugify(story_name) or "story"
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return f"{slug}-{hashlib.sha256(blob).hexdigest()[:ID_HASH_CHARS]}"


def slugify(text: str) -> str:
    text = re.sub(r"['\u2019\u2018`]", "", text)  # "Bean's" -> "beans"
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    return slug[:SLUG_MAX_CHARS].rstrip("-")


# ---------------------------------------------------------------------------------------
def _read(source: str) -> bytes:
    from storymem_model import storage

    try:
        fs, path = storage.filesystem(source)
        if fs.isdir(path):
            raise IsADirectoryError(source)
        # never read more than the limit: a huge object or /dev/zero is refused unread
        return storage.read_bytes(source, max_bytes=MAX_SCRIPT_BYTES)
    except storage.TooLarge:
        raise ScriptError(source, [f"{source}: file is more than the limit of "
                                   f"{MAX_SCRIPT_BYTES} bytes (not read whole)"]) from None
    except FileNotFoundError:
        raise ScriptNotFound(source, [f"{source}: file not found"]) from None
    except IsADirectoryError:
        raise ScriptError(source, [f"{source}: is a folder, not a script file"]) from None
    except (OSError, storage.StorageError) as exc:
        raise ScriptNotFound(source, [f"{source}: cannot be read: {exc}"]) from None


def _stem(source: str) -> str:
    base = posixpath.basename(source.replace("\\", "/").rstrip("/"))
    return base.rsplit(".", 1)[0] if "." in base else base


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


_CONTROL = {chr(c) for c in range(32)} - {"\t", "\n", "\r"} | {chr(127)}


def _control_character(text: str) -> str | None:
    """The first control character in `text` (tabs and line breaks are text), e.g. a NUL
    that JSON5 lets through inside a string; None when there is none."""
    for char in text:
        if char in _CONTROL:
            return f"U+{ord(char):04X}"
    return None


def _cut_value(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _build(data: Any, source: str, stem: str) -> StoryScript:
    problems: list[str] = []
    if isinstance(data, list):
        data = {"scenes": [{"video_prompts": data}]}
        plain_list = True
    else:
        plain_list = False
    if not isinstance(data, dict):
        raise ScriptError(source, [
            f"{source}: top level must be an object (ST-Bench format) or a list of "
            f"prompts, got {_type_name(data)}"])

    story_name = data.get("story_name")
    if story_name is None:
        story_name = stem
    elif not isinstance(story_name, str):
        problems.append(f"{source}: story_name must be a string, got {_type_name(story_name)}")
        story_name = stem
    elif not story_name.strip():
        problems.append(f"{source}: story_name is empty")
    elif len(story_name) > MAX_NAME_CHARS:
        problems.append(f"{source}: story_name has {len(story_name)} characters, "
                        f"more than {MAX_NAME_CHARS}")
    elif (control := _control_character(story_name)) is not None:
        problems.append(f"{source}: story_name contains the control character {control}")
    overview = data.get("story_overview", "")
    if overview is None:
        overview = ""
    elif not isinstance(overview, str):
        problems.append(f"{source}: story_overview must be a string, got {_type_name(overview)}")
        overview = ""
    elif len(overview) > MAX_OVERVIEW_CHARS:
        problems.append(f"{source}: story_overview has {len(overview)} characters, "
                        f"more than {MAX_OVERVIEW_CHARS}")

    scenes = data.get("scenes")
    if scenes is None:
        problems.append(f"{source}: missing 'scenes' (a list of scenes)")
        scenes = []
    elif not isinstance(scenes, list):
        problems.append(f"{source}: 'scenes' must be a list, got {_type_name(scenes)}")
        scenes = []
    elif not scenes:
        problems.append(f"{source}: 'scenes' is empty; a story needs at least one shot")
    elif len(scenes) > MAX_SCENES:
        problems.append(f"{source}: {len(scenes)} scenes, more than the limit of {MAX_SCENES}")
        scenes = scenes[:MAX_SCENES]

    shots: list[ShotSpec] = []
    total_shots = 0
    for position, scene in enumerate(scenes, start=1):
        where = f"{source}: scene {position}"
        if not isinstance(scene, dict):
            problems.append(f"{where}: must be an object, got {_type_name(scene)}")
            continue
        if "scene_num" in scene and not plain_list:
            num = scene["scene_num"]
            if isinstance(num, bool) or not isinstance(num, int):
                problems.append(f"{where}: scene_num must be an integer, got {_type_name(num)}")
            elif num != position:
                problems.append(f"{where}: scene_num is {num} but the scene is number "
                                f"{position} in order (scenes are numbered 1, 2, 3, ...)")
        prompts = scene.get("video_prompts")
        if prompts is None:
            problems.append(f"{where}: missing 'video_prompts'")
            continue
        if not isinstance(prompts, list):
            problems.append(f"{where}: 'video_prompts' must be a list, got {_type_name(prompts)}")
            continue
        if not prompts:
            problems.append(f"{where}: 'video_prompts' is empty")
            continue
        total_shots += len(prompts)
        if total_shots > MAX_SHOTS:
            continue  # refused below; nothing more to check shot by shot (bounded work)

        cuts = scene.get("cut")
        if cuts is None:
            cuts = [True] * len(prompts)
        elif not isinstance(cuts, list):
            problems.append(f"{where}: 'cut' must be a list, got {_type_name(cuts)}")
            cuts = [True] * len(prompts)
        elif len(cuts) != len(prompts):
            problems.append(f"{where}: 'cut' has {len(cuts)} values but there are "
                            f"{len(prompts)} video_prompts")
            cuts = (list(cuts) + [True] * len(prompts))[:len(prompts)]

        ffps = scene.get("first_frame_prompt")
        if ffps is None:
            ffps = [None] * len(prompts)
        elif not isinstance(ffps, list):
            problems.append(f"{where}: 'first_frame_prompt' must be a list, "
                            f"got {_type_name(ffps)}")
            ffps = [None] * len(prompts)
        elif len(ffps) != len(prompts):
            problems.append(f"{where}: 'first_frame_prompt' has {len(ffps)} values but "
                            f"there are {len(prompts)} video_prompts")
            ffps = (list(ffps) + [None] * len(prompts))[:len(prompts)]

        for shot_no, (prompt, cut_raw, ffp) in enumerate(zip(prompts, cuts, ffps), start=1):
            shot_where = f"{where}, shot {shot_no}"
            ok = True
            if not isinstance(prompt, str):
                problems.append(f"{shot_where}: prompt must be a string, got {_type_name(prompt)}")
                ok = False
            elif not prompt.strip():
                problems.append(f"{shot_where}: prompt is empty")
                ok = False
            elif len(prompt) > MAX_PROMPT_CHARS:
                problems.append(f"{shot_where}: prompt has {len(prompt)} characters, "
                                f"more than the limit of {MAX_PROMPT_CHARS}")
                ok = False
            elif (control := _control_character(prompt)) is not None:
                problems.append(f"{shot_where}: prompt contains the control character "
                                f"{control}")
                ok = False
            cut = _cut_value(cut_raw)
            if cut is None:
                problems.append(f"{shot_where}: cut must be true/false or \"True\"/\"False\", "
                                f"got {cut_raw!r}")
                ok = False
            if ffp is not None and not isinstance(ffp, str):
                problems.append(f"{shot_where}: first_frame_prompt must be a string, "
                                f"got {_type_name(ffp)}")
                ok = False
            elif isinstance(ffp, str) and len(ffp) > MAX_PROMPT_CHARS:
                problems.append(f"{shot_where}: first_frame_prompt has {len(ffp)} characters, "
                                f"more than the limit of {MAX_PROMPT_CHARS}")
                ok = False
            if position == 1 and shot_no == 1 and cut is False:
                problems.append(
                    f"{shot_where}: the first shot of a story must be a cut (cut: true); "
                    f"there is no earlier shot to continue from")
                ok = False
            if ok:
                shots.append(ShotSpec(
                    scene=position, shot=shot_no, shot_index=len(shots),
                    prompt=prompt.strip(), cut=bool(cut),
                    first_frame_prompt=(ffp.strip() or None) if isinstance(ffp, str) else None))

    if total_shots > MAX_SHOTS:
        problems.append(f"{source}: {total_shots} shots, more than the limit of {MAX_SHOTS}")
    if problems:
        raise ScriptError(source, problems)

    story_name = story_name.strip()
    canonical = {
        "story_name": story_name, "story_overview": overview.strip(),
        "shots": [[s.scene, s.shot, s.prompt, s.cut, s.first_frame_prompt] for s in shots],
    }
    return StoryScript(story_id=story_id_for(story_name, canonical), story_name=story_name,
                       overview=overview.strip(), shots=shots, source=source)
