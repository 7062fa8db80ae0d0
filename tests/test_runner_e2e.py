"""End to end with the tiny preset: the 3-scene lighthouse example (mixed cuts) rendered to a
local folder and to S3 (moto server), every output checked; MM2V frame counts; a failing
shot loses no earlier work and the story resumes; T2V shots get the T2V sampling; renders
without memory (the independent-shots baseline) skip memory, transitions and keyframes."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storymem_model import storage
from storymem_model.render_config import RenderConfig
from storymem_model.runner import SHOTS_SCHEMA, TIMING_COLUMNS, RenderError, StoryRunner
from storymem_model.story_script import load_script
from storymem_model.video_io import decode_mp4, video_info

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny():
    import torch

    from storymem_model import load_pipeline
    from storymem_model.scorers import build_scorers

    torch.set_num_threads(1)
    return load_pipeline("tiny"), build_scorers("tiny")


@pytest.fixture(scope="module")
def lighthouse():
    return load_script(EXAMPLES / "lighthouse_keeper.json")


def _check_story(out_uri: str, script, result, config: RenderConfig) -> list[dict]:
    """Every file of the layout present and consistent; returns the Parquet rows."""
    uri = storage.join(out_uri, script.story_id, config.config_hash())
    assert result.story_uri == uri and result.status == "rendered"
    files = storage.list_files(uri)
    for spec in script.shots:
        name = f"{spec.scene:02d}_{spec.shot:02d}"
        assert f"shots/{name}.mp4" in files and f"shots/{name}.json" in files
    assert f"{script.story_id}.mp4" in files and "shots.parquet" in files
    assert "config.json" in files and "script.json" in files
    memory = sorted({f.split("/")[1] for f in files if f.startswith("memory/")})
    assert memory == ["03_02"]  # only the bank after the last shot is kept
    assert "memory/03_02/bank/manifest.json" in files

    # commit marker: written last, lists every other file with matching size and sha256
    marker = storage.read_commit_marker(uri)
    assert [e["path"] for e in marker["files"]] == [f for f in files if f != "_COMMITTED.json"]
    assert storage.verify_commit(uri) == []
    assert marker["story_id"] == script.story_id and marker["shots"] == 7
    assert marker["config_hash"] == config.config_hash()

    # Parquet: fixed schema, one row per shot, values consistent with the files
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, "shots.parquet"))))
    assert table.schema.equals(SHOTS_SCHEMA())
    rows = table.to_pylist()
    assert [(r["scene"], r["shot"], r["cut"]) for r in rows] == [
        (s.scene, s.shot, s.cut) for s in script.shots]
    assert [r["mode"] for r in rows] == ["t2v", "mi2v", "m2v", "m2v", "m2v", "m2v", "mi2v"]
    assert len({r["seed"] for r in rows}) == 7
    stored: list[str] = []
    total_frames = 0
    for row, spec in zip(rows, script.shots):
        assert row["prompt"] == spec.prompt and row["story_id"] == script.story_id
        assert row["config_hash"] == config.config_hash()
        assert row["model_id"] == "tiny" and row["lora_id"] is None
        assert (row["height"], row["width"], row["fps"]) == (64, 64, 16)
        video = storage.read_bytes(row["video_uri"])
        assert row["video_uri"] == storage.join(uri, row["video_key"])
        assert storage.sha256_hex(video) == row["video_sha256"]
        info = video_info(video)
        expected = 16 if row["mode"] == "mi2v" else 17  # 17 frames minus the given one
        assert row["num_frames"] == info["frames"] == expected
        assert (info["width"], info["height"], info["codec"]) == (64, 64, "h264")
        total_frames += expected
        # memory used = the keyframes stored before this shot: the first 3 (sink) and the
        # newest 7 once there are more than 10
        window = stored if len(stored) <= 10 else stored[:3] + stored[-7:]
        assert row["memory_keyframe_ids"] == ([] if row["mode"] == "t2v" else window)
        assert len(row["keyframe_ids"]) == len(row["keyframe_scores"]) \
            == len(row["keyframe_frame_indices"]) <= 3
        assert all(s >= config.gate_threshold for s in row["keyframe_scores"])
        for kf in row["keyframe_ids"]:
            assert f"keyframes/{kf}.png" in files
        stored += row["keyframe_ids"]
        assert all(row[c] >= 0 for c in TIMING_COLUMNS)
    assert stored, "the tiny story should store keyframes"
    # a keyframe PNG is exactly the frame of the shot it names (lossless)
    first = rows[0]
    frame = first["keyframe_frame_indices"][0]
    from storymem_model.runner import png_image
    image = png_image(storage.read_bytes(storage.join(uri, "keyframes",
                                                      first["keyframe_ids"][0] + ".png")))
    assert image.shape == (64, 64, 3)
    decoded = decode_mp4(storage.read_bytes(first["video_uri"]))
    assert np.abs(decoded[frame].astype(int) - image).mean() < 40  # mp4 is lossy, PNG is not

    # the story video holds exactly the shots, in order
    story = storage.read_bytes(result.video_uri)
    story_frames = decode_mp4(story)
    assert story_frames.shape[0] == total_frames == marker["frames"]
    assert np.array_equal(story_frames[:17], decoded)
    last = decode_mp4(storage.read_bytes(rows[-1]["video_uri"]))
    assert np.array_equal(story_frames[-len(last):], last)
    return rows


def test_lighthouse_local(tiny, lighthouse, tmp_path):
    pipeline, scorers = tiny
    config = RenderConfig.for_pipeline(pipeline, scorers)
    runner = StoryRunner(pipeline, scorers, config)
    events = []
    result = runner.render(lighthouse, str(tmp_path), progress=events.append)
    rows = _check_story(str(tmp_path), lighthouse, result, config)
    assert [e.shot_index for e in events] == list(range(7))
    assert runner.is_committed(lighthouse, str(tmp_path))
    # a second render is a no-op: committed stories are skipped
    before = storage.read_bytes(storage.join(result.story_uri, "_COMMITTED.json"))
    again = runner.render(lighthouse, str(tmp_path), progress=False)
    assert again.status == "skipped" and again.shots_rendered == 0
    assert storage.read_bytes(storage.join(result.story_uri, "_COMMITTED.json")) == before
    json_rows = [json.loads(storage.read_bytes(storage.join(result.story_uri, r["video_key"]
                                                            .replace(".mp4", ".json"))))
                 for r in rows]
    assert json_rows == rows


def test_lighthouse_s3(tiny, lighthouse, s3_bucket):
    pipeline, scorers = tiny
    config = RenderConfig.for_pipeline(pipeline, scorers)
    out = f"{s3_bucket}/renders"
    result = StoryRunner(pipeline, scorers, config).render(lighthouse, out, progress=False)
    assert result.video_uri.startswith("s3://")
    _check_story(out, lighthouse, result, config)


def test_mm2v_drops_five_frames_and_a_failing_shot_loses_no_work_on_s3(tiny, s3_bucket):
    pipeline, scorers = tiny
    out = f"{s3_bucket}/flaky"
    script = load_script(EXAMPLES / "paper_boat.json5")  # cuts: T F | T T
    config = RenderConfig.for_pipeline(pipeline, scorers, transition="mm2v", seed=7)

    class FailsOnThirdShot:
        """Wraps the real tiny pipeline; the third generate_shot call raises."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def generate_shot(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            return self.inner.generate_shot(*args, **kwargs)

    flaky = StoryRunner(FailsOnThirdShot(pipeline), scorers, config)
    with pytest.raises(RenderError, match=r"the-paper-boat-\w+, scene 2, shot 1: generation "
                                          r"failed: CUDA out of memory"):
        flaky.render(script, out, progress=False)
    uri = flaky.story_uri(script, out)
    files = storage.list_files(uri)
    assert "shots/01_01.json" in files and "shots/01_02.json" in files
    assert "shots/02_01.json" not in files and "_COMMITTED.json" not in files

    result = StoryRunner(pipeline, scorers, config).render(script, out, progress=False)
    assert result.status == "resumed" and result.shots_rendered == 2
    assert [r.mode for r in result.rows] == ["t2v", "mm2v", "m2v", "m2v"]
    assert [r.num_frames for r in result.rows] == [17, 12, 17, 17]
    assert [video_info(storage.read_bytes(r.video_uri))["frames"]
            for r in result.rows] == [17, 12, 17, 17]
    assert storage.verify_commit(uri) == []


def test_runner_refuses_mismatched_config(tiny):
    pipeline, scorers = tiny
    config = RenderConfig.for_pipeline(pipeline, scorers).replace(model_id="other-model")
    with pytest.raises(RenderError, match="does not match the loaded pipeline's model_id"):
        StoryRunner(pipeline, scorers, config)
    config = RenderConfig.for_pipeline(pipeline, scorers)
    with pytest.raises(RenderError, match="references_sha256 differs"):
        StoryRunner(pipeline, scorers, config,
                    references=[np.zeros((64, 64, 3), np.uint8)])


def test_a_failed_write_leaves_the_session_at_its_checkpoint(tiny, tmp_path, monkeypatch):
    """A storage error in the middle of a shot's writes: the session rolls back to its last
    checkpoint, the same shot renders again, and the story equals an undisturbed one."""
    import storymem_model.runner as runner_module

    pipeline, scorers = tiny
    script = load_script({"story_name": "Retry", "scenes": [{
        "video_prompts": ["A kite over a beach.", "The kite dives."], "cut": [True, False]}]})
    config = RenderConfig.for_pipeline(pipeline, scorers, seed=5)
    runner = StoryRunner(pipeline, scorers, config)
    session = runner.open_session(script, str(tmp_path / "flaky"))
    session.render_shot(script.shots[0])
    stored_before = [e.keyframe_id for e in session.bank.stored]

    real_write = runner_module.storage.write_bytes
    failures = []

    def write_failing_once(uri, data):
        if uri.endswith("/bank/manifest.json") and "01_02" in uri and not failures:
            failures.append(uri)
            raise OSError("connection reset (simulated)")
        return real_write(uri, data)

    monkeypatch.setattr(runner_module.storage, "write_bytes", write_failing_once)
    with pytest.raises(OSError, match="connection reset"):
        session.render_shot(script.shots[1])
    assert len(session.rows) == 1
    assert [e.keyframe_id for e in session.bank.stored] == stored_before
    session.render_shot(script.shots[1])  # the same shot again, no "already stored" error
    session.finish()
    monkeypatch.undo()

    steady = runner.render(script, str(tmp_path / "steady"), progress=False)
    flaky_uri = runner.story_uri(script, str(tmp_path / "flaky"))
    assert storage.verify_commit(flaky_uri) == []
    for rel in storage.list_files(steady.story_uri):
        if rel.endswith((".mp4", ".png")) or rel.startswith("memory/"):
            assert storage.read_bytes(storage.join(flaky_uri, rel)) == \
                storage.read_bytes(storage.join(steady.story_uri, rel)), rel


# ---------------------------------------------------------------------------------------
# T2V sampling and memory off (the independent-shots baseline)
SMALL = dict(height=32, width=32, num_frames=9)
THREE_SHOTS = {"story_name": "Lantern Walk", "scenes": [{
    "video_prompts": ["A girl lights a paper lantern.", "She carries it down the path.",
                      "The lantern glows above a dark lake."], "cut": [True, False, True]}]}


class RecordingPipeline:
    """A spy around the real tiny pipeline: records every generate_shot call's kwargs."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate_shot(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return self.inner.generate_shot(prompt, **kwargs)


class NoScorers:
    """Scorers that must never be called (memory off means no keyframe work)."""

    def __getattr__(self, name):
        raise AssertionError(f"scorers.{name} used by a render without memory")


def test_t2v_first_shot_gets_the_t2v_sampling_and_the_rest_m2v(tiny, tmp_path):
    pipeline, scorers = tiny
    assert pipeline.has_t2v  # the tiny preset has T2V experts
    spy = RecordingPipeline(pipeline)
    config = RenderConfig.for_pipeline(
        pipeline, scorers, **SMALL, sampling={"num_inference_steps": 1, "shift": 5.0})
    script = load_script({"story_name": "Kite", "scenes": [{
        "video_prompts": ["A red kite on a hill.", "It climbs higher."], "cut": [True, False]}]})
    result = StoryRunner(spy, scorers, config).render(script, str(tmp_path), progress=False)
    assert [r.mode for r in result.rows] == ["t2v", "mi2v"]
    t2v, mi2v = spy.calls
    expected_t2v = {**pipeline.default_t2v_sampling, "num_inference_steps": 1}
    assert t2v["use_t2v"] is True
    assert {k: t2v[k] for k in expected_t2v} == expected_t2v
    assert (t2v["shift"], t2v["boundary_ratio"]) == (12.0, 0.875)
    # the reference story pipeline passes its guidance (3.5) to the T2V first shot too
    assert (t2v["guidance_scale"], t2v["guidance_scale_2"]) == (3.5, 3.5)
    assert "use_t2v" not in mi2v
    assert (mi2v["shift"], mi2v["boundary_ratio"], mi2v["num_inference_steps"]) == (5.0, 0.9, 1)
    saved = json.loads(storage.read_bytes(storage.join(result.story_uri, "config.json")))
    assert saved["t2v_sampling"] == config.t2v_sampling and saved["sampling"]["shift"] == 5.0


@pytest.mark.parametrize("with_t2v", [True, False])
def test_without_memory_every_shot_is_independent(tiny, tmp_path, with_t2v):
    pipeline, scorers = tiny
    spy = RecordingPipeline(pipeline)
    config = RenderConfig.for_pipeline(pipeline, scorers, **SMALL, memory=False,
                                       sampling={"num_inference_steps": 1})
    assert config.transition == "mi2v"  # ignored without memory
    if not with_t2v:
        config = config.replace(t2v_model_id=None)  # M2V with an empty memory
    assert config.config_hash() != config.replace(memory=True).config_hash()
    script = load_script(THREE_SHOTS)
    runner = StoryRunner(spy, NoScorers(), config)
    # one shot, then a fresh runner resumes the story from the shot records alone
    runner.open_session(script, str(tmp_path)).render_shot(script.shots[0])
    result = runner.render(script, str(tmp_path), progress=False)
    assert result.status == "resumed" and result.shots_rendered == 2
    mode = "t2v" if with_t2v else "m2v-no-memory"
    rows = pq.read_table(io.BytesIO(storage.read_bytes(result.parquet_uri))).to_pylist()
    assert [r["mode"] for r in rows] == [mode] * 3
    assert [r["num_frames"] for r in rows] == [9, 9, 9]  # no MI2V: nothing dropped
    assert all(r["memory_keyframe_ids"] == [] and r["keyframe_ids"] == []
               and r["keyframe_scores"] == [] for r in rows)
    for call in spy.calls:
        assert not {"memory", "memory_latents", "first_frame", "motion_frames"} & set(call)
        assert call.get("use_t2v", False) is with_t2v
        assert call["shift"] == (12.0 if with_t2v else 4.0)
    files = storage.list_files(result.story_uri)
    assert not [f for f in files if f.startswith(("keyframes/", "memory/"))]
    assert storage.verify_commit(result.story_uri) == []
    marker = storage.read_commit_marker(result.story_uri)
    assert marker["config"]["memory"] is False and marker["shots"] == 3
    assert [e["path"] for e in marker["files"]] == [f for f in files if f != "_COMMITTED.json"]
