"""A batch driver killed with SIGKILL loses no recorded row, and the same command continues.

`storymem batch` runs in a subprocess (its own embedded Ray). Two invalid scripts are
listed before the first valid story, so their error rows are known before any story
commits. Right after the first story's outcome is on storage the driver process gets a
real SIGKILL, and the embedded Ray it started goes with it (as when the driver's host is
lost): no compaction, no summary ever happens, yet both error rows and the story's row
are on storage. Running the same command again (same --run-id) continues the run: it
completes with every valid story committed once, the first one not rendered again, and
all error rows present.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SMALL_TINY_FLAGS
from pipelines.batch.recorder import ERROR_PARTS, STORY_PARTS, read_parts
from pipelines.batch.worker_logs import invocation_sections
from pipelines.run_tables import ErrorRow, StoryRow
from storymem_model import storage
from storymem_model.story_script import load_script

pytestmark = pytest.mark.ray

RUN_ID = "killed"
FIRST_ROW_TIMEOUT_S = 600
RUN_TIMEOUT_S = 900
PROMPTS = [["a lighthouse at dusk", "waves hit the rocks"],
           ["a fox crosses a frozen river", "the fox reaches the far bank"],
           ["a baker opens the shop", "bread cools on the shelf"],
           ["a kite rises over dunes", "the kite string snaps"]]


def _write_scripts(folder: Path) -> list[str]:
    folder.mkdir()
    (folder / "00_broken.json").write_text('{"story_name": "Broken", "scenes": '
                                           '[{"video_prompts": []}]}')
    (folder / "01_not_json.json").write_text("{this is not json")
    ids = []
    for i, prompts in enumerate(PROMPTS, start=2):
        story = {"story_name": f"Story {i}", "scenes": [
            {"scene_num": 1, "video_prompts": prompts, "cut": [True, False]}]}
        (folder / f"{i:02d}_story.json").write_text(json.dumps(story))
        ids.append(load_script(story, name=f"{i:02d}_story.json").story_id)
    return ids


def _command(scripts: Path, out: Path) -> list[str]:
    storymem = Path(sys.executable).with_name("storymem")
    return [str(storymem), "batch", "--scripts", str(scripts), "--out", str(out),
            "--run-id", RUN_ID, "--workers", "1", "--cpus-per-worker", "0.25",
            "--progress", "log", "--log-flush", "0.5", *SMALL_TINY_FLAGS]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the batch starts its own embedded Ray
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _session_processes(session: int) -> list[int]:
    """Live processes of a session (the killed driver's embedded Ray left behind)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state ppid pgrp session
            pids.append(int(entry))
    return pids


def _kill_session(session: int, timeout_s: float = 60.0) -> None:
    """SIGKILL, by id, every process the killed driver started (its embedded Ray: GCS,
    raylet, the worker and scorer actors), until none is left."""
    deadline = time.monotonic() + timeout_s
    while (pids := _session_processes(session)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not _session_processes(session), "processes of the killed driver are left"


def _table(path: Path) -> list[dict]:
    return pq.read_table(io.BytesIO(path.read_bytes())).to_pylist()


def test_killed_driver_keeps_its_rows_and_the_same_command_continues(tmp_path,
                                                                     small_tiny_render):
    ids = _write_scripts(tmp_path / "scripts")
    out = tmp_path / "out"
    run = out / "runs" / RUN_ID
    parts = str(run / "parts")
    command = _command(tmp_path / "scripts", out)
    log_file = open(tmp_path / "first.log", "wb")
    driver = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=_env(),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + FIRST_ROW_TIMEOUT_S
        while not read_parts(parts, STORY_PARTS, StoryRow):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no story committed in time"
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)  # right after the first committed story
        assert driver.wait(timeout=60) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()
        log_file.close()
        _kill_session(driver.pid)

    # What the killed driver knew is on storage, though it never finished the run.
    assert not (run / "summary.json").exists() and not (run / "errors.parquet").exists()
    assert (run / "logs" / "parts" / f"storymem-{RUN_ID}-worker-0").is_dir()  # its log
    errors = read_parts(parts, ERROR_PARTS, ErrorRow)
    assert sorted((e.position, e.stage, e.error_type) for e in errors.values()) == [
        (0, "listing", "ScriptError"), (1, "listing", "ScriptError")]
    assert {e.source.rsplit("/", 1)[1] for e in errors.values()} == {
        "00_broken.json", "01_not_json.json"}
    first_rows = read_parts(parts, STORY_PARTS, StoryRow)
    (first,) = first_rows.values()  # exactly one story had finished
    assert (first.story_id, first.status, first.position) == (ids[0], "rendered", 2)
    assert first.config_hash == small_tiny_render.config_hash
    first_story = Path(first.story_uri)
    assert storage.is_committed(str(first_story))
    committed_before = (first_story / "_COMMITTED.json").read_bytes()
    # A story the worker committed in the moment between the driver's death and its own
    # has no row; the continuation finds it committed (and records it as skipped).
    unrecorded = {i for i in ids[1:] if storage.is_committed(str(out / i / first.config_hash))}
    assert len(unrecorded) <= 1 < len(ids) - 1  # the continuation has stories to render

    # The same command again: the run continues and completes.
    again = subprocess.run(command, capture_output=True, text=True, env=_env(),
                           timeout=RUN_TIMEOUT_S)
    assert again.returncode == 1, again.stderr[-3000:]  # two invalid scripts: exit 1
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["rendered"], summary["skipped"], summary["invalid"],
            summary["failed"]) == (len(ids) - len(unrecorded), len(unrecorded), 2, 2)
    assert summary["recorded_before"] == 3  # two error rows and the first story's row
    stories = _table(run / "stories.parquet")
    assert [r["story_id"] for r in stories] == ids  # each valid story once, in order
    assert [r["status"] for r in stories] == [
        "skipped" if i in unrecorded else "rendered" for i in ids]
    assert stories[0] == first.to_row()  # recorded by the killed driver, kept as is
    # a story the killed run left half done resumed: this run rendered only its rest
    assert all(1 <= r["shots_rendered"] <= 2 for r in stories
               if r["story_id"] not in unrecorded)
    for story_id in ids:
        uri = str(out / story_id / first.config_hash)
        assert storage.is_committed(uri) and storage.verify_commit(uri) == []
        assert [p.name for p in (out / story_id).iterdir()] == [first.config_hash]
    # the first story was not rendered again
    assert (first_story / "_COMMITTED.json").read_bytes() == committed_before
    # the killed invocation's worker log survived (flushed as it ran); the continuation's
    # part of it shows the first story was not rendered again
    sections = invocation_sections(
        (run / "logs" / f"storymem-{RUN_ID}-worker-0.log").read_text())
    assert len(sections) == 2
    assert ids[0] in sections[0] and ids[0] not in sections[1]
    errors = _table(run / "errors.parquet")
    assert [(r["position"], r["stage"], r["error_type"]) for r in errors] == [
        (0, "listing", "ScriptError"), (1, "listing", "ScriptError")]
    shots = _table(run / "shots.parquet")
    assert len(shots) == 2 * len(ids) and {r["run_id"] for r in shots} == {RUN_ID}
