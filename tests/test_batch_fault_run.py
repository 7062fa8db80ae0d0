"""The fault run: 8 tiny stories and 2 bad scripts, rendered by `storymem batch` with 2
workers while workers, a scorer actor and the driver are killed at seeded points, re-run
with the same command until it completes.

Invocations (each a real subprocess with its own embedded Ray; the points within them
are drawn from SEED):
  1. a worker SIGKILLed after a story's first shot; the CLIP scorer actor SIGKILLed with no
     Ray restart left (`--scorer-restarts 0`: the driver must replace it); the driver
     SIGKILLed after its n-th finished story;
  2. the driver SIGKILLed right after it submitted its first story;
  3. a worker ray.kill()ed after a story's first shot; the driver SIGKILLed while it
     compacts the run tables;
  4. no fault: the run completes.
After each killed driver the processes of its embedded Ray are killed too (its host is
gone), as in tests/test_batch_driver_kill.py. The harness is tests/fault_batch_driver.py.

Then: every valid story committed exactly once and byte-identical to a clean run (shot
records and tables compared without `TIMING_COLUMNS` and `video_uri`), no temporary file
and nothing committed half anywhere under the output, every error row present, the lock
released, and the killed invocations' logs kept.
"""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SMALL_TINY_FLAGS
from pipelines.batch import BatchOptions, BatchSpec, ScorerPoolOptions, run_batch
from pipelines.batch.worker_logs import invocation_sections
from storymem_model import storage
from storymem_model.records import TIMING_COLUMNS
from storymem_model.story_script import load_script
from test_batch_driver_kill import _env, _kill_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261130
RUN_ID = "faults"
INVOCATION_TIMEOUT_S = 900
MAX_INVOCATIONS = 6
VOLATILE = [*TIMING_COLUMNS, "video_uri"]

STORIES = [
    ("Lighthouse", ["a lighthouse at dusk", "waves break on the rocks"], [True, False]),
    ("Snow fox", ["a white fox in deep snow", "the fox pounces"], [True, True]),
    ("Baker", ["a baker kneads dough", "bread cools on a shelf"], [True, False]),
    ("Kite", ["a red kite over dunes", "the kite string snaps"], [True, False]),
    ("Diver", ["a diver jumps from a boat", "she swims past coral"], [True, True]),
    ("Robot", ["a robot waters tomatoes", "the robot rests in the shade"], [True, False]),
    ("Train", ["a night train on a bridge", "a passenger reads by lamplight"], [True, True]),
    ("Owl", ["an owl on a branch at night", "the owl takes flight"], [True, False]),
]
BAD = {  # listed among the stories: errors.parquet rows, stage "listing"
    "03_nested.json": "[" * 150 + "]" * 150,
    "07_empty_prompt.json": json.dumps({"story_name": "Empty", "scenes": [
        {"video_prompts": ["a shot", ""]}]}),
}


def _write_scripts(folder: Path) -> dict[str, str]:
    folder.mkdir()
    ids = {}
    names = iter(n for n in (f"{i:02d}_story.json" for i in range(10))
                 if n[:2] not in {b[:2] for b in BAD})
    for (title, prompts, cuts), name in zip(STORIES, names):
        story = {"story_name": title, "scenes": [
            {"scene_num": 1, "video_prompts": prompts, "cut": cuts}]}
        (folder / name).write_text(json.dumps(story))
        ids[name] = load_script(story, name=name).story_id
    for name, text in BAD.items():
        (folder / name).write_text(text)
    return ids


def _plan() -> list[list[dict]]:
    rng = random.Random(SEED)
    return [
        # the scorer dies early enough that later shots need its replacement before the
        # driver's n-th story is done
        [{"on": "ShotRendered", "n": 1, "do": "sigkill_worker"},
         {"on": "ShotRendered", "n": 2, "do": "sigkill_scorer"},
         {"on": "StoryDone", "n": rng.randint(3, 4), "do": "kill_driver"}],
        [{"on": "StorySubmitted", "n": 1, "do": "kill_driver"}],
        [{"on": "ShotRendered", "n": 1, "do": "ray_kill_worker"},
         {"on": "compaction", "do": "kill_driver"}],
        [],
    ]


def _command(scripts: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "fault_batch_driver.py"), "batch",
            "--scripts", str(scripts), "--out", str(out), "--run-id", RUN_ID,
            "--workers", "2", "--cpus-per-worker", "0.25", "--scorer-restarts", "0",
            "--progress", "log", "--log-flush", "0.5", *SMALL_TINY_FLAGS]


def _table(path: Path) -> list[dict]:
    return pq.read_table(io.BytesIO(path.read_bytes())).to_pylist()


def _story_files(story: Path) -> dict[str, bytes]:
    return {str(p.relative_to(story)): p.read_bytes()
            for p in sorted(story.rglob("*")) if p.is_file()}


def _same_story(ours: Path, theirs: Path) -> list[str]:
    """What differs between two renders of a story, timing columns and output paths aside."""
    a, b = _story_files(ours), _story_files(theirs)
    if sorted(a) != sorted(b):
        return [f"files {sorted(set(a) ^ set(b))}"]
    differing = []
    for rel in a:
        if rel == "_COMMITTED.json":
            continue
        if rel == "shots.parquet":
            x, y = (pq.read_table(io.BytesIO(d[rel])).drop_columns(VOLATILE) for d in (a, b))
            if not x.equals(y):
                differing.append(rel)
        elif rel.startswith("shots/") and rel.endswith(".json"):
            x, y = ({k: v for k, v in json.loads(d[rel]).items() if k not in VOLATILE}
                    for d in (a, b))
            if x != y:
                differing.append(rel)
        elif a[rel] != b[rel]:
            differing.append(rel)
    return differing


@pytest.fixture(scope="module")
def clean(ray_cluster, tmp_path_factory, small_tiny_render):
    """The same scripts rendered without any fault (in this process, the shared Ray)."""
    folder = tmp_path_factory.mktemp("clean")
    _write_scripts(folder / "scripts")
    options = BatchOptions(workers=2, cpus_per_worker=0.25, progress="log",
                           scorers=ScorerPoolOptions(cpus_per_actor=0.25))
    summary = run_batch(BatchSpec(scripts=str(folder / "scripts"), out=str(folder / "out"),
                                  render=small_tiny_render, options=options, run_id="clean"))
    assert (summary.rendered, summary.invalid) == (8, 2)
    return folder / "out"


def test_the_fault_run_completes_with_every_story_once_and_identical_to_a_clean_run(
        clean, tmp_path, small_tiny_render):
    ids = _write_scripts(tmp_path / "scripts")
    out = tmp_path / "out"
    state = tmp_path / "faults"
    state.mkdir()
    (state / "plan.json").write_text(json.dumps(_plan()))
    env = {**_env(), "STORYMEM_FAULT_DIR": str(state), "PYTHONPATH": str(ROOT)}
    command = _command(tmp_path / "scripts", out)
    run = out / "runs" / RUN_ID
    codes = []
    for invocation in range(MAX_INVOCATIONS):
        log = open(tmp_path / f"invocation-{invocation}.log", "wb")
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=ROOT, start_new_session=True)
        try:
            codes.append(driver.wait(timeout=INVOCATION_TIMEOUT_S))
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
            log.close()
            _kill_session(driver.pid)  # a killed driver's embedded Ray goes with its host
        if codes[-1] >= 0:
            break
    tail = (tmp_path / f"invocation-{len(codes) - 1}.log").read_text()[-4000:]
    assert codes == [-9, -9, -9, 1], tail  # three killed drivers, then done (bad scripts)

    # the faults happened where they were planned
    events = [[json.loads(line) for line in (state / f"events-{i}.jsonl").read_text()
               .splitlines()] for i in range(4)]
    faults = [[e for e in invocation if "fault" in e] for invocation in events]
    assert [f["fault"] for f in faults[0]] == ["sigkill_worker", "sigkill_scorer", "kill_driver"]
    assert "ScorerReplaced" in [e.get("kind") for e in events[0]]  # no Ray restart was left
    assert faults[3] == []
    assert [f["fault"] for f in faults[1]] == ["kill_driver"]
    assert [f["fault"] for f in faults[2]] == ["ray_kill_worker", "kill_driver"]
    assert faults[2][-1].get("during") == "compaction"

    summary = json.loads((run / "summary.json").read_text())
    assert (summary["rendered"] + summary["skipped"], summary["failed_render"],
            summary["invalid"]) == (8, 0, 2)
    assert summary["recorded_before"] >= 3  # rows of the killed invocations were kept
    stories = _table(run / "stories.parquet")
    assert sorted(r["story_id"] for r in stories) == sorted(ids.values())  # each once
    assert {r["status"] for r in stories} <= {"rendered", "skipped"}
    errors = _table(run / "errors.parquet")
    assert [(Path(e["source"]).name, e["stage"], e["error_type"]) for e in errors] == [
        ("03_nested.json", "listing", "ScriptError"),
        ("07_empty_prompt.json", "listing", "ScriptError")]
    assert "nested 150 levels deep" in errors[0]["message"]
    assert len(_table(run / "shots.parquet")) == 16

    config_hash = small_tiny_render.config_hash
    assert sorted(p.name for p in out.iterdir()) == sorted([*ids.values(), "_locks", "runs"])
    assert not (out / "_locks" / "render.json").exists()  # released by the last driver
    for story_id in ids.values():
        (story,) = (out / story_id).iterdir()  # committed once, under one config
        assert story.name == config_hash
        assert storage.verify_commit(str(story)) == []
        assert _same_story(story, clean / story_id / config_hash) == [], story_id
    leftovers = [str(p) for p in out.rglob("*") if storage.is_unfinished_write(p.name)
                 or p.name.endswith(".tmp")]
    assert leftovers == []

    # the killed invocations' logs are kept (written as they ran), one section each; the
    # second driver died within a moment of its start and may have had nothing to write
    assert len(invocation_sections((run / "logs" / "driver.log").read_text())) >= 3
    # worker-0 surely ran in the first and third invocations (both rendered stories); in the
    # second and the last (nothing left to render) the driver may stop before it is ready
    worker = invocation_sections((run / "logs" / f"storymem-{RUN_ID}-worker-0.log").read_text())
    assert len(worker) >= 2 and "ready: model" in worker[0], worker[:1]
    first = invocation_sections((run / "logs" / "driver.log").read_text())[0]
    assert "scorer_replaced: actor=storymem-faults-clip-0" in first
