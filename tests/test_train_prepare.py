"""`storymem train prepare` on Ray Data (tiny preset, clips and output on moto S3): a dozen
clips made here plus broken ones -> shards with the right shapes and groups, the broken
clips in the errors table; a re-run does nothing; an interrupted run redoes only what is
missing."""
from __future__ import annotations

import io
import json
import time

import pyarrow.parquet as pq
import pytest
import torch

import test_train_support as support
from storymem_model import storage
from storymem_model.training.prepared import PreparedData, read_manifest

pytestmark = [pytest.mark.ray, pytest.mark.s3]

# 12 good clips: story "harbour" (3 ordered shots) and "orchard" (3 shots listed out of
# order), and 6 clips without group: two looks, three near-copies each (CLIP groups them).
GOOD = ([{"name": f"harbour{i}.mp4", "caption": f"harbour shot {i}", "base": 0, "variant": i,
          "group_id": "harbour", "order": i} for i in range(3)]
        + [{"name": f"orchard{i}.mp4", "caption": f"orchard shot {i}", "base": 1, "variant": i,
            "group_id": "orchard", "order": o} for i, o in enumerate((2, 0, 1))]
        + [{"name": f"loose-a{i}.mp4", "caption": f"a blue sea {i}", "base": 2, "variant": i} for i in range(3)]
        + [{"name": f"loose-b{i}.mp4", "caption": f"a yellow field {i}", "base": 3, "variant": i}
           for i in range(3)])
BROKEN = [
    {"name": "garbage.mp4", "caption": "not a video", "data": b"this is not a video" * 20},
    {"name": "short.mp4", "caption": "too short", "base": 4, "frames": 5},
    {"name": "tiny.mp4", "caption": "too small", "base": 5, "height": 16, "width": 16},
]


@pytest.fixture(scope="module")
def prepared(s3_endpoint, ray_cluster):
    import flows_support

    bucket = flows_support.new_bucket(s3_endpoint, "train-prepare")
    manifest = support.write_clips(f"{bucket}/clips", GOOD + BROKEN)
    # two manifest rows that cannot be used at all
    text = storage.read_bytes(manifest).decode() + "\n" + json.dumps({"clip_uri": f"{bucket}/clips/harbour0.mp4",
                                                                      "caption": "again"}) \
        + "\n" + json.dumps({"clip_uri": f"{bucket}/clips/x.mp4", "caption": ""})
    storage.write_bytes(manifest, text.encode())
    spec = support.prepare_spec(manifest, f"{bucket}/prepared", group_threshold=0.97, memory_candidates=3,
                                memory_sink=1)
    started = time.perf_counter()
    from pipelines.training.prepare import run_prepare

    result = run_prepare(spec)
    return {"spec": spec, "result": result, "seconds": time.perf_counter() - started, "bucket": bucket}


def test_shards_hold_every_good_clip_with_the_right_shapes(prepared, pipe):
    spec, result = prepared["spec"], prepared["result"]
    assert not result.skipped and result.clips == 12 and result.errors == 5
    manifest = read_manifest(spec.out)
    assert storage.verify_commit(spec.out) == []
    assert manifest["geometry"]["latent_shape"] == support.LATENT_SHAPE and manifest["text_length"] == 128
    assert sum(s["rows"] for s in manifest["shards"]) == 12
    data = PreparedData(spec.out)
    rows = [data.row(i) for i in range(len(data))]
    assert sorted(r.caption for r in rows) == sorted(c["caption"] for c in GOOD)
    for row in rows:
        for latent in (row.clip_latent, row.mi2v_latent, row.mm2v_latent):
            assert list(latent.shape) == support.LATENT_SHAPE and torch.isfinite(latent).all()
        assert row.memory_latents.shape[1:] == (16, 1, 4, 4) and len(row.memory_latents) <= 3
        assert len(row.memory_sources) == len(row.memory_latents)
        assert row.caption_embedding.shape[1] == 32 and 0 < row.caption_embedding.shape[0] <= 128
    # a shard holds whole groups
    for shard in manifest["shards"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(spec.out, shard["key"]))))
        assert set(table.column("group_id").to_pylist()) == set(shard["groups"])
    # values: the clip latent is the pipeline's VAE encoding of the decoded clip
    from storymem_model.training.encoding import encode_clip
    from storymem_model.training.preparation import decode_for_training

    first = next(r for r in rows if r.caption == "harbour shot 0")
    again = encode_clip(pipe, decode_for_training(first.clip_uri, spec), [], first.caption)
    torch.testing.assert_close(first.clip_latent, again.clip, rtol=0, atol=1e-6)


def test_groups_are_the_given_ones_else_clip_similarity(prepared):
    spec = prepared["spec"]
    clips = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(spec.out, "clips.parquet")))).to_pylist()
    by_name = {c["clip_uri"].rsplit("/", 1)[1]: c for c in clips}
    assert [by_name[f"harbour{i}.mp4"]["order"] for i in range(3)] == [0, 1, 2]
    assert {by_name[f"harbour{i}.mp4"]["group_id"] for i in range(3)} == {"harbour"}
    assert [by_name[f"orchard{i}.mp4"]["order"] for i in range(3)] == [2, 0, 1]  # the given order
    for look in ("a", "b"):
        groups = {by_name[f"loose-{look}{i}.mp4"]["group_id"] for i in range(3)}
        assert len(groups) == 1 and groups.pop().startswith("sim-")
    assert by_name["loose-a0.mp4"]["group_id"] != by_name["loose-b0.mp4"]["group_id"]
    # memory candidates: keyframes (the render's selection) of the other clips of the group
    data = PreparedData(spec.out)
    ids = {c["clip_id"]: c for c in clips}
    for i in range(len(data)):
        row = data.row(i)
        for source in row.memory_sources:
            clip_id, frame = source.split(":")
            assert clip_id != row.clip_id and ids[clip_id]["group_id"] == row.group_id
            assert int(frame) in ids[clip_id]["keyframe_indices"]
    assert any(len(data.row(i).memory_sources) for i in range(len(data)))


def test_broken_clips_are_in_the_errors_table(prepared):
    spec = prepared["spec"]
    errors = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(spec.out, "errors.parquet")))).to_pylist()
    reasons = {e["clip_uri"].rsplit("/", 1)[1]: (e["stage"], e["reason"]) for e in errors}
    assert reasons["garbage.mp4"][0] == "decode" and reasons["garbage.mp4"][1].startswith("unreadable video")
    assert reasons["short.mp4"][1].startswith("too short: 5 frames")
    assert reasons["tiny.mp4"][1].startswith("too small: 16x16")
    assert reasons["harbour0.mp4"] == ("manifest", "duplicate clip_uri (first at row 0)")
    assert reasons["x.mp4"] == ("manifest", "no caption")


def test_a_rerun_does_nothing(prepared):
    from pipelines.training.prepare import run_prepare

    spec = prepared["spec"]
    before = {rel: storage.read_bytes(storage.join(spec.out, rel)) for rel in storage.list_files(spec.out)}
    started = time.perf_counter()
    again = run_prepare(spec)
    assert again.skipped and again.shards_encoded == 0 and "nothing to do" in again.message
    assert time.perf_counter() - started < 0.25 * prepared["seconds"]
    after = {rel: storage.read_bytes(storage.join(spec.out, rel)) for rel in storage.list_files(spec.out)}
    assert after == before


def test_an_interrupted_run_redoes_only_missing_shards(prepared):
    from pipelines.training.prepare import run_prepare

    spec = prepared["spec"]
    manifest = read_manifest(spec.out)
    lost = manifest["shards"][1]["key"]
    kept = {s["key"]: storage.read_bytes(storage.join(spec.out, s["key"])) for s in manifest["shards"]}
    storage.remove(storage.join(spec.out, storage.COMMIT_MARKER))  # as if killed before the end
    storage.remove(storage.join(spec.out, lost))
    result = run_prepare(spec)
    assert not result.skipped and result.shards_encoded == 1 and result.shards == len(kept)
    for key, data in kept.items():
        assert storage.read_bytes(storage.join(spec.out, key)) == data  # bit-identical, the lost one too
    assert storage.verify_commit(spec.out) == []


def test_unusable_inputs_are_named(tmp_path, ray_cluster):
    from pipelines.training.prepare import run_prepare
    from storymem_model.training.clip_manifest import ManifestError

    bad = tmp_path / "clips.jsonl"
    bad.write_text(json.dumps({"video": "a.mp4", "text": "x"}) + "\n")
    with pytest.raises(ManifestError, match="missing column"):
        run_prepare(support.prepare_spec(str(bad), str(tmp_path / "out")))
    with pytest.raises(ManifestError, match="not found"):
        run_prepare(support.prepare_spec(str(tmp_path / "none.jsonl"), str(tmp_path / "out")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ManifestError, match="dataset flow's committed output"):
        run_prepare(support.prepare_spec(str(tmp_path / "folder"), str(tmp_path / "out")))


def test_new_settings_in_the_same_folder_get_their_own_zero_condition(tmp_path, ray_cluster):
    """The zero-condition latents belong to the settings (geometry, model) like the shards:
    preparing other settings into the same folder replaces them, and a lost one is remade."""
    from pipelines.training.prepare import run_prepare

    clips = support.write_clips(str(tmp_path / "clips"), GOOD[:2])
    out = str(tmp_path / "prepared")
    for num_frames, latent_frames in ((9, 3), (13, 4)):
        result = run_prepare(support.prepare_spec(clips, out, num_frames=num_frames, workers=1))
        assert not result.skipped and result.shards_encoded == result.shards == 1
        data = PreparedData(out)
        shape = [16, latent_frames, 4, 4]
        assert data.geometry["latent_shape"] == shape and list(data.zero_condition.shape) == shape
        assert list(data.row(0).clip_latent.shape) == shape
    # lost while every shard is there: the first shard is encoded again (bit-identical) to remake it
    shard = data.shards[0]
    kept = storage.read_bytes(storage.join(out, shard))
    storage.remove(storage.join(out, storage.COMMIT_MARKER))
    storage.remove(storage.join(out, "zero_condition.safetensors"))
    result = run_prepare(support.prepare_spec(clips, out, num_frames=13, workers=1))
    assert not result.skipped and result.shards_encoded == 1
    assert list(PreparedData(out).zero_condition.shape) == shape
    assert storage.read_bytes(storage.join(out, shard)) == kept and storage.verify_commit(out) == []
