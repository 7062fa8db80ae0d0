"""`storymem train prepare` on Ray Data: clips -> sharded training rows (docs/training.md#preparation).

    run_prepare(spec: PrepareSpec) -> PrepareResult

1. The clip list is read (`clip_manifest.read_clip_inputs`); refused rows go to the errors.
2. Analysis (Ray Data, an actor pool holding the keyframe scorers): every clip is decoded
   to the training frames, its keyframes chosen, its mean CLIP embedding kept; clips that
   cannot be used (unreadable, too short, too small, too large) go to the errors table.
3. Grouping on the driver (`grouping.group_clips`), then whole groups are packed into
   shards (`grouping.shard_groups`); a shard's file name carries a content id of its clips
   and of every setting, so a shard that exists is finished and right.
4. Encoding (Ray Data, an actor pool holding the VAE and text encoder, one GPU each when
   `gpus_per_worker` > 0): each missing shard is encoded (`preparation.encode_shard`) and
   written whole by its actor; the actor with the first one also makes the zero-condition
   latents when the folder holds none stamped with these settings (when every shard
   exists, the first shard is encoded again for it).
5. `clips.parquet`, `errors.parquet`, `manifest.json`, then `_COMMITTED.json` last.

Re-running: committed data with the same content id returns at once without starting Ray;
an interrupted run reuses its saved analysis and every finished shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipelines.run_tables import table_bytes
from storymem_model import storage
from storymem_model.training import prepared
from storymem_model.training.clip_manifest import ClipError, ClipInput, inputs_fingerprint, read_clip_inputs
from storymem_model.training.preparation import ClipAnalysis
from storymem_model.training.specs import PrepareSpec

log = logging.getLogger("storymem.train")

ANALYSIS_STATE = "analysis.json"
ANALYSE_BATCH = 4


@dataclass
class PrepareResult:
    out: str
    skipped: bool
    clips: int
    errors: int
    groups: int
    shards: int
    shards_encoded: int
    seconds: float
    manifest: dict = field(default_factory=dict)

    @property
    def message(self) -> str:
        if self.skipped:
            return f"nothing to do: {self.out} already holds these {self.clips} prepared clips"
        return (f"prepared {self.clips} clips in {self.groups} groups into {self.shards} shards "
                f"({self.shards_encoded} encoded now) at {self.out}; {self.errors} clip(s) refused, "
                f"see {storage.join(self.out, prepared.ERRORS_FILE)}")


def settings_fingerprint(spec: PrepareSpec, clips: list[ClipInput]) -> str:
    """Content id of everything the prepared rows depend on: the clips, the model and scorer
    ids (file content), geometry and selection settings."""
    from storymem_model.model_identity import model_identity, scorer_identity

    scorers = scorer_identity(spec.scorers)
    values = {
        "format": prepared.PREPARED_FORMAT, "clips": inputs_fingerprint(clips),
        "model_id": model_identity(spec.model).model_id,
        "embedder_id": scorers.embedder_id, "gate_id": scorers.gate_id,
        "gate_threshold": scorers.gate_threshold,
        "keyframe_preprocess": spec.scorers.keyframe_preprocess,
        **{name: getattr(spec, name) for name in (
            "height", "width", "num_frames", "fps", "group_threshold", "max_group_size",
            "memory_candidates", "memory_sink", "keyframe_threshold", "max_keyframes", "max_clip_mb")},
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode("utf-8")).hexdigest()


def run_prepare(spec: PrepareSpec) -> PrepareResult:
    from pipelines.ray_runtime import ray_session

    started = time.perf_counter()
    storage.filesystem(spec.out)  # a bad output URI fails before any work
    clips, errors = read_clip_inputs(spec.clips)
    fingerprint = settings_fingerprint(spec, clips)
    done = _committed_manifest(spec.out)
    if done is not None and done.get("fingerprint") == fingerprint:
        counts = done["counts"]
        return PrepareResult(out=spec.out, skipped=True, clips=counts["clips"], errors=counts["errors"],
                             groups=counts["groups"], shards=counts["shards"], shards_encoded=0,
                             seconds=time.perf_counter() - started, manifest=done)
    storage.remove(storage.join(spec.out, storage.COMMIT_MARKER))  # not committed while writing
    with ray_session(spec.ray_address):
        analyses, analysis_errors = _analysis(spec, clips, fingerprint)
        errors = errors + analysis_errors
        analyses = _grouped(analyses, spec)
        plans = _shard_plans(analyses, spec, fingerprint)
        existing = set(storage.list_files(storage.join(spec.out, prepared.SHARDS_DIR)))
        to_encode = [p for p in plans if p["key"].split("/", 1)[1] not in existing]
        zero_condition_missing = bool(plans) and prepared.zero_condition_fingerprint(spec.out) != fingerprint
        if zero_condition_missing and not to_encode:
            to_encode = plans[:1]  # the zero condition is made along with a shard
        summaries = _encode(to_encode, spec, fingerprint if zero_condition_missing else "") if to_encode else []
    by_key = {s["key"]: s for s in summaries}
    shards = []
    for plan in plans:
        summary = by_key.get(plan["key"]) or _existing_summary(spec.out, plan["key"])
        shards.append({**summary, "groups": plan["groups"]})
    manifest = _write_outputs(spec, fingerprint, analyses, errors, shards)
    return PrepareResult(out=spec.out, skipped=False, clips=len(analyses), errors=len(errors),
                         groups=manifest["counts"]["groups"], shards=len(shards),
                         shards_encoded=len(to_encode), seconds=time.perf_counter() - started,
                         manifest=manifest)


def _committed_manifest(out: str) -> dict | None:
    """The manifest of the prepared data committed at `out` (of any settings), else None."""
    try:
        return prepared.read_manifest(out, require_clips=False)
    except (FileNotFoundError, ValueError):  # PreparedDataError included
        return None


# ---------------------------------------------------------------------------------------
# Analysis

class ClipAnalyser:
    """Ray Data actor: the keyframe scorers, loaded once; one batch of clips per call."""

    def __init__(self, spec: dict):
        import torch

        from storymem_model.scorers.factory import build_keyframe_scorers

        self.spec = PrepareSpec.from_dict(spec)
        torch.set_num_threads(max(1, int(self.spec.cpus_per_worker)))
        device = "cuda" if self.spec.gpus_per_worker > 0 else "cpu"
        self.scorers = build_keyframe_scorers(self.spec.scorers.replace(device=device))

    def __call__(self, batch: dict) -> dict:
        from storymem_model.training.preparation import analyse_clip

        rows = _batch_rows(batch)
        out: dict[str, list] = {"analysis": [], "error": []}
        for row in rows:
            result = analyse_clip(ClipInput.from_row(row), self.spec, self.scorers)
            is_error = isinstance(result, ClipError)
            out["analysis"].append(None if is_error else json.dumps(result.to_row()))
            out["error"].append(json.dumps(result.to_row()) if is_error else None)
        return out


def _batch_rows(batch: dict) -> list[dict]:
    names = list(batch)
    count = len(batch[names[0]]) if names else 0
    return [{name: _plain(batch[name][i]) for name in names} for i in range(count)]


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _analysis(spec: PrepareSpec, clips: list[ClipInput], fingerprint: str
              ) -> tuple[list[ClipAnalysis], list[ClipError]]:
    """Step 2, or its saved result when an earlier run of the same settings got that far."""
    state_uri = storage.join(spec.out, ANALYSIS_STATE)
    try:
        state = json.loads(storage.read_bytes(state_uri))
    except (FileNotFoundError, ValueError):
        state = None
    if state and state.get("fingerprint") == fingerprint:
        log.info("prepare: reusing the clip analysis of an earlier run")
        return ([ClipAnalysis.from_row(r) for r in state["analyses"]],
                [ClipError.from_row(r) for r in state["errors"]])
    analyses: list[ClipAnalysis] = []
    errors: list[ClipError] = []
    if clips:
        import ray

        dataset = ray.data.from_items([{"clip_id": c.clip_id, "clip_uri": c.clip_uri, "caption": c.caption,
                                        "position": c.position} for c in clips])
        dataset = dataset.map_batches(
            ClipAnalyser, fn_constructor_kwargs={"spec": spec.to_dict()}, batch_size=ANALYSE_BATCH,
            compute=ray.data.ActorPoolStrategy(size=spec.workers), num_cpus=spec.cpus_per_worker,
            num_gpus=spec.gpus_per_worker or None, batch_format="numpy")
        by_position = {c.position: c for c in clips}
        for row in dataset.take_all():
            if row["error"] is not None:
                errors.append(ClipError.from_row(json.loads(row["error"])))
            else:  # the analysis saw the clip only; its given group and order come from the input
                analysis = ClipAnalysis.from_row(json.loads(row["analysis"]))
                given = by_position[analysis.position]
                analyses.append(ClipAnalysis(**{**analysis.to_row(), "given_group": given.group_id,
                                                "given_order": given.order}))
    analyses.sort(key=lambda a: a.position)
    errors.sort(key=lambda e: e.position)
    storage.write_bytes(state_uri, json.dumps({
        "fingerprint": fingerprint, "analyses": [a.to_row() for a in analyses],
        "errors": [e.to_row() for e in errors]}).encode("utf-8"))
    return analyses, errors


def _grouped(analyses: list[ClipAnalysis], spec: PrepareSpec) -> list[ClipAnalysis]:
    import numpy as np

    from storymem_model.training.grouping import group_clips

    if not analyses:
        return []
    grouped = group_clips([a.clip_id for a in analyses], [a.position for a in analyses],
                          [a.given_group for a in analyses], [a.given_order for a in analyses],
                          np.asarray([a.embedding for a in analyses], dtype=np.float32),
                          threshold=spec.group_threshold, max_group_size=spec.max_group_size)
    return [ClipAnalysis(**{**a.to_row(), "group_id": g.group_id, "order": g.order})
            for a, g in zip(analyses, grouped)]


def _shard_plans(analyses: list[ClipAnalysis], spec: PrepareSpec, fingerprint: str) -> list[dict]:
    from storymem_model.training.grouping import shard_groups

    groups: dict[str, list[ClipAnalysis]] = {}
    for analysis in analyses:
        groups.setdefault(analysis.group_id, []).append(analysis)
    plans = []
    for index, names in enumerate(shard_groups({g: len(c) for g, c in groups.items()}, spec.rows_per_shard)):
        members = [c for name in names for c in sorted(groups[name], key=lambda c: c.order)]
        content = hashlib.sha256(json.dumps([fingerprint, [c.clip_id for c in members]]).encode()).hexdigest()
        plans.append({"index": index, "key": f"{prepared.SHARDS_DIR}/shard-{index:05d}-{content[:12]}.parquet",
                      "groups": names, "clips": [c.to_row() for c in members]})
    return plans


# ---------------------------------------------------------------------------------------
# Encoding

class ShardEncoder:
    """Ray Data actor: the VAE and text encoder (on a GPU when it has one); encodes and
    writes one shard per call, and the zero condition when the call carries its stamp."""

    def __init__(self, spec: dict):
        import torch

        from storymem_model.training.encoding import build_encoding_pipeline

        self.spec = PrepareSpec.from_dict(spec)
        torch.set_num_threads(max(1, int(self.spec.cpus_per_worker)))
        model = self.spec.model.resolved(accelerator=self.spec.gpus_per_worker > 0)
        self.pipeline = build_encoding_pipeline(model)

    def __call__(self, batch: dict) -> dict:
        from storymem_model.training.encoding import zero_condition
        from storymem_model.training.preparation import encode_shard

        out: dict[str, list] = {"key": [], "rows": [], "bytes": [], "sha256": []}
        for plan, stamp in zip((json.loads(p) for p in batch["plan"]), batch["zero_condition"]):
            if stamp:
                latents = zero_condition(self.pipeline, self.spec.num_frames, self.spec.height, self.spec.width)
                prepared.write_zero_condition(self.spec.out, latents, self.pipeline.prompt_encoder.text_length,
                                              str(stamp))
            rows = encode_shard([ClipAnalysis.from_row(c) for c in plan["clips"]], self.spec, self.pipeline)
            data = prepared.shard_bytes(rows)
            storage.write_bytes(storage.join(self.spec.out, plan["key"]), data)
            out["key"].append(plan["key"])
            out["rows"].append(len(rows))
            out["bytes"].append(len(data))
            out["sha256"].append(storage.sha256_hex(data))
        return out


def _encode(plans: list[dict], spec: PrepareSpec, zero_condition_stamp: str) -> list[dict]:
    """Encode and write `plans`, one actor call each; with a stamp (the settings' content id),
    the call of the first plan also makes the zero condition, so one actor makes it once."""
    import ray

    dataset = ray.data.from_items([{"plan": json.dumps(p), "zero_condition": zero_condition_stamp if i == 0 else ""}
                                   for i, p in enumerate(plans)])
    dataset = dataset.map_batches(
        ShardEncoder, fn_constructor_kwargs={"spec": spec.to_dict()}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(spec.workers, len(plans))),
        num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker or None, batch_format="numpy")
    return [{k: _plain(v) for k, v in row.items()} for row in dataset.take_all()]


def _existing_summary(out: str, key: str) -> dict:
    data = storage.read_bytes(storage.join(out, key))
    rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    return {"key": key, "rows": rows, "bytes": len(data), "sha256": storage.sha256_hex(data)}


# ---------------------------------------------------------------------------------------
# Outputs

def _write_outputs(spec: PrepareSpec, fingerprint: str, analyses: list[ClipAnalysis],
                   errors: list[ClipError], shards: list[dict]) -> dict:
    from storymem_model.model_identity import model_identity, scorer_identity

    out = spec.out
    storage.write_bytes(storage.join(out, prepared.CLIPS_FILE), table_bytes(ClipAnalysis.table(analyses)))
    storage.write_bytes(storage.join(out, prepared.ERRORS_FILE), table_bytes(ClipError.table(errors)))
    keep = {s["key"] for s in shards}
    for rel in storage.list_files(storage.join(out, prepared.SHARDS_DIR)):
        if f"{prepared.SHARDS_DIR}/{rel}" not in keep:  # shards of other settings or clips
            storage.remove(storage.join(out, prepared.SHARDS_DIR, rel))
    text_length = None
    latent_shape = None
    if shards:
        zero = prepared.load_tensor_file(storage.join(out, prepared.ZERO_CONDITION_FILE))
        text_length = int(zero["text_length"])
        latent_shape = list(zero["latents"].shape)
    scorers = scorer_identity(spec.scorers)
    manifest = {
        "format": prepared.PREPARED_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
        "clips_source": spec.clips,
        "model": {"spec": spec.model.to_dict(), "model_id": model_identity(spec.model).model_id},
        "scorers": {"spec": spec.scorers.to_dict(), "embedder_id": scorers.embedder_id,
                    "gate_id": scorers.gate_id},
        "geometry": {"height": spec.height, "width": spec.width, "num_frames": spec.num_frames,
                     "fps": spec.fps, "latent_shape": latent_shape},
        "text_length": text_length,
        "settings": spec.to_dict(),
        "counts": {"clips": len(analyses), "errors": len(errors),
                   "groups": len({a.group_id for a in analyses}), "shards": len(shards),
                   "clips_with_keyframes": sum(1 for a in analyses if a.keyframe_indices)},
        "shards": shards,
        "files": {"clips": prepared.CLIPS_FILE, "errors": prepared.ERRORS_FILE,
                  "zero_condition": prepared.ZERO_CONDITION_FILE if shards else None},
    }
    storage.write_bytes(storage.join(out, prepared.MANIFEST_FILE),
                        json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    files = [s["key"] for s in shards] + [prepared.MANIFEST_FILE, prepared.CLIPS_FILE, prepared.ERRORS_FILE]
    if shards:
        files.append(prepared.ZERO_CONDITION_FILE)
    storage.write_commit_marker(out, files, {"prepared_format": prepared.PREPARED_FORMAT,
                                             "clips": len(analyses)})
    return manifest
