"""A training-ready dataset from rendered, committed stories: one Parquet row per shot.

Layout under the dataset URI (local path or s3://):

    data/split={train|validation}/{story_id}.parquet   one file per story (hive partitions)
    dataset_card.json                                  counts, schema, config, sources
    _COMMITTED.json                                    written last: every file, size, sha256

Each row (one shot) holds: ids (story, scene, shot, shot index), the prompt and its
context (story name and overview, the scene's prompts in order, previous/next prompt,
cut, mode, seed), the video (URI, sha256, frames, fps, size), the keyframes selected
from it (ids, frame indices, PNG bytes, CLIP image embeddings, aesthetic/gate scores),
the memory the shot was conditioned on (keyframe ids), a CLIP text embedding of the
prompt, and the model/LoRA/scorer ids and config hash.

Only committed stories are read (their `_COMMITTED.json` exists). Scores come from the
runner's `shots.parquet`; CLIP embeddings are computed here, once per keyframe, in one
batch per story, from the lossless keyframe PNGs - the same pixels the runner embedded.
The split of a story is fixed by a hash of its id, so it never moves between runs.
Files have deterministic keys and are written whole (`storage.write_bytes`); a rerun
rewrites the same keys and removes files of stories no longer in the dataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storymem_model import output_layout as layout
from storymem_model import storage

DATA_DIR = "data"
CARD_FILE = "dataset_card.json"
DATASET_FORMAT = 1
SPLITS = ("train", "validation")


class DatasetError(RuntimeError):
    """A story that cannot go into the dataset (not committed, files missing), named."""


def dataset_schema(embedding_dim: int) -> pa.Schema:
    emb = pa.list_(pa.float32(), embedding_dim)
    return pa.schema([
        ("story_id", pa.string()), ("story_name", pa.string()),
        ("story_overview", pa.string()), ("config_hash", pa.string()),
        ("scene", pa.int32()), ("shot", pa.int32()), ("shot_index", pa.int32()),
        ("num_shots", pa.int32()), ("num_scenes", pa.int32()),
        ("prompt", pa.string()), ("first_frame_prompt", pa.string()),
        ("scene_prompts", pa.list_(pa.string())),
        ("previous_prompt", pa.string()), ("next_prompt", pa.string()),
        ("cut", pa.bool_()), ("mode", pa.string()), ("seed", pa.int64()),
        ("video_uri", pa.string()), ("video_sha256", pa.string()),
        ("num_frames", pa.int32()), ("fps", pa.int32()),
        ("height", pa.int32()), ("width", pa.int32()),
        ("keyframe_ids", pa.list_(pa.string())),
        ("keyframe_frame_indices", pa.list_(pa.int32())),
        ("keyframe_uris", pa.list_(pa.string())),
        ("keyframe_images", pa.list_(pa.binary())),  # PNG bytes, lossless
        ("keyframe_clip_embeddings", pa.list_(emb)),
        ("keyframe_aesthetic_scores", pa.list_(pa.float32())),
        ("memory_keyframe_ids", pa.list_(pa.string())),
        ("memory_size", pa.int32()),
        ("prompt_clip_embedding", emb),
        ("model_id", pa.string()), ("lora_id", pa.string()),
        ("embedder_id", pa.string()), ("gate_id", pa.string()),
    ])


def split_for(story_id: str, validation_percent: float) -> str:
    """Deterministic split from the story id (sha256 bucket of 10,000)."""
    bucket = int(hashlib.sha256(story_id.encode("utf-8")).hexdigest()[:8], 16) % 10_000
    return "validation" if bucket < validation_percent * 100 else "train"


def story_file_key(split: str, story_id: str) -> str:
    return f"{DATA_DIR}/split={split}/{story_id}.parquet"


@dataclass
class DatasetResult:
    uri: str
    card: dict
    files: list[str] = field(default_factory=list)


def _read_parquet(uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).copy()


def story_rows(story_uri: str, embedder, validation_percent: float = 10.0) -> tuple[str, list[dict]]:
    """(split, rows) for one committed story folder `{out}/{story_id}/{config_hash}`."""
    marker = storage.read_commit_marker(story_uri)
    if marker is None:
        raise DatasetError(f"{story_uri}: not committed (no {storage.COMMIT_MARKER}); "
                           "only finished stories go into a dataset")
    try:
        shots = _read_parquet(storage.join(story_uri, layout.SHOTS_PARQUET))
        script = json.loads(storage.read_bytes(storage.join(story_uri, layout.SCRIPT_FILE)))
        config = json.loads(storage.read_bytes(storage.join(story_uri, layout.CONFIG_FILE)))
    except FileNotFoundError as exc:
        raise DatasetError(f"{story_uri}: a committed story file is missing: {exc}") from exc
    shots.sort(key=lambda r: r["shot_index"])
    story_id = shots[0]["story_id"] if shots else marker.get("story_id")
    split = split_for(story_id, validation_percent)

    # Every keyframe of the story, embedded in one batch.
    keyframe_ids = [kf for row in shots for kf in (row["keyframe_ids"] or [])]
    images_png = {kf: storage.read_bytes(storage.join(story_uri, layout.keyframe_key(kf)))
                  for kf in keyframe_ids}
    if keyframe_ids:
        images = np.stack([_decode_png(images_png[kf]) for kf in keyframe_ids])
        image_emb = dict(zip(keyframe_ids, np.asarray(embedder.embed_images(images),
                                                      dtype=np.float32)))
    else:
        image_emb = {}
    text_emb = np.asarray(embedder.embed_texts([r["prompt"] for r in shots]), dtype=np.float32)

    scene_prompts: dict[int, list[str]] = {}
    for row in shots:
        scene_prompts.setdefault(row["scene"], []).append(row["prompt"])
    rows = []
    for i, row in enumerate(shots):
        kfs = list(row["keyframe_ids"] or [])
        rows.append({
            "story_id": row["story_id"], "story_name": row["story_name"],
            "story_overview": script.get("story_overview", ""),
            "config_hash": row["config_hash"],
            "scene": row["scene"], "shot": row["shot"], "shot_index": row["shot_index"],
            "num_shots": len(shots), "num_scenes": len(scene_prompts),
            "prompt": row["prompt"], "first_frame_prompt": row["first_frame_prompt"],
            "scene_prompts": scene_prompts[row["scene"]],
            "previous_prompt": shots[i - 1]["prompt"] if i > 0 else None,
            "next_prompt": shots[i + 1]["prompt"] if i + 1 < len(shots) else None,
            "cut": row["cut"], "mode": row["mode"], "seed": row["seed"],
            "video_uri": row["video_uri"], "video_sha256": row["video_sha256"],
            "num_frames": row["num_frames"], "fps": row["fps"],
            "height": row["height"], "width": row["width"],
            "keyframe_ids": kfs,
            "keyframe_frame_indices": list(row["keyframe_frame_indices"] or []),
            "keyframe_uris": [storage.join(story_uri, layout.keyframe_key(k)) for k in kfs],
            "keyframe_images": [images_png[k] for k in kfs],
            "keyframe_clip_embeddings": [image_emb[k].tolist() for k in kfs],
            "keyframe_aesthetic_scores": list(row["keyframe_scores"] or []),
            "memory_keyframe_ids": list(row["memory_keyframe_ids"] or []),
            "memory_size": len(row["memory_keyframe_ids"] or []),
            "prompt_clip_embedding": text_emb[i].tolist(),
            "model_id": row["model_id"], "lora_id": row["lora_id"],
            "embedder_id": config.get("embedder_id") or getattr(embedder, "name", ""),
            "gate_id": config.get("gate_id", ""),
        })
    return split, rows


def write_dataset(story_uris: list[str], out_uri: str, embedder, *,
                  validation_percent: float = 10.0, config: dict | None = None,
                  source: dict | None = None,
                  before_write: Callable[[], None] | None = None) -> DatasetResult:
    """Write the dataset of these committed stories to `out_uri` (see the module doc).

    Stories are processed one at a time (bounded memory). A story that cannot be read
    raises DatasetError naming it; nothing is committed then, and a rerun starts over.
    `before_write()` runs before each write (a story's file, the removals, the card and
    commit): a caller whose output lock was taken over raises there, and nothing more is
    written.
    """
    before_write = before_write or (lambda: None)
    if not 0 <= validation_percent <= 100:
        raise ValueError(f"validation_percent must be within 0..100, got {validation_percent}")
    started = time.time()
    missing = [u for u in sorted(set(story_uris)) if not storage.is_committed(u)]
    if missing:
        raise DatasetError(
            f"{len(missing)} story folder(s) not committed (no {storage.COMMIT_MARKER}); only "
            f"finished stories go into a dataset: {', '.join(missing[:20])}")
    dim = None
    files: list[str] = []
    counts = {"stories": 0, "shots": 0, "keyframes": 0,
              "by_split": {s: {"stories": 0, "shots": 0} for s in SPLITS}}
    config_hashes: set[str] = set()
    storage.remove(storage.join(out_uri, storage.COMMIT_MARKER))  # not committed while writing
    for story_uri in sorted(set(story_uris)):
        split, rows = story_rows(story_uri, embedder, validation_percent)
        if not rows:
            continue
        dim = dim or len(rows[0]["prompt_clip_embedding"])
        table = pa.Table.from_pylist(rows, schema=dataset_schema(dim))
        sink = io.BytesIO()
        pq.write_table(table, sink)
        key = story_file_key(split, rows[0]["story_id"])
        before_write()
        storage.write_bytes(storage.join(out_uri, key), sink.getvalue())
        files.append(key)
        counts["stories"] += 1
        counts["shots"] += len(rows)
        counts["keyframes"] += sum(len(r["keyframe_ids"]) for r in rows)
        counts["by_split"][split]["stories"] += 1
        counts["by_split"][split]["shots"] += len(rows)
        config_hashes.add(rows[0]["config_hash"])
    # Files of stories that are no longer part of the dataset go away.
    before_write()
    for rel in storage.list_files(storage.join(out_uri, DATA_DIR)):
        key = f"{DATA_DIR}/{rel}"
        if key not in files:
            storage.remove(storage.join(out_uri, key))
    schema = dataset_schema(dim or 0)
    card = {
        "format": DATASET_FORMAT,
        "name": (source or {}).get("name") or "storymem-shots",
        "description": "StoryMem renders, one row per shot, with keyframes, CLIP "
                       "embeddings, aesthetic scores and the memory each shot used.",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - started, 3),
        "counts": counts,
        "embedding": {"model": getattr(embedder, "name", ""), "dim": dim,
                      "normalised": "L2"},
        "splits": {"rule": "sha256(story_id) bucket of 10000 < validation_percent*100 "
                           "-> validation", "validation_percent": validation_percent},
        "partitioning": {"flavor": "hive", "columns": ["split"],
                         "path": f"{DATA_DIR}/split={{split}}/{{story_id}}.parquet"},
        "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
        "config_hashes": sorted(config_hashes),
        "config": config or {},
        "source": source or {},
        "files": sorted(files),
    }
    before_write()
    storage.write_bytes(storage.join(out_uri, CARD_FILE),
                        json.dumps(card, indent=2, sort_keys=True, default=str).encode("utf-8"))
    storage.write_commit_marker(out_uri, sorted(files) + [CARD_FILE],
                                {"dataset_format": DATASET_FORMAT, "shots": counts["shots"]})
    return DatasetResult(uri=out_uri, card=card, files=sorted(files))


def read_dataset(out_uri: str) -> pa.Table:
    """The whole dataset as one table (with the `split` partition column), for checks."""
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if not storage.is_committed(out_uri):
        raise DatasetError(f"{out_uri}: no committed dataset ({storage.COMMIT_MARKER} missing)")
    fs, path = storage.filesystem(storage.join(out_uri, DATA_DIR))
    dataset = ds.dataset(path, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet",
                         partitioning="hive")
    return dataset.to_table()
