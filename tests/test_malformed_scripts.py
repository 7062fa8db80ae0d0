"""The malformed-script corpus (tests/data/malformed/scripts/, one bad script per file,
its expected error class and a message fragment in expected.jsonl): every file is named
with its specific error by the script planner (the batch, the flows, `storymem plan` and
Serve jobs list scripts through it) and by `storymem render`, which still renders the one
good script given with them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.story_planner import InvalidScript, plan_items
from storymem_model import storage
from storymem_model.story_script import ScriptError, load_script

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "malformed" / "scripts"
GOOD = {"story_name": "Good Among Bad", "scenes": [
    {"video_prompts": ["a lighthouse keeper climbs the stairs", "the lamp turns on"],
     "cut": [True, False]}]}


def _expected() -> dict[str, dict]:
    lines = (CORPUS / "expected.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["file"]: row for row in map(json.loads, lines)}


def test_the_corpus_covers_every_kind_of_bad_script():
    expected = _expected()
    files = sorted(p.name for p in CORPUS.iterdir() if p.name != "expected.jsonl")
    assert files == sorted(expected)  # every file is indexed, every index entry exists
    assert len(files) >= 30
    kinds = {name.split("_", 1)[0] for name in files}
    assert kinds >= {"enc", "syntax", "nesting", "size", "type", "missing", "empty",
                     "length", "cut", "order"}


@pytest.mark.parametrize("name", sorted(_expected()))
def test_each_bad_script_fails_validation_with_its_own_message(name):
    entry = _expected()[name]
    with pytest.raises(ScriptError) as info:
        load_script(str(CORPUS / name))
    assert type(info.value).__name__ == entry["error"]
    assert entry["message"] in str(info.value)
    assert name in str(info.value)


def test_the_planner_names_every_bad_script_and_plans_the_good_one(tmp_path):
    expected = _expected()
    source = tmp_path / "scripts"
    source.mkdir()
    for name in expected:
        (source / name).write_bytes((CORPUS / name).read_bytes())
    (source / "zz_good.json").write_text(json.dumps(GOOD))
    items = list(plan_items(str(source), str(tmp_path / "out"), "0123456789abcdef"))
    invalid = {Path(i.source).name: i for i in items if isinstance(i, InvalidScript)}
    valid = [i for i in items if not isinstance(i, InvalidScript)]
    assert [Path(v.source).name for v in valid] == ["zz_good.json"]
    assert sorted(invalid) == sorted(expected)
    for name, item in invalid.items():
        assert item.error_type == expected[name]["error"], name
        assert expected[name]["message"] in item.message, (name, item.message)
        assert name in item.message


def test_storymem_render_names_every_bad_script_and_renders_the_good_one(tmp_path):
    expected = _expected()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    out = tmp_path / "out"
    bad = [str(CORPUS / name) for name in sorted(expected)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "render", *bad, str(good), "--out", str(out),
         "--preset", "tiny", "--num-frames", "9", "--height", "32", "--width", "32",
         "--steps", "2", "--progress", "log"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout
    assert f"{len(bad)} of {len(bad) + 1} stories FAILED" in summary
    assert "Traceback" not in proc.stderr
    blocks = _failure_blocks(summary)
    for name, entry in expected.items():
        block = blocks[str(CORPUS / name)]
        assert entry["message"] in block, (name, block)
    story_id = load_script(good).story_id
    assert f"rendered  {story_id}: 2 shots" in summary
    assert sorted(p.name for p in out.iterdir() if p.name != "_locks") == [story_id]
    (story,) = (out / story_id).iterdir()
    assert storage.verify_commit(str(story)) == []


def _failure_blocks(summary: str) -> dict[str, str]:
    """{source: its failure text} from the render summary ("  SOURCE: first line", then
    the message's other lines indented by four spaces)."""
    blocks: dict[str, str] = {}
    current = None
    for line in summary.splitlines():
        if line.startswith("    ") and current is not None:
            blocks[current] += "\n" + line[4:]
        elif line.startswith("  ") and not line.startswith("   ") and ": " in line:
            current, first = line[2:].split(": ", 1)
            assert current not in blocks, f"{current} reported twice"
            blocks[current] = first
        else:
            current = None
    return blocks
