"""`storymem plan`: the config hash and each story's folder and status, with no weights.

Real-layout model folders are the tiny weights saved as Wan2.2 diffusers folders
(tests/model_folders.py); the LoRA is a tiny pair in the released key format."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from pipelines.story_planner import PlanErrorType
from storymem_model.story_script import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--preset", "tiny", "--steps", "2", "--height", "32", "--width", "32",
              "--num-frames", "9"]
STORY = {"story_name": "Plan Check", "scenes": [
    {"video_prompts": ["A kite rises over a beach.", "The string snaps."],
     "cut": [True, False]}]}

# Runs `storymem plan` with every library that could load weights made unimportable.
NO_WEIGHTS_WRAPPER = """
import importlib.abc, sys
BLOCKED = ("torch", "diffusers", "transformers", "open_clip", "safetensors")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("storymem plan imported " + name)
sys.meta_path.insert(0, Blocker())
import argparse
from flows.cli.plan import add_plan_command
parser = argparse.ArgumentParser(prog="storymem")
add_plan_command(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
code = args.func(args)
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
sys.exit(code)
"""


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _plan_json(argv: list[str], capsys) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(autouse=True)
def _own_digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STORYMEM_CACHE_DIR", str(tmp_path / "digest-cache"))


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """The tiny weights as Wan2.2 I2V/T2V diffusers folders and a tiny StoryMem LoRA."""
    import torch

    import storymem_model
    from model_folders import save_diffusers_folders, write_lora_pair
    from storymem_model.presets import TINY

    torch.set_num_threads(1)
    pipe = storymem_model.load_pipeline("tiny")
    root = tmp_path_factory.mktemp("models")
    i2v, t2v = save_diffusers_folders(pipe, root)
    lora = write_lora_pair(root / "StoryMem-MI2V", (pipe.transformer, pipe.transformer_2),
                           TINY.lora_rank)
    return {"i2v": i2v, "t2v": t2v, "lora": lora}


def test_plan_imports_nothing_that_loads_weights(tmp_path, model_folders):
    """Run as a process in which torch, diffusers, transformers, open_clip and
    safetensors cannot be imported: plan still resolves a real-layout folder with a LoRA."""
    script = _write(tmp_path / "story.json", STORY)
    env = dict(os.environ, PYTHONPATH=str(ROOT), STORYMEM_CACHE_DIR=str(tmp_path / "cache"))
    for flags in (TINY_FLAGS, ["--model-dir", str(model_folders["i2v"]), "--t2v-model-dir",
                               str(model_folders["t2v"]), "--lora-dir",
                               str(model_folders["lora"]), "--no-memory"]):
        proc = subprocess.run(
            [sys.executable, "-c", NO_WEIGHTS_WRAPPER, "plan", str(script), "--out",
             str(tmp_path / "out"), "--device", "cpu", "--json", *flags],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        plan = json.loads(proc.stdout)
        assert plan["pending"] == 1 and len(plan["config_hash"]) == 12


def test_plan_without_device_loads_no_model_or_scorer(tmp_path, monkeypatch, capsys):
    """The default device comes from this machine (torch may be imported for that), but
    nothing that builds a model or a scorer is called."""
    import storymem_model.model_loading as model_loading
    import storymem_model.runner as runner
    import storymem_model.scorers.factory as factory

    def refuse(*args, **kwargs):
        raise AssertionError("storymem plan tried to load weights")

    for module, name in ((model_loading, "build_pipeline"), (model_loading, "load_pipeline"),
                         (runner, "open_runner"), (factory, "build_embedder"),
                         (factory, "build_gate"), (factory, "build_keyframe_scorers")):
        monkeypatch.setattr(module, name, refuse)
    script = _write(tmp_path / "story.json", STORY)
    code, plan = _plan_json([str(script), "--out", str(tmp_path / "out"), *TINY_FLAGS],
                            capsys)
    assert code == 0
    assert plan["render"]["model"]["device"] in ("cpu", "cuda")
    (row,) = plan["stories"]
    assert row["status"] == "pending" and row["story_id"] == load_script(script).story_id


def test_plan_hash_is_the_folder_render_writes_and_then_shows_committed(tmp_path, capsys):
    script = _write(tmp_path / "story.json", STORY)
    out = tmp_path / "out"
    story_id = load_script(script).story_id
    code, before = _plan_json([str(script), "--out", str(out), *TINY_FLAGS], capsys)
    assert code == 0 and (before["pending"], before["committed"]) == (1, 0)
    (row,) = before["stories"]
    assert row["story_uri"] == str(out / story_id / before["config_hash"])

    assert main(["render", str(script), "--out", str(out), "--progress", "none",
                 *TINY_FLAGS]) == 0
    capsys.readouterr()
    assert [p.name for p in (out / story_id).iterdir()] == [before["config_hash"]]
    assert (out / story_id / before["config_hash"] / "_COMMITTED.json").is_file()

    code, after = _plan_json([str(script), "--out", str(out), *TINY_FLAGS], capsys)
    assert code == 0 and after["config_hash"] == before["config_hash"]
    assert [r["status"] for r in after["stories"]] == ["committed"]
    # the text form says the same
    assert main(["plan", str(script), "--out", str(out), *TINY_FLAGS]) == 0
    text = capsys.readouterr().out
    assert f"committed {story_id}" in text and before["config_hash"] in text
    assert "1 listed: 1 committed, 0 pending, 0 invalid" in text
    # another pixel-changing setting is another folder
    code, seeded = _plan_json([str(script), "--out", str(out), *TINY_FLAGS, "--seed", "1"],
                              capsys)
    assert seeded["config_hash"] != before["config_hash"] and seeded["pending"] == 1


def test_real_layout_folder_plans_without_scorers_only_with_no_memory(tmp_path, capsys,
                                                                     model_folders):
    script = _write(tmp_path / "story.json", STORY)
    flags = ["--out", str(tmp_path / "out"), "--model-dir", str(model_folders["i2v"]),
             "--device", "cpu"]
    code, plan = _plan_json([str(script), *flags, "--no-memory"], capsys)
    assert code == 0 and plan["pending"] == 1
    assert plan["render"]["scorers"] is None
    config = plan["render"]["config"]
    assert config["memory"] is False and config["model_id"].startswith("wan2.2-i2v-a14b:")
    assert config["embedder_id"] in (None, "") and config["gate_id"] in (None, "")

    assert main(["plan", str(script), *flags]) == 2
    err = capsys.readouterr().err
    assert "storymem plan: error:" in err
    for flag in ("--clip-checkpoint", "--aesthetic-head", "--aesthetic-clip-checkpoint",
                 "--hps-checkpoint", "--no-memory"):
        assert flag in err, flag


def test_hash_follows_content_not_paths(tmp_path, capsys, model_folders):
    script = _write(tmp_path / "story.json", STORY)

    def config_hash(i2v: Path, lora: Path) -> str:
        code, plan = _plan_json([str(script), "--out", str(tmp_path / "out"), "--model-dir",
                                 str(i2v), "--lora-dir", str(lora), "--device", "cpu",
                                 "--no-memory"], capsys)
        assert code == 0
        return plan["config_hash"]

    original = config_hash(model_folders["i2v"], model_folders["lora"])
    moved_i2v = shutil.copytree(model_folders["i2v"], tmp_path / "elsewhere" / "wan-i2v")
    moved_lora = shutil.copytree(model_folders["lora"], tmp_path / "elsewhere" / "lora")
    assert config_hash(moved_i2v, moved_lora) == original

    lora_file = moved_lora / "backbone_low_noise.safetensors"
    data = bytearray(lora_file.read_bytes())
    data[-1] ^= 0x01  # one byte of one tensor
    lora_file.write_bytes(bytes(data))
    assert config_hash(moved_i2v, moved_lora) != original
    assert config_hash(moved_i2v, model_folders["lora"]) == original


def test_json_lists_invalid_scripts_with_their_error_type(tmp_path, capsys):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    _write(scripts / "a_good.json", STORY)
    _write(scripts / "b_same_story.json5", "// the same story, other formatting\n"
           + json.dumps(STORY, indent=2))
    _write(scripts / "c_broken.json", "{not json")
    manifest = _write(tmp_path / "manifest.jsonl", "\n".join([
        json.dumps({"uri": "scripts/a_good.json"}),
        json.dumps({"uri": "scripts/missing.json"}),
        json.dumps({"neither": "uri nor script"}),
    ]) + "\n")
    out = tmp_path / "out"
    code, plan = _plan_json([str(scripts), str(manifest), "--out", str(out), *TINY_FLAGS],
                            capsys)
    assert code == 1
    assert (plan["listed"], plan["pending"], plan["committed"], plan["invalid"]) == (6, 2, 0, 4)
    invalid = {r["source"]: r for r in plan["stories"] if r["status"] == "invalid"}
    assert sorted(invalid) == sorted([str(scripts / "b_same_story.json5"),
                                      str(scripts / "c_broken.json"),
                                      f"{manifest} line 2", f"{manifest} line 3"])
    broken = invalid[str(scripts / "c_broken.json")]
    assert broken["error_type"] == "ScriptError" and "not valid JSON/JSON5" in broken["message"]
    same = invalid[str(scripts / "b_same_story.json5")]
    assert same["error_type"] == "DuplicateStory"
    assert same["story_id"] == load_script(scripts / "a_good.json").story_id
    missing = invalid[f"{manifest} line 2"]
    assert missing["error_type"] == PlanErrorType.NOT_FOUND.value == "ScriptNotFound"
    assert "missing.json: file not found" in missing["message"]
    bad_row = invalid[f"{manifest} line 3"]
    assert bad_row["error_type"] == "ManifestRowError" and "'uri' or 'script'" in \
        bad_row["message"]
    assert {r["listing"] for r in plan["stories"]} == {str(scripts), str(manifest)}
    assert not out.exists()  # planning writes nothing


def test_unusable_flags_and_sources_exit_2(tmp_path, capsys):
    script = _write(tmp_path / "story.json", STORY)
    out = str(tmp_path / "out")
    assert main(["plan", str(script), "--out", out]) == 2
    assert "give --preset tiny or --model-dir" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "nowhere"), "--out", out, *TINY_FLAGS]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["plan", str(script), "--out", out, *TINY_FLAGS, "--height", "40"]) == 2
    assert "height must be a positive multiple of 16, got 40" in capsys.readouterr().err
    assert main(["plan", str(script), "--out", "foo://bucket/x", *TINY_FLAGS]) == 2
    assert "foo://bucket/x" in capsys.readouterr().err


def test_a_plans_manifest_lists_the_same_stories_at_their_source_positions(tmp_path):
    """The flows hand the batch the plan's pending stories as a manifest: read back, each
    row is the same story (same id, also for an unnamed inline script) at its place in the
    source and named by it, so the batch's rows and the plan's share one numbering."""
    from pipelines.story_planner import StoryPlan, plan_items

    source = tmp_path / "source.jsonl"
    rows = [{"script": {"scenes": [{"video_prompts": ["", ""], "cut": [True]}]}},  # invalid
            {"uri": str(_write(tmp_path / "kite.json", STORY))},
            {"script": ["A red comet crosses a starry sky"]},  # inline, unnamed
            {"script": ["A lighthouse at night"], "name": "lighthouse"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = StoryPlan.build(str(source), str(tmp_path / "out"), "cfg")
    assert [e.position for e in plan.invalid] == [0]
    manifest = _write(tmp_path / "manifest.jsonl", plan.manifest_bytes().decode())
    listed = list(plan_items(str(manifest), str(tmp_path / "out"), "cfg"))
    assert [(s.position, s.source, s.story_id, s.story_uri) for s in listed] == \
        [(s.position, s.source, s.story_id, s.story_uri) for s in plan.pending]
    assert [s.position for s in listed] == [1, 2, 3]


def test_without_a_config_hash_scripts_are_only_read_no_story_folder_is_checked(
        tmp_path, monkeypatch):
    from pipelines import story_planner

    _write(tmp_path / "kite.json", STORY)
    monkeypatch.setattr(story_planner.storage, "is_committed",
                        lambda uri: pytest.fail(f"a commit marker was read: {uri}"))
    (item,) = story_planner.plan_items(str(tmp_path), str(tmp_path / "out"), None)
    assert (item.story_name, item.story_uri, item.status) == ("Plan Check", None, None)
