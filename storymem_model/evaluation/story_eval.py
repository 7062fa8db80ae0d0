"""Evaluate rendered stories (the runner's layout) with the paper's ST-Bench metrics.

Input: an output folder/URI with `{out}/{story_id}/{config_hash}/` story renders. Only
committed renders (`_COMMITTED.json`) count; anything else is reported as not evaluated.
Each config hash is one "method" (a Table 1 row): "storymem", or "independent" for the
no-memory baseline that `storymem bench-stbench --baseline independent` (or `storymem
render --no-memory`) renders (its config has `memory: false`; renders made before that
option have a model id ending in "+independent"); two different configs with the same
label get their hash appended.

Per story render, with a `VideoTextEncoder` (ViCLIP in the paper) and an aesthetic
`ImageScorer` (LAION predictor on CLIP ViT-L/14):
- each shot video (`shots/*.mp4`, decoded: what viewers see) -> one video embedding from
  the encoder's sampled frames (8 for ViCLIP, see video_encoders) and its prompt ->
  one text embedding; single-shot prompt following = their cosine;
- the whole story video (the shots back to back, exactly the stitched `{story_id}.mp4`)
  -> 8 frames sampled over its full length -> one embedding; the story text is the
  script's `story_overview`, or every shot prompt joined with spaces when there is none
  (`global_text_source` says which); global prompt following = their cosine. ViCLIP
  reads 32 tokens, so long overviews count by their beginning (as in any ViCLIP scoring);
- every frame of every shot (or `aesthetic_frames` evenly sampled per shot) scored by the
  aesthetic predictor, /10;
- cross-shot consistency from the shot embeddings (metrics.story_consistency).

Output (under `report_uri`, default `{out}/_eval`; story ids never start with "_"):
`eval.parquet` (one row per shot, per story and per method, column `level` =
"shot" | "story" | "benchmark"), `summary.json` (the Table-1 rows) and the report
(`storymem_model.evaluation.eval_report`). A story that cannot be evaluated gets a story row with
`error` set; the others are still evaluated.
"""
from __future__ import annotations

import io
import json
import logging
import math
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from storymem_model import storage
from storymem_model.evaluation import eval_report, metrics
from storymem_model import output_layout as layout
from storymem_model.evaluation.video_encoders import sample_frame_indices

log = logging.getLogger("storymem.eval")

# model id suffix of the no-memory baseline before RenderConfig.memory existed (old renders)
LEGACY_INDEPENDENT_SUFFIX = "+independent"
EVAL_DIR = "_eval"
EVAL_PARQUET = "eval.parquet"
SUMMARY_JSON = "summary.json"


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
    shots: list[dict] = field(default_factory=list)  # scene, shot, shot_index, prompt, ...
    method: str = "storymem"


@dataclass
class EvaluationResult:
    shot_rows: list[dict]
    story_rows: list[dict]
    summary_rows: list[dict]
    report_uri: str
    parquet_uri: str
    files: dict[str, str]

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.story_rows if r.get("error")]


# ---------------------------------------------------------------------------------------
# finding renders


def method_label(config: dict) -> str:
    """"independent" for the no-memory baseline, else "storymem"."""
    if config.get("memory") is False \
            or str(config.get("model_id", "")).endswith(LEGACY_INDEPENDENT_SUFFIX):
        return "independent"
    return "storymem"


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


def find_rendered_stories(out_uri: str, scripts: dict | None = None
                          ) -> tuple[list[RenderedStory], list[dict]]:
    """Committed renders under `out_uri` and error rows for the folders that are not.

    `scripts` ({story_id: StoryScript}) restricts the search to those stories and supplies
    their overview; a script without any committed render is reported too.
    """
    fs, root = storage.filesystem(out_uri)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if not fs.exists(root):
        raise EvaluationError(f"output folder {out_uri} does not exist")
    found: list[RenderedStory] = []
    problems: list[dict] = []
    story_ids = _child_names(fs, root)
    if scripts is not None:
        missing = sorted(set(scripts) - set(story_ids))
        problems += [_error_row(sid, "", "", f"no render of script "
                                f"{getattr(scripts[sid], 'source', sid)} under {out_uri}",
                                story_name=getattr(scripts[sid], "story_name", ""))
                     for sid in missing]
        story_ids = [s for s in story_ids if s in scripts]
    for story_id in story_ids:
        for config_hash in _child_names(fs, posixpath.join(root, story_id)):
            uri = layout.story_uri(out_uri, story_id, config_hash)
            try:
                story = _load_render(uri, story_id, config_hash, scripts)
            except (EvaluationError, storage.StorageError, ValueError, OSError) as exc:
                problems.append(_error_row(story_id, config_hash, uri, str(exc)))
                continue
            found.append(story)
    _assign_methods(found)
    return found, problems


def _load_render(uri: str, story_id: str, config_hash: str, scripts) -> RenderedStory:
    import pyarrow.parquet as pq

    marker = storage.read_commit_marker(uri)
    if marker is None:
        raise EvaluationError(f"{uri} is not committed (no {layout.COMMIT_MARKER}): "
                              "unfinished or failed render")
    config = marker.get("config") or _read_json(storage.join(uri, layout.CONFIG_FILE)) or {}
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(
            storage.join(uri, marker.get("shots_parquet", layout.SHOTS_PARQUET)))))
    except FileNotFoundError:
        raise EvaluationError(f"{uri}: committed but {layout.SHOTS_PARQUET} is missing") from None
    shots = sorted(table.to_pylist(), key=lambda r: r["shot_index"])
    if not shots:
        raise EvaluationError(f"{uri}: {layout.SHOTS_PARQUET} has no shots")
    script = (scripts or {}).get(story_id)
    saved = _read_json(storage.join(uri, layout.SCRIPT_FILE)) or {}
    overview = getattr(script, "overview", None) if script is not None else None
    overview = overview or saved.get("story_overview") or None
    name = (getattr(script, "story_name", "") if script is not None else "") \
        or shots[0].get("story_name") or saved.get("story_name") or story_id
    return RenderedStory(story_id, config_hash, uri, config, name, overview, shots,
                         method_label(config))


def _assign_methods(stories: list[RenderedStory]) -> None:
    hashes: dict[str, set[str]] = defaultdict(set)
    for story in stories:
        hashes[story.method].add(story.config_hash)
    for story in stories:
        if len(hashes[story.method]) > 1:
            story.method = f"{story.method}-{story.config_hash}"


def _error_row(story_id, config_hash, uri, error, method="", story_name="") -> dict:
    return {"level": "story", "story_id": story_id, "config_hash": config_hash,
            "story_uri": uri, "method": method, "story_name": story_name, "error": error}


# ---------------------------------------------------------------------------------------
# one story


def _decode_shot(story: RenderedStory, row: dict) -> np.ndarray:
    from storymem_model.video_io import decode_mp4

    key = row.get("video_key") or layout.shot_video_key(row["scene"], row["shot"])
    try:
        frames = decode_mp4(storage.read_bytes(storage.join(story.uri, key)))
    except FileNotFoundError:
        raise EvaluationError(f"{story.uri}: shot video {key} is missing") from None
    if frames.shape[0] < 1:
        raise EvaluationError(f"{story.uri}: shot video {key} has no frames")
    expected = row.get("num_frames")
    if expected is not None and int(expected) != frames.shape[0]:
        raise EvaluationError(f"{story.uri}: {key} decodes to {frames.shape[0]} frames, "
                              f"{layout.SHOTS_PARQUET} says {expected}")
    return frames


def evaluate_story(story: RenderedStory, encoder, aesthetic,
                   aesthetic_frames: int | None = None) -> tuple[list[dict], dict]:
    """(shot rows, story row) for one committed render."""
    counts = [int(r["num_frames"]) if r.get("num_frames") else None for r in story.shots]
    count_known = all(c is not None for c in counts)
    per_video = encoder.frames_per_video
    global_positions: dict[int, list[int]] = defaultdict(list)  # shot -> local frames
    if count_known:
        starts = np.cumsum([0, *counts])
        for index in sample_frame_indices(int(starts[-1]), per_video):
            shot = int(np.searchsorted(starts, index, side="right") - 1)
            global_positions[shot].append(index - int(starts[shot]))

    shot_samples, global_frames, scores_per_shot, decoded_counts = [], [], [], []
    all_frames_kept = []  # only used when shots.parquet lacks frame counts
    for i, row in enumerate(story.shots):
        frames = _decode_shot(story, row)
        decoded_counts.append(frames.shape[0])
        shot_samples.append(frames[sample_frame_indices(frames.shape[0], per_video)])
        global_frames += [frames[j] for j in global_positions.get(i, [])]
        if not count_known:
            all_frames_kept.append(frames)
        if aesthetic_frames:
            picks = sorted(set(sample_frame_indices(frames.shape[0], aesthetic_frames)))
            scored = frames[picks]
        else:
            scored = frames
        scores_per_shot.append(np.asarray(aesthetic.score_images(scored), dtype=np.float64))
    if not count_known:
        story_video = np.concatenate(all_frames_kept)
        global_frames = list(story_video[sample_frame_indices(len(story_video), per_video)])

    prompts = [str(r["prompt"]) for r in story.shots]
    shot_embeddings = encoder.embed_videos(shot_samples)
    single = metrics.prompt_following(shot_embeddings, encoder.embed_texts(prompts))
    if story.overview:
        story_text, text_source = story.overview, "overview"
    else:
        story_text, text_source = " ".join(prompts), "prompts"
    story_embedding = encoder.embed_videos([np.stack(global_frames)])
    global_following = float(metrics.prompt_following(
        story_embedding, encoder.embed_texts([story_text]))[0])
    consistency = metrics.story_consistency(shot_embeddings)
    matrix = metrics.similarity_matrix(shot_embeddings)
    n = len(story.shots)
    common = {"method": story.method, "config_hash": story.config_hash,
              "story_id": story.story_id, "story_name": story.story_name,
              "video_encoder": encoder.name,
              "aesthetic_scorer": getattr(aesthetic, "name", type(aesthetic).__name__),
              "story_uri": story.uri, "error": None}
    shot_rows = []
    for i, row in enumerate(story.shots):
        others = np.delete(matrix[i], i)
        shot_rows.append({
            **common, "level": "shot", "scene": int(row["scene"]), "shot": int(row["shot"]),
            "shot_index": int(row["shot_index"]), "prompt": prompts[i],
            "num_frames": decoded_counts[i],
            "aesthetic_quality": metrics.aesthetic_quality(scores_per_shot[i]),
            "prompt_following_single_shot": float(single[i]),
            "consistency_to_others": float(others.mean()) if others.size else math.nan,
        })
    story_row = {
        **common, "level": "story", "num_shots": n, "num_frames": int(sum(decoded_counts)),
        "aesthetic_quality": metrics.aesthetic_quality(np.concatenate(scores_per_shot)),
        "prompt_following_global": global_following,
        "prompt_following_single_shot": float(np.mean(single)),
        "consistency_all_pairs": consistency["consistency_all_pairs"],
        "consistency_top10": consistency["consistency_top10"],
        "num_shot_pairs": consistency["num_shot_pairs"],
        "consistency_matrix": matrix.reshape(-1).tolist(),
        "global_text_source": text_source,
    }
    return shot_rows, story_row


def story_consistency_for_render(story_uri: str, encoder) -> dict:
    """Cross-shot consistency of one committed story folder `{out}/{story_id}/{hash}`.

    For batch tables: returns metrics.story_consistency's dict
    {"consistency_all_pairs", "consistency_top10", "num_shot_pairs"}.
    """
    parts = story_uri.rstrip("/").split("/")
    story = _load_render(story_uri.rstrip("/"), parts[-2], parts[-1], None)
    videos = [_decode_shot(story, row) for row in story.shots]
    return metrics.story_consistency(encoder.embed_videos(videos))


# ---------------------------------------------------------------------------------------
# a whole output folder


def summarize(story_rows: Sequence[dict]) -> list[dict]:
    """The Table-1 rows: per method, the mean over its evaluated stories."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in story_rows:
        if not row.get("error"):
            by_method[row["method"]].append(row)
    order = sorted(by_method, key=lambda m: (not m.startswith("storymem"), m))
    return [{"level": "benchmark", "method": method, "num_stories": len(by_method[method]),
             **{c: metrics.benchmark_mean(r[c] for r in by_method[method])
                for c in metrics.TABLE1_COLUMNS}}
            for method in order]


def eval_schema():
    import pyarrow as pa

    f64, i32, s = pa.float64(), pa.int32(), pa.string()
    return pa.schema([
        ("level", s), ("method", s), ("config_hash", s), ("story_id", s), ("story_name", s),
        ("scene", i32), ("shot", i32), ("shot_index", i32), ("prompt", s),
        ("num_shots", i32), ("num_frames", i32), ("num_stories", i32),
        *[(c, f64) for c in metrics.TABLE1_COLUMNS],
        ("consistency_to_others", f64), ("num_shot_pairs", i32),
        ("consistency_matrix", pa.list_(f64)), ("global_text_source", s),
        ("video_encoder", s), ("aesthetic_scorer", s), ("story_uri", s), ("error", s),
    ])


def eval_table(shot_rows, story_rows, summary_rows):
    import pyarrow as pa

    schema = eval_schema()
    rows = [{name: row.get(name) for name in schema.names}
            for row in [*summary_rows, *story_rows, *shot_rows]]
    return pa.Table.from_pylist(rows, schema=schema)


def evaluate_output(out_uri: str, encoder, aesthetic, *, scripts: dict | None = None,
                    report_uri: str | None = None, aesthetic_frames: int | None = None,
                    progress=None) -> EvaluationResult:
    """Evaluate every committed story render under `out_uri`; write parquet and report."""
    import pyarrow.parquet as pq

    report_uri = report_uri or storage.join(out_uri, EVAL_DIR)
    stories, story_rows = find_rendered_stories(out_uri, scripts)
    if not stories and not story_rows:
        raise EvaluationError(f"no story renders under {out_uri} (expected "
                              "{out}/{story_id}/{config_hash}/_COMMITTED.json)")
    shot_rows: list[dict] = []
    for number, story in enumerate(stories, 1):
        try:
            shots, row = evaluate_story(story, encoder, aesthetic, aesthetic_frames)
        except Exception as exc:  # noqa: BLE001 - one bad story never stops the others
            log.error("story %s (%s) not evaluated: %s", story.story_id, story.method, exc)
            story_rows.append(_error_row(story.story_id, story.config_hash, story.uri,
                                         f"{type(exc).__name__}: {exc}", story.method,
                                         story.story_name))
            continue
        shot_rows += shots
        story_rows.append(row)
        if progress:
            progress({"story_id": story.story_id, "method": story.method, "done": number,
                      "total": len(stories)})
    story_rows.sort(key=lambda r: (r["story_id"], r.get("method") or ""))
    summary_rows = summarize(story_rows)

    parquet_uri = storage.join(report_uri, EVAL_PARQUET)
    buffer = io.BytesIO()
    pq.write_table(eval_table(shot_rows, story_rows, summary_rows), buffer)
    storage.write_bytes(parquet_uri, buffer.getvalue())
    files = {EVAL_PARQUET: parquet_uri}
    summary = {"out_uri": out_uri, "video_encoder": encoder.name,
               "aesthetic_scorer": getattr(aesthetic, "name", type(aesthetic).__name__),
               "aesthetic_frames": aesthetic_frames, "table1": summary_rows,
               "not_evaluated": [{k: r[k] for k in ("story_id", "config_hash", "error")}
                                 for r in story_rows if r.get("error")]}
    summary_uri = storage.join(report_uri, SUMMARY_JSON)
    storage.write_bytes(summary_uri, json.dumps(_json_clean(summary), indent=1,
                                                allow_nan=False).encode("utf-8"))
    files[SUMMARY_JSON] = summary_uri
    notes = [f"video-text encoder: {encoder.name}; aesthetic scorer: {summary['aesthetic_scorer']}",
             "global prompt following uses the story overview when the script has one, "
             "else the shot prompts joined",
             "cross-shot consistency is undefined (-) for one-shot stories; benchmark means "
             "skip it"]
    if "tiny" in encoder.name:
        notes.append("tiny encoders have random weights: these numbers only show that the "
                     "pipeline runs, they say nothing about the videos")
    files.update(eval_report.write_report(report_uri, shot_rows, story_rows, summary_rows,
                                          notes=notes))
    return EvaluationResult(shot_rows, story_rows, summary_rows, report_uri, parquet_uri, files)


def _json_clean(value):
    """NaN (undefined metric) -> null, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
