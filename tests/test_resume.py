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


# ---------------------------------------------------------------------------------------
# Two writers: a shot record and its video that disagree are rendered again, not a commit
# that fails on every retry.
THREE_SHOTS = {"story_name": "Two Writers", "scenes": [{"video_prompts": [
    "a red kite rises over a beach", "the kite loops in the wind", "a child reels it in"],
    "cut": [True, False, True]}]}


def _story_files(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(folder).items()
            if not (k.startswith("shots/") and k.endswith(".json"))
            and k not in ("shots.parquet", "_COMMITTED.json")}


def _records(folder: Path) -> list[dict]:
    out = []
    for path in sorted((folder / "shots").glob("*.json")):
        row = json.loads(path.read_text())
        out.append({k: v for k, v in row.items() if k not in TIMING_COLUMNS})
    return out


@pytest.mark.parametrize("memory", [True, False])
def test_a_shot_whose_video_differs_from_its_record_is_rendered_again(tmp_path,
                                                                     small_tiny_render,
                                                                     memory):
    from storymem_model import storage
    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.runner import open_runner
    from storymem_model.specs import ModelSpec, RenderSettings, SamplingOverrides

    spec = small_tiny_render
    if not memory:
        spec = resolve_render_spec(ModelSpec(preset="tiny"), None, RenderSettings(
            memory=False, num_frames=9, height=32, width=32,
            sampling=SamplingOverrides(num_inference_steps=2)), accelerator=False)
    runner = open_runner(spec)
    script = load_script(THREE_SHOTS, name="two_writers")
    out = tmp_path / "out"
    first = runner.render(script, str(out), progress=False)
    story = Path(first.story_uri)
    files, records = _story_files(story), _records(story)
    # Another writer of the same story left its own second shot: the record names the
    # first writer's video. (Removing the commit marker stands for a story caught before
    # its commit.)
    (story / "_COMMITTED.json").unlink()
    (story / "shots" / "01_02.mp4").write_bytes((story / "shots" / "01_01.mp4").read_bytes())
    again = runner.render(script, str(out), progress=False)
    # With memory the bank before shot 2 is no longer kept: the story starts over;
    # without memory only shot 2 and what follows it are rendered again.
    assert again.shots_rendered == (3 if memory else 2)
    assert again.status == ("rendered" if memory else "resumed")
    assert storage.verify_commit(str(story)) == []
    assert _story_files(story) == files and _records(story) == records
