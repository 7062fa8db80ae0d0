"""The batch's bookkeeping without Ray: worker slots, attempts and timeouts, the run recorder
(rows on storage as they come, continued by the same run id, compacted into tables whose
schemas come from the record dataclasses), typed events."""
from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from actors.batch_events import ShotRendered, StoryFailed, WorkerLog
from pipelines.batch.recorder import RunRecorder
from pipelines.batch.slots import SlotState, SlotTable, StoryTask
from pipelines.run_tables import ErrorRow, StoryRow
from pipelines.story_planner import PlannedStory
from storymem_model import storage
from storymem_model.records import ShotDone


def _task(story_id: str = "kite-1", position: int = 0) -> StoryTask:
    return StoryTask(PlannedStory(position=position, source=f"{story_id}.json",
                                  story_id=story_id, story_name=story_id, num_shots=2,
                                  story_uri=f"out/{story_id}/h", status="pending"))


def test_slots_assign_release_and_count_attempts():
    table = SlotTable("night", workers=2, replacement_limit=1)
    assert [s.name for s in table.slots] == ["storymem-night-worker-0",
                                              "storymem-night-worker-1"]
    assert table.idle() == [] and not table.ever_ready
    first, second = table.slots
    table.ready(first, pid=11)
    assert table.idle() == [first] and table.ever_ready
    task = _task()
    table.assign(first, task, now=100.0)
    assert (first.state, task.attempts, task.started) == (SlotState.BUSY, 1, 100.0)
    with pytest.raises(RuntimeError, match="not idle"):
        table.assign(first, _task("fox"), now=101.0)
    assert table.release(first) is task and first.state is SlotState.IDLE
    table.assign(first, task, now=200.0)
    assert task.attempts == 2 and task.can_retry(3) and not task.can_retry(2)


def test_overdue_stories_are_reported_once_and_the_timeout_mark_is_taken_once():
    table = SlotTable("night", workers=2, replacement_limit=2)
    for slot in table.slots:
        table.ready(slot, pid=1)
    slow, fast = table.slots
    table.assign(slow, _task("slow"), now=0.0)
    table.assign(fast, _task("fast", 1), now=50.0)
    assert table.overdue(now=60.0, timeout_s=None) == []
    assert table.overdue(now=60.0, timeout_s=30.0) == [slow]
    assert table.overdue(now=61.0, timeout_s=30.0) == []  # killed once, not again
    # the killed worker's story comes back as a death, which was the timeout's doing
    assert table.take_timeout(slow) and not table.take_timeout(slow)
    table.release(slow, SlotState.RECOVERING)
    assert not table.take_timeout(fast)
    assert table.overdue(now=81.0, timeout_s=30.0) == [fast]


def test_lost_workers_are_replaced_until_the_limit_then_gone():
    table = SlotTable("night", workers=2, replacement_limit=1)
    first, second = table.slots
    assert table.replace(first)
    assert (first.name, first.state, table.replacements) == (
        "storymem-night-worker-0.1", SlotState.STARTING, 1)
    assert not table.replace(second)  # the one replacement is used up
    assert second.state is SlotState.GONE and second.handle is None
    assert table.live_indices() == [0] and table.any_alive()
    assert not table.replace(first)
    assert not table.any_alive() and table.live_indices() == []


def _story_row(run_id: str, position: int, story_id: str, status: str = "rendered",
               out: str = "out") -> StoryRow:
    return StoryRow(run_id=run_id, position=position, source=f"{story_id}.json",
                    story_id=story_id, story_name=story_id.title(), status=status,
                    num_shots=2, shots_rendered=2 if status == "rendered" else 0,
                    attempts=1, config_hash="abc", story_uri=f"{out}/{story_id}/abc")


def _error_row(run_id: str, position: int, stage: str = "listing") -> ErrorRow:
    return ErrorRow(run_id=run_id, position=position, stage=stage, source=f"{position}.json",
                    error_type="ScriptError", message=f"script {position} is broken",
                    attempts=0)


def test_rows_are_on_storage_as_they_come_and_a_new_invocation_continues_from_them(tmp_path):
    out = str(tmp_path / "out")
    first = RunRecorder.open(out, "night")
    assert first.recorded_before == 0 and not (tmp_path / "out").exists()  # nothing yet
    first.record_error(_error_row("night", 0))
    first.record_error(_error_row("night", 1))
    first.record_story(_story_row("night", 2, "kite", out=out))
    parts = storage.list_files(f"{out}/runs/night/parts")
    assert parts == ["errors/000000000-listing.json", "errors/000000001-listing.json",
                     "stories/000000002-kite.json"]
    del first  # the driver is killed here: no compaction ever happens

    again = RunRecorder.open(out, "night")
    assert again.recorded_before == 3
    assert again.recorded_story(2, "kite") == _story_row("night", 2, "kite", out=out)
    assert again.recorded_story(2, "fox") is None and again.recorded_story(3, "kite") is None
    again.record_error(_error_row("night", 1))  # listed again: the same part, once
    again.record_story(_story_row("night", 3, "fox", status="failed", out=out))
    again.record_error(_error_row("night", 3, stage="render"))
    assert again.counts() == {"rendered": 1, "skipped": 0, "failed": 1, "invalid": 2}
    (tmp_path / "out" / "kite" / "abc").mkdir(parents=True)
    pq.write_table(ShotDone.table([]), str(tmp_path / "out" / "kite" / "abc" /
                                           "shots.parquet"))
    tables = RunRecorder.open(out, "night").finish()
    stories = pq.read_table(io.BytesIO(storage.read_bytes(tables.stories)))
    errors = pq.read_table(io.BytesIO(storage.read_bytes(tables.errors)))
    assert stories.schema == StoryRow.arrow_schema() and errors.schema == ErrorRow.arrow_schema()
    assert [(r["position"], r["status"]) for r in stories.to_pylist()] == [
        (2, "rendered"), (3, "failed")]
    assert [(r["position"], r["stage"]) for r in errors.to_pylist()] == [
        (0, "listing"), (1, "listing"), (3, "render")]
    assert tables.shot_rows == 0  # the failed story's shots are not the run's


def test_parts_on_s3_and_a_broken_part_is_named(s3_bucket):
    out = f"{s3_bucket}/out"
    recorder = RunRecorder.open(out, "s3run")
    recorder.record_story(_story_row("s3run", 0, "kite"))
    recorder.record_error(_error_row("s3run", 1))
    again = RunRecorder.open(out, "s3run")
    assert again.stories == recorder.stories and again.errors == recorder.errors
    storage.write_bytes(f"{out}/runs/s3run/parts/errors/000000002-listing.json",
                        json.dumps({"position": 2}).encode())
    with pytest.raises(storage.StorageError, match="000000002-listing.json: not a ErrorRow"):
        RunRecorder.open(out, "s3run")


def test_rows_refuse_unknown_statuses_and_stages():
    with pytest.raises(ValueError, match="'done'"):
        _story_row("r", 0, "kite", status="done")
    with pytest.raises(ValueError, match="'parse'"):
        _error_row("r", 0, stage="parse")


def test_events_are_typed_and_describe_themselves_for_the_worker_logs():
    shot = ShotDone(story_id="kite", shot_index=0, shots_total=2, scene=1, shot=1, mode="t2v",
                    seconds=1.5)
    event = ShotRendered(worker="storymem-r-worker-0", pid=7, shot=shot)
    assert event.story_id == "kite" and event.worker_name == "storymem-r-worker-0"
    assert event.describe() == "shot_done: story kite: shot 1/2 (scene 1 shot 1, t2v) done in 1.5 s"
    failed = StoryFailed(story_id="fox", attempts=3, error_type="RuntimeError", message="boom")
    assert failed.worker_name is None  # the driver's log
    assert failed.describe() == ("story_failed: story_id=fox attempts=3 "
                                 "error_type=RuntimeError message=boom")
    assert WorkerLog(worker="w", pid=1, level="INFO", message="ready").describe() == "ready"
    with pytest.raises(Exception):
        event.pid = 8  # frozen


# ---------------------------------------------------------------------------------------
# Worker logs reach storage as the run goes; leftovers of killed writes; bounded parts.
def _log_event(worker: str, message: str) -> WorkerLog:
    return WorkerLog(worker=worker, pid=1, level="INFO", message=message)


def test_worker_logs_are_on_storage_as_the_run_goes_and_compacted_per_worker(
        tmp_path, monkeypatch):
    import pipelines.batch.worker_logs as worker_logs
    from pipelines.batch.worker_logs import WorkerLogs, invocation_sections

    run = str(tmp_path / "runs" / "r")
    first = WorkerLogs(run, flush_s=0.0, invocation="20260101T000000Z-aaaaaa")
    first.write(_log_event("w-0", "story kite: attempt 1"))
    first.write(StoryFailed(story_id="fox", attempts=3, error_type="E", message="boom"))
    first.flush()  # what the driver does every loop
    parts = storage.list_files(f"{run}/logs/parts")
    assert parts == ["driver/20260101T000000Z-aaaaaa-0000.log",
                     "w-0/20260101T000000Z-aaaaaa-0000.log"]
    assert "story kite" in (tmp_path / "runs/r/logs/parts/w-0" /
                            "20260101T000000Z-aaaaaa-0000.log").read_text()
    del first  # the driver is killed here: what was flushed stays

    monkeypatch.setattr(worker_logs, "SEGMENT_BYTES", 200)  # segments roll over
    again = WorkerLogs(run, flush_s=3600.0, invocation="20260101T010000Z-bbbbbb")
    for i in range(6):
        again.write(_log_event("w-0", f"continued line {i} " + "x" * 40))
    again.flush()  # too early: nothing more is written (only full segments were)
    segments = storage.list_files(f"{run}/logs/parts/w-0")
    assert len(segments) == 3 and segments[-1].endswith("bbbbbb-0001.log")
    uris = again.compact()
    assert [u.rsplit("/", 1)[1] for u in uris] == ["driver.log", "w-0.log"]
    text = (tmp_path / "runs/r/logs/w-0.log").read_text()
    first_part, second_part = invocation_sections(text)
    assert first_part.startswith("20260101T000000Z-aaaaaa ===") and "story kite" in first_part
    assert [f"continued line {i}" in second_part for i in range(6)] == [True] * 6
    assert "story kite" not in second_part


def test_unfinished_writes_of_a_killed_process_are_removed(tmp_path):
    from storymem_model.storage import remove_unfinished_writes

    story = tmp_path / "out" / "kite" / "abc"
    (story / "shots").mkdir(parents=True)
    leftover = story / "shots" / f".01_02.mp4.{'a1' * 16}.tmp"
    leftover.write_bytes(b"half a video")
    (story / "shots" / "01_01.mp4").write_bytes(b"video")
    (story / ".hidden.tmp").write_text("not one of ours")
    assert remove_unfinished_writes(str(tmp_path / "out")) == [str(leftover)]
    assert sorted(p.name for p in story.rglob("*")) == [".hidden.tmp", "01_01.mp4", "shots"]
    assert remove_unfinished_writes(str(tmp_path / "nowhere")) == []
    assert remove_unfinished_writes("s3://bucket/out") == []  # PUTs leave nothing behind


def test_a_continued_run_removes_leftovers_and_refuses_oversized_parts(tmp_path, monkeypatch):
    import pipelines.batch.recorder as recorder_module

    out = str(tmp_path / "out")
    first = RunRecorder.open(out, "night")
    first.record_story(_story_row("night", 0, "kite", out=out))
    parts = tmp_path / "out" / "runs" / "night" / "parts" / "stories"
    leftover = parts / f".000000001-fox.json.{'b2' * 16}.tmp"
    leftover.write_text('{"half": ')  # the killed driver's last write
    again = RunRecorder.open(out, "night")
    assert not leftover.exists() and again.recorded_before == 1
    monkeypatch.setattr(recorder_module, "MAX_PART_BYTES", 50)
    with pytest.raises(storage.StorageError, match=r"000000000-kite.json \(\d+ bytes\)"):
        RunRecorder.open(out, "night")
