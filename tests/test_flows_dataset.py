"""The dataset flow on the nightly renders (moto S3, tiny preset, Prefect test server):
rows, keyframe images, CLIP embeddings and scores consistent with the rendered shots."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import flows_support as support
from storymem_model import storage

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def dataset(s3_endpoint, ray_cluster):
    from flows.generate_dataset import generate_dataset

    nightly = support.nightly_rendered(s3_endpoint)
    out = nightly["bucket"] + "/datasets/shots-v1"
    state = generate_dataset(nightly["source"], out, **support.tiny_specs(),
                             render_out=nightly["out"], validation_percent=34.0, dataset_name="tiny-shots",
                             run_id="dataset-1", retry_backoff_s=0.2, return_state=True)
    return {"state": state, "out": out, "renders": nightly["out"], "source": nightly["source"]}


def _committed_stories(dataset: dict) -> list[str]:
    """Every committed story folder of the dataset's source under its render output (other
    flow tests render other sources into the same output)."""
    from pipelines.story_planner import StoryPlan

    config_hash = dataset["state"].result()["render_run"]["config_hash"]
    plan = StoryPlan.build(dataset["source"], dataset["renders"], config_hash)
    stories = sorted(s.story_uri for s in plan.committed)
    assert stories and all(storage.is_committed(uri) for uri in stories)
    return stories


def test_dataset_rows_match_the_rendered_shots(dataset):
    from pipelines.dataset_writer import read_dataset

    state = dataset["state"]
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["shots"] == support.VALID_SHOTS and summary["stories"] == 3
    assert summary["render_run"]["batch_ran"] is False  # the renders were reused
    assert summary["failures"] == 1 and "1 script(s)/story(ies) failed" in state.message

    table = read_dataset(dataset["out"]).to_pylist()
    assert len(table) == support.VALID_SHOTS
    stories = _committed_stories(dataset)
    expected = {}
    for story_uri in stories:
        shots = pq.read_table(io.BytesIO(storage.read_bytes(
            storage.join(story_uri, "shots.parquet")))).to_pylist()
        for shot in shots:
            expected[(shot["story_id"], shot["shot_index"])] = (story_uri, shot)
    assert {(r["story_id"], r["shot_index"]) for r in table} == set(expected)

    for row in table:
        story_uri, shot = expected[(row["story_id"], row["shot_index"])]
        assert row["split"] in ("train", "validation")
        assert row["video_uri"] == shot["video_uri"]
        assert storage.sha256_hex(storage.read_bytes(row["video_uri"])) == row["video_sha256"]
        assert row["prompt"] == shot["prompt"] and row["mode"] == shot["mode"]
        assert row["keyframe_ids"] == shot["keyframe_ids"]
        assert row["memory_keyframe_ids"] == shot["memory_keyframe_ids"]
        assert row["memory_size"] == len(shot["memory_keyframe_ids"])
        assert np.allclose(row["keyframe_aesthetic_scores"], shot["keyframe_scores"])
        assert len(row["keyframe_images"]) == len(row["keyframe_ids"]) \
            == len(row["keyframe_clip_embeddings"]) == len(row["keyframe_uris"])
        for png, uri in zip(row["keyframe_images"], row["keyframe_uris"]):
            assert png == storage.read_bytes(uri)  # the lossless keyframe itself
        assert row["prompt"] in row["scene_prompts"]
        assert abs(np.linalg.norm(row["prompt_clip_embedding"]) - 1) < 1e-4
    # Memory used by a shot is made of keyframes selected from earlier shots.
    by_story: dict[str, list[dict]] = {}
    for row in table:
        by_story.setdefault(row["story_id"], []).append(row)
    for rows in by_story.values():
        rows.sort(key=lambda r: r["shot_index"])
        seen: set[str] = set()
        for row in rows:
            assert set(row["memory_keyframe_ids"]) <= seen
            seen |= set(row["keyframe_ids"])


def test_dataset_embeddings_equal_the_runners_memory_embeddings(dataset):
    """CLIP embeddings computed by the dataset writer from the keyframe PNGs equal the
    ones the runner stored in the story's memory bank while rendering."""
    from pipelines.dataset_writer import read_dataset
    from storymem_model.memory_bank import MemoryBank

    table = read_dataset(dataset["out"]).to_pylist()
    embeddings = {(row["story_id"], kf): np.asarray(e) for row in table
                  for kf, e in zip(row["keyframe_ids"], row["keyframe_clip_embeddings"])}
    checked = 0
    for story_uri in _committed_stories(dataset):
        fs, path = storage.filesystem(story_uri)
        banks = sorted(fs.glob(f"{path}/memory/*/bank"))
        bank = MemoryBank.load("s3://" + banks[-1])
        for entry in bank.stored:
            assert np.allclose(embeddings[entry.story_id, entry.keyframe_id],
                               entry.clip_embedding, atol=1e-4), entry.keyframe_id
            checked += 1
    assert checked == len(embeddings) > 0


def test_dataset_card_and_commit(dataset):
    out = dataset["out"]
    card = json.loads(storage.read_bytes(storage.join(out, "dataset_card.json")))
    assert card["name"] == "tiny-shots"
    assert card["counts"]["shots"] == support.VALID_SHOTS and card["counts"]["stories"] == 3
    by_split = card["counts"]["by_split"]
    assert sum(s["shots"] for s in by_split.values()) == support.VALID_SHOTS
    assert card["config"]["render_config"]["model_id"] == "tiny"
    # the flow's resolved spec is the config the stories were rendered with
    assert card["config"]["render_spec"]["model"]["preset"] == "tiny"
    assert card["config"]["render_spec"]["config"] == card["config"]["render_config"]
    assert card["source"]["failures"] == 1
    assert {f["name"] for f in card["schema"]} >= {
        "video_uri", "prompt", "keyframe_images", "keyframe_clip_embeddings",
        "keyframe_aesthetic_scores", "memory_keyframe_ids", "story_overview"}
    assert all(f.startswith("data/split=") for f in card["files"])
    assert storage.verify_commit(out) == []


def test_dataset_of_an_uncommitted_story_is_refused(dataset, s3_endpoint):
    from pipelines.dataset_writer import DatasetError, write_dataset

    stories = _committed_stories(dataset)
    half_done = stories[0].rsplit("/", 1)[0] + "/not-a-config-hash"
    target = dataset["out"] + "-refused"
    with pytest.raises(DatasetError, match="not committed") as error:
        write_dataset([stories[0], half_done], target, embedder=None)
    assert "not-a-config-hash" in str(error.value)
    assert storage.list_files(target) == []  # checked before anything was written


def test_dataset_command_line(dataset, capsys):
    """`storymem flow dataset` on the same renders: nothing rendered, every story in the
    validation split, exit status 1 because one script of the source is invalid."""
    from flows.cli import main
    from pipelines.dataset_writer import read_dataset

    out = dataset["out"] + "-cli"
    rc = main(["flow", "dataset", "--source", dataset["source"], "--out", out,
               "--render-out", dataset["renders"], "--validation-percent", "100",
               "--run-id", "dataset-cli", "--retry-backoff", "0.2",
               *support.TINY_FLAGS])
    printed = capsys.readouterr().out
    assert rc == 1 and f"dataset of {support.VALID_SHOTS} shots from 3 stories" in printed
    assert "dataset_card_uri" in printed and "errors.parquet" in printed
    table = read_dataset(out)
    assert table.num_rows == support.VALID_SHOTS
    assert set(table.column("split").to_pylist()) == {"validation"}


def test_a_dataset_run_whose_lock_is_taken_over_writes_nothing_more(dataset, monkeypatch):
    """Another run takes the dataset folder's lock over while this one reads its first story
    (as if this one stalled past the lease): every write renews the lock first, so the
    flow fails before writing a file, and the new holder's lock is left alone."""
    import time

    import pipelines.dataset_writer as writer
    from flows.generate_dataset import generate_dataset

    out = dataset["out"] + "-taken-over"
    lock_uri = out + "/_locks/dataset.json"
    real_rows = writer.story_rows

    def rows_then_lose_the_lock(*args, **kwargs):
        now = time.time()
        storage.write_bytes(lock_uri, json.dumps({
            "owner": "another dataset run", "token": "theirs", "acquired_at": now,
            "renewed_at": now, "expires_at": now + 600}).encode())
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(writer, "story_rows", rows_then_lose_the_lock)
    state = generate_dataset(dataset["source"], out, **support.tiny_specs(),
                             render_out=dataset["renders"], run_id="dataset-taken-over",
                             retries=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="taken over"):
        state.result()
    assert [f for f in storage.list_files(out) if not f.startswith("_locks/")] == []
    assert json.loads(storage.read_bytes(lock_uri))["token"] == "theirs"
