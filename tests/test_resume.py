"""Crash and resume with a real kill: `storymem render` is SIGKILLed right after its second
shot's checkpoint, rerun, and compared byte for byte with an uninterrupted run.

The story's third shot continues the second (cut: false, MM2V: its first 5 frames are the
second shot's last 5), so the resumed process must restore the lossless last frames and
the memory bank exactly; a 2-frame memory with a 1-frame sink makes the window slide."""
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

from storymem_model.runner import TIMING_COLUMNS
from storymem_model.story_script import load_script

ROOT = Path(__file__).resolve().parents[1]
STORYMEM = [sys.executable, "-m", "flows.cli"]
STORY = {
    "story_name": "Resume Check",
    "scenes": [
        {"video_prompts": ["A heron stands in a misty pond.", "The heron spreads its wings."],
         "cut": [True, False]},
        {"video_prompts": ["The heron lifts off over the water.", "A fisherman waves."],
         "cut": [False, True]},
    ],
}
SHOTS = 4


@pytest.fixture
def script_path(tmp_path) -> Path:
    path = tmp_path / "resume_check.json"
    path.write_text(json.dumps(STORY), encoding="utf-8")
    return path


def _render_cmd(script: Path, out: Path) -> list[str]:
    return [*STORYMEM, "render", str(script), "--preset", "tiny", "--out", str(out),
            "--progress", "log", "--seed", "3", "--transition", "mm2v",
            "--max-memory", "2", "--memory-sink", "1"]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _story_dir(script: Path, out: Path) -> Path:
    story_id = load_script(script).story_id
    dirs = list((out / story_id).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(folder: Path) -> list[dict]:
    rows = pq.read_table(io.BytesIO((folder / "shots.parquet").read_bytes())).to_pylist()
    for row in rows:
        for column in TIMING_COLUMNS:
            row.pop(column)
        row.pop("video_uri")  # holds the output folder's own path
    return rows


def _kill_after_second_shot(script: Path, out: Path) -> str:
    """Start a render, SIGKILL it as soon as shot 2's checkpoint exists; return its log."""
    proc = subprocess.Popen(_render_cmd(script, out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if list(out.glob("*/*/shots/01_02.json")):
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail("render exited before its second shot:\n"
                            + proc.stdout.read().decode(errors="replace"))
            time.sleep(0.01)
        else:
            pytest.fail("no second shot within 300 s")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, output
    return output


def test_killed_render_resumes_byte_identical(tmp_path, script_path):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    # the uninterrupted run goes on beside the crash and the resume (one thread each)
    full = subprocess.Popen(_render_cmd(script_path, clean), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_after_second_shot(script_path, crashed)
        story = _story_dir(script_path, crashed)
        assert not (story / "_COMMITTED.json").exists()
        recorded = sorted(p.name for p in (story / "shots").glob("*.json"))
        assert recorded[:2] == ["01_01.json", "01_02.json"] and len(recorded) < SHOTS

        resumed = subprocess.run(_render_cmd(script_path, crashed), cwd=ROOT, env=_env(),
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resumed" in resumed.stdout
        assert f"({SHOTS - len(recorded)} rendered now)" in resumed.stdout
        full_out, full_err = full.communicate(timeout=600)
    finally:
        if full.poll() is None:
            full.kill()
            full.communicate()
    assert full.returncode == 0, full_out + full_err
    assert "rendered" in full_out

    clean_story = _story_dir(script_path, clean)
    assert clean_story.name == story.name  # same config hash
    a, b = _files(story), _files(clean_story)
    assert sorted(a) == sorted(b)
    compared = [k for k in a if k.endswith((".mp4", ".png")) or k.startswith("memory/")]
    assert len([k for k in compared if k.startswith("keyframes/")]) >= 1
    assert len([k for k in compared if k.startswith("memory/")]) >= 3
    differing = [k for k in compared if a[k] != b[k]]
    assert differing == [], differing
    rows = _rows(story)
    assert rows == _rows(clean_story)
    assert [r["mode"] for r in rows] == ["t2v", "mm2v", "mm2v", "m2v"]
    assert [r["num_frames"] for r in rows] == [17, 12, 12, 17]
    assert all(len(r["memory_keyframe_ids"]) <= 2 for r in rows)

    # a third run finds the story committed and renders nothing
    before = {k: (story / k).stat().st_mtime_ns for k in a}
    again = subprocess.run(_render_cmd(script_path, crashed), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skipped" in again.stdout and "(0 rendered now)" in again.stdout
    assert {k: (story / k).stat().st_mtime_ns for k in a} == before
