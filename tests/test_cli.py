"""`storymem render`: help, exit codes and failure summary, references (MR2V), progress."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from storymem_model import storage
from storymem_model.story_script import load_script

ROOT = Path(__file__).resolve().parents[1]
TWO_SHOTS = {"story_name": "Lantern", "scenes": [
    {"video_prompts": ["A paper lantern floats up at night.", "It drifts over rooftops."],
     "cut": [True, False]}]}


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "render" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--preset", "--model-dir", "--t2v-model-dir", "--lora-dir",
                 "--transition", "--references", "--seed", "--max-memory", "--memory-sink",
                 "--rope-shift", "--steps", "--guidance-scale", "--shift", "--device",
                 "--dtype", "--clip-checkpoint", "--aesthetic-head", "--progress"):
        assert flag in text, flag
    assert "_COMMITTED.json" in text and "resumes" in text


def test_bad_flags_exit_2_before_any_model_work(tmp_path, capsys):
    script = _write(tmp_path / "s.json", TWO_SHOTS)
    assert main(["render", str(script), "--out", str(tmp_path / "o")]) == 2
    assert "give --preset tiny or --model-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["render", str(script), "--out", "o", "--preset", "tiny", "--transition", "x"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["render", str(script), "--out", "o", "--preset", "tiny",
              "--model-dir", str(tmp_path)])
    assert info.value.code == 2  # --preset and --model-dir exclude each other
    capsys.readouterr()
    assert main(["render", str(script), "--out", str(tmp_path / "o"), "--preset", "tiny",
                 "--height", "40", "--num-frames", "18"]) == 2
    err = capsys.readouterr().err
    assert "height must be a positive multiple of 16, got 40" in err
    assert "num_frames must be 4k+1" in err
    assert main(["render", str(script), "--out", str(tmp_path / "o"),
                 "--model-dir", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["render", str(script), "--out", "foo://bucket/x", "--preset", "tiny"]) == 2
    assert "cannot open storage URI 'foo://bucket/x'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_failing_stories_are_summarised_and_the_others_still_render(tmp_path):
    good = _write(tmp_path / "good.json", TWO_SHOTS)
    bad = _write(tmp_path / "bad.json", {"story_name": "Bad", "scenes": [
        {"video_prompts": ["fine", ""], "cut": [False, True]}]})
    broken = _write(tmp_path / "broken.json", "{not json")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "render", str(bad), str(good), str(broken),
         str(tmp_path / "missing.json"), "--preset", "tiny", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = proc.stdout
    assert "3 of 4 stories FAILED" in summary
    assert "bad.json: story script" in summary
    assert "scene 1, shot 1: the first shot of a story must be a cut" in summary
    assert "scene 1, shot 2: prompt is empty" in summary
    assert "broken.json: not valid JSON/JSON5" in summary
    assert "missing.json: file not found" in summary
    # the good story rendered completely; nothing was written for the bad ones (the
    # output lock's folder is all there is besides the story, its lease released)
    story_id = load_script(good).story_id
    assert f"rendered  {story_id}: 2 shots" in summary
    assert sorted(p.name for p in out.iterdir()) == ["_locks", story_id]
    assert not (out / "_locks" / "render.json").exists()
    (story,) = (out / story_id).iterdir()
    assert storage.verify_commit(str(story)) == []
    # not a terminal: plain log lines, no progress bars
    assert "shot 2/2 (scene 1 shot 2, mi2v)" in proc.stderr
    assert "\r" not in proc.stderr


def test_references_make_the_first_shot_mr2v_with_bars_on_a_terminal(tmp_path, capsys,
                                                                      monkeypatch):
    from PIL import Image

    script = _write(tmp_path / "s.json", TWO_SHOTS)
    ref = tmp_path / "hero.png"
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(ref)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    out = tmp_path / "out"
    code = main(["render", str(script), "--preset", "tiny", "--out", str(out),
                 "--references", str(ref), "--steps", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "shot" in captured.err and "stories" in captured.err  # tqdm bars
    (story,) = (out / load_script(script).story_id).iterdir()
    config = json.loads((story / "config.json").read_text())
    assert len(config["references_sha256"]) == 1
    assert config["sampling"]["num_inference_steps"] == 2
    rows = pq.read_table(io.BytesIO((story / "shots.parquet").read_bytes())).to_pylist()
    assert [r["mode"] for r in rows] == ["mr2v", "mi2v"]
    assert rows[0]["memory_keyframe_ids"] == ["reference000"]

    code = main(["render", str(script), "--preset", "tiny", "--out", str(out),
                 "--references", str(tmp_path / "nope.png")])
    assert code == 2
    assert "reference image" in capsys.readouterr().err


def test_no_memory_flag_makes_a_no_memory_spec_and_refuses_references(tmp_path, capsys):
    """--no-memory -> memory=False, transition none and no scorers (the render itself is
    covered by test_runner_e2e and the bench-stbench baseline in test_eval_e2e)."""
    import argparse

    from PIL import Image

    from flows.cli.model_flags import add_model_arguments, render_spec_from_args

    with pytest.raises(SystemExit):
        main(["render", "--help"])
    assert "--no-memory" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    spec = render_spec_from_args(parser.parse_args(["--preset", "tiny", "--no-memory"]),
                                 accelerator=False)
    assert spec.config.memory is False and spec.config.transition == "none"
    assert spec.scorers is None
    default = render_spec_from_args(parser.parse_args(["--preset", "tiny"]), accelerator=False)
    assert default.config.memory is True and default.config.transition == "mi2v"
    assert default.scorers is not None

    script = _write(tmp_path / "s.json", TWO_SHOTS)
    ref = tmp_path / "hero.png"
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(ref)
    code = main(["render", str(script), "--preset", "tiny", "--out", str(tmp_path / "o2"),
                 "--no-memory", "--references", str(ref)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--no-memory" in err and "cannot use --references" in err
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------
# The output lock: `storymem render` holds OUT/_locks/render.json while it renders.
SMALL = ["--preset", "tiny", "--num-frames", "9", "--height", "32", "--width", "32",
         "--steps", "2"]


def test_a_second_writer_of_the_output_exits_at_once_naming_the_holder(tmp_path, capsys):
    import threading
    import time

    from storymem_model.output_lock import OutputLock, read_lock

    script = _write(tmp_path / "s.json", TWO_SHOTS)
    out = tmp_path / "out"
    holder = OutputLock(str(out), owner="the other render", ttl_s=60).acquire()
    try:
        started = time.monotonic()
        code = main(["render", str(script), "--out", str(out), *SMALL])
        assert code == 2 and time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert "locked by another run" in err and "'the other render'" in err
        assert sorted(p.name for p in out.iterdir()) == ["_locks"]  # nothing rendered
        # --wait-lock: waits for the holder, then renders
        threading.Timer(1.0, holder.release).start()
        code = main(["render", str(script), "--out", str(out), "--wait-lock", "60", *SMALL])
        assert code == 0, capsys.readouterr().err
    finally:
        holder.release()
    assert storage.is_committed(str(next((out / load_script(script).story_id).iterdir())))
    assert read_lock(str(out)) is None  # released at the end


def test_a_render_that_loses_the_lock_stops_before_its_next_shot(tmp_path, capsys):
    """Another run takes the lease over (this one "stalled"): the render notices at its
    renewal, finishes the shot it is in, stops with status 2 and commits nothing; the
    next render resumes the story."""
    import threading
    import time

    from storymem_model.output_lock import lock_uri

    story = {"story_name": "Three", "scenes": [{"video_prompts": [
        "a red kite rises", "the kite loops", "the kite lands"], "cut": [True, False, True]}]}
    script = _write(tmp_path / "three.json", story)
    out = tmp_path / "out"
    lock_file = Path(lock_uri(str(out)))
    stop = threading.Event()

    def take_over_after_the_first_shot():
        while not stop.is_set() and not list(out.glob("*/*/shots/01_01.json")):
            time.sleep(0.01)
        if not stop.is_set():
            storage.write_bytes(str(lock_file), json.dumps({
                "owner": "a run that took over", "token": "other", "acquired_at": time.time(),
                "renewed_at": time.time(), "expires_at": time.time() + 120}).encode())

    thread = threading.Thread(target=take_over_after_the_first_shot)
    thread.start()
    try:
        code = main(["render", str(script), "--out", str(out), "--lock-ttl", "0.6",
                     "--preset", "tiny", "--progress", "log"])
    finally:
        stop.set()
        thread.join()
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert f"the output lock {lock_file} was lost" in captured.err
    assert "stopped before the next shot" in captured.err
    (story_dir,) = (out / load_script(script).story_id).iterdir()
    recorded = sorted(p.name for p in (story_dir / "shots").glob("*.json"))
    assert recorded[0] == "01_01.json" and len(recorded) < 3
    assert not (story_dir / "_COMMITTED.json").exists()
    assert json.loads(lock_file.read_text())["owner"] == "a run that took over"  # untouched
    lock_file.unlink()  # the other run is done
    assert main(["render", str(script), "--out", str(out), "--preset", "tiny",
                 "--progress", "log"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert storage.verify_commit(str(story_dir)) == []
