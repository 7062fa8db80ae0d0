"""End to end: tiny renders of 2 stories (StoryMem and the independent baseline, i.e.
memory off) through `storymem bench-stbench`, then `storymem eval`; the table, report and
charts agree with each other and with metrics recomputed from the videos."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from storymem_model import storage
from storymem_model.evaluation import charts, metrics
from storymem_model.evaluation.video_encoders import tiny_viclip_encoder
from storymem_model.video_io import decode_mp4

torch.set_num_threads(1)

KITE = {"story_name": "Kite Day", "story_overview": "A girl flies a red kite on a windy hill.",
        "scenes": [{"scene_num": 1, "cut": [True, False], "video_prompts": [
            "A girl runs up a grassy hill holding a red kite.",
            "The red kite climbs into a blue sky above her."]}]}
BAKER = {"story_name": "Night Baker", "scenes": [{"scene_num": 1, "cut": [True], "video_prompts": [
    "A baker kneads dough under a warm lamp at night."]}]}
SMALL = ["--preset", "tiny", "--steps", "1", "--num-frames", "9", "--height", "32", "--width", "32"]


def run_cli(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "kite.json").write_text(json.dumps(KITE))
    (scripts / "baker.json").write_text(json.dumps(BAKER))
    broken = {"story_name": "Broken", "scenes": [{"video_prompts": ["x"], "cut": [False]}]}
    (scripts / "broken.json").write_text(json.dumps(broken))  # first shot must be a cut
    out = root / "out"
    code, printed = run_cli(["bench-stbench", "--scripts", str(scripts), "--out", str(out),
                             "--baseline", "independent", *SMALL])
    table = pq.read_table(out / "_eval" / "eval.parquet").to_pylist()
    return {"code": code, "printed": printed, "out": out, "scripts": scripts, "rows": table}


def _level(rows, level):
    return [r for r in rows if r["level"] == level]


def _printed_table(printed: str) -> dict[str, list[str]]:
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    header = lines[start].split()
    table = {}
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(("report", "parquet")):
            break
        cells = line.split()
        table[cells[0]] = dict(zip(header, cells))
    return table


def test_bench_renders_both_methods_and_prints_the_table_the_files_hold(bench):
    # the broken script is reported (exit status 1) and costs the others nothing
    assert bench["code"] == 1, bench["printed"]
    skipped = [line for line in bench["printed"].splitlines() if line.startswith("SCRIPT SKIPPED")]
    assert len(skipped) == 1 and "broken.json" in skipped[0] and "cut" in skipped[0]
    rows = bench["rows"]
    assert len(_level(rows, "shot")) == 2 * (2 + 1)
    assert len(_level(rows, "story")) == 2 * 2
    summary = {r["method"]: r for r in _level(rows, "benchmark")}
    assert set(summary) == {"storymem", "independent"}
    printed = _printed_table(bench["printed"])
    report = (bench["out"] / "_eval" / "report.md").read_text()
    saved = json.loads((bench["out"] / "_eval" / "summary.json").read_text())["table1"]
    chart = charts.read_png_numbers((bench["out"] / "_eval" / "metrics.png").read_bytes())
    for method, row in summary.items():
        assert row["num_stories"] == 2
        cells = [metrics.format_number(row[c]) for c in metrics.TABLE1_COLUMNS]
        assert [printed[method][c] for c in metrics.TABLE1_COLUMNS] == cells
        assert f"| {method} | " + " | ".join(cells) + " | 2 |" in report
        saved_row = next(s for s in saved if s["method"] == method)
        for column in metrics.TABLE1_COLUMNS:
            assert saved_row[column] == pytest.approx(row[column])
            assert chart[method][column] == pytest.approx(row[column])
    assert "| StoryMem (paper) | 0.6133 | 0.2289 | 0.2313 | 0.5065 | 0.5337 |" in report


def test_baseline_renders_every_shot_without_memory(bench):
    configs = {}
    for path in bench["out"].glob("*/*/config.json"):
        config = json.loads(path.read_text())
        configs[(config["model_id"], config["memory"])] = (config, path.parent)
    # the same model, memory on (StoryMem) and off (the baseline; no "+independent" wrapper)
    assert set(configs) == {("tiny", True), ("tiny", False)}
    config, folder = configs[("tiny", False)]
    assert config["transition"] == "none"
    kite = next(f for f in bench["out"].glob("kite-day-*/*") if f.name == folder.name)
    shots = pq.read_table(kite / "shots.parquet").to_pylist()
    assert [s["num_frames"] for s in shots] == [9, 9]  # no MI2V frame dropped: no continuation
    # the table says what was done: T2V shots, no memory used, no keyframes selected
    assert [s["mode"] for s in shots] == ["t2v", "t2v"]
    assert all(s["memory_keyframe_ids"] == [] and s["keyframe_ids"] == [] for s in shots)
    assert not (kite / "keyframes").exists() and not (kite / "memory").exists()
    assert storage.verify_commit(str(kite)) == []
    storymem = next(f for f in bench["out"].glob("kite-day-*/*") if f.name != folder.name)
    assert [s["mode"] for s in pq.read_table(storymem / "shots.parquet").to_pylist()] == ["t2v", "mi2v"]


def test_story_rows_match_metrics_recomputed_from_the_videos(bench):
    encoder = tiny_viclip_encoder()
    stories = [r for r in _level(bench["rows"], "story") if r["story_name"] == "Kite Day"]
    assert len(stories) == 2
    for row in stories:
        folder = row["story_uri"]
        shots = sorted(pq.read_table(os.path.join(folder, "shots.parquet")).to_pylist(),
                       key=lambda s: s["shot_index"])
        videos = [decode_mp4(storage.read_bytes(os.path.join(folder, s["video_key"])))
                  for s in shots]
        embeddings = encoder.embed_videos(videos)
        expected = metrics.story_consistency(embeddings)
        assert row["consistency_all_pairs"] == pytest.approx(expected["consistency_all_pairs"], abs=1e-5)
        assert row["consistency_top10"] == pytest.approx(expected["consistency_top10"], abs=1e-5)
        single = metrics.prompt_following(embeddings, encoder.embed_texts([s["prompt"] for s in shots]))
        assert row["prompt_following_single_shot"] == pytest.approx(single.mean(), abs=1e-5)
        story_video = np.concatenate(videos)  # the whole story against its overview
        overall = metrics.prompt_following(encoder.embed_videos([story_video]),
                                           encoder.embed_texts([KITE["story_overview"]]))[0]
        assert row["global_text_source"] == "overview"
        assert row["prompt_following_global"] == pytest.approx(overall, abs=1e-5)
        assert np.allclose(np.reshape(row["consistency_matrix"], (2, 2)),
                           metrics.similarity_matrix(embeddings), atol=1e-5)


def test_one_shot_story_has_undefined_consistency_everywhere(bench):
    rows = [r for r in _level(bench["rows"], "story") if r["story_name"] == "Night Baker"]
    assert rows and all(math.isnan(r["consistency_all_pairs"]) for r in rows)
    assert all(r["global_text_source"] == "prompts" and r["num_shot_pairs"] == 0 for r in rows)
    kite = {r["method"]: r for r in _level(bench["rows"], "story") if r["story_name"] == "Kite Day"}
    summary = {r["method"]: r for r in _level(bench["rows"], "benchmark")}
    for method in ("storymem", "independent"):  # the benchmark mean skips the one-shot story
        assert summary[method]["consistency_all_pairs"] == pytest.approx(
            kite[method]["consistency_all_pairs"])
    report = (bench["out"] / "_eval" / "report.md").read_text()
    assert "| Night Baker | storymem | 1 |" in report and "| - | - |" in report


def test_charts_exist_and_hold_the_table_numbers(bench):
    report_dir = bench["out"] / "_eval"
    stories = _level(bench["rows"], "story")
    per_story = charts.read_png_numbers((report_dir / "stories.png").read_bytes())
    for row in stories:
        heatmap = report_dir / charts.heatmap_key(row["story_id"], row["method"])
        numbers = charts.read_png_numbers(heatmap.read_bytes())
        assert np.allclose(np.reshape(numbers["matrix"], -1), row["consistency_matrix"], atol=1e-6)
        assert len(numbers["labels"]) == row["num_shots"]
        assert f"({charts.heatmap_key(row['story_id'], row['method'])})" in \
            (report_dir / "report.md").read_text()
        value = per_story[row["method"]][row["story_id"]]
        if math.isnan(row["consistency_all_pairs"]):
            assert value is None
        else:
            assert value == pytest.approx(row["consistency_all_pairs"])


def test_eval_command_with_scripts_and_clip_encoder(bench, tmp_path):
    scripts = tmp_path / "only-kite"
    scripts.mkdir()
    shutil.copy(bench["scripts"] / "kite.json", scripts / "kite.json")
    code, printed = run_cli(["eval", str(bench["out"]), "--scripts", str(scripts), "--preset",
                             "tiny", "--video-encoder", "clip", "--aesthetic-frames", "3",
                             "--report-dir", str(tmp_path / "report")])
    assert code == 0, printed
    rows = pq.read_table(tmp_path / "report" / "eval.parquet").to_pylist()
    assert {r["story_name"] for r in _level(rows, "story")} == {"Kite Day"}
    assert {r["video_encoder"] for r in _level(rows, "story")} == {
        "clip-frame-average:open_clip:storymem-tiny-clip:random-seed0"}
    printed_table = _printed_table(printed)
    for row in _level(rows, "benchmark"):
        assert printed_table[row["method"]]["consistency_top10"] == \
            metrics.format_number(row["consistency_top10"])


def test_bad_renders_are_reported_and_the_rest_is_still_evaluated(bench, tmp_path, s3_bucket):
    out = tmp_path / "out"
    shutil.copytree(bench["out"], out, ignore=shutil.ignore_patterns("_eval"))
    kite_dirs = sorted(out.glob("kite-day-*/*"))
    baker_dirs = sorted(out.glob("night-baker-*/*"))
    (kite_dirs[0] / "shots" / "01_02.mp4").write_bytes(b"not a video")
    (baker_dirs[0] / "_COMMITTED.json").unlink()  # an unfinished render
    # the same output on S3 (moto): the evaluation reads and writes through fsspec
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(out), f"{s3_bucket[5:]}/out", recursive=True)
    code, printed = run_cli(["eval", f"{s3_bucket}/out", "--preset", "tiny"])
    assert code == 1
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3_bucket}/out/_eval/eval.parquet"))).to_pylist()
    stories = _level(rows, "story")
    errors = [r for r in stories if r["error"]]
    assert len(stories) == 4 and len(errors) == 2
    assert any("01_02.mp4" in r["error"] or "decode" in r["error"] for r in errors)
    assert any("not committed" in r["error"] for r in errors)
    assert all(r["aesthetic_quality"] is not None for r in stories if not r["error"])
    assert "NOT EVALUATED" in printed
    report = storage.read_bytes(f"{s3_bucket}/out/_eval/report.md").decode()
    assert "## Not evaluated" in report


def test_clear_errors_for_missing_output_and_missing_encoders(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), "--preset", "tiny"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no aesthetic predictor" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--preset", "tiny", "--viclip",
                 str(tmp_path / "missing.pth")]) == 2
    assert "ViCLIP checkpoint not found" in capsys.readouterr().err


def test_story_consistency_for_a_batch_table_row(bench):
    from storymem_model.evaluation.story_eval import story_consistency_for_render

    row = next(r for r in _level(bench["rows"], "story")
               if r["story_name"] == "Kite Day" and r["method"] == "storymem")
    result = story_consistency_for_render(row["story_uri"], tiny_viclip_encoder())
    assert result["num_shot_pairs"] == 1
    assert result["consistency_all_pairs"] == pytest.approx(row["consistency_all_pairs"], abs=1e-5)


def test_two_configs_of_one_method_get_their_hash_in_the_label(bench, tmp_path):
    from storymem_model.evaluation.renders import find_rendered_stories

    out = tmp_path / "out"
    kite = next(bench["out"].glob("kite-day-*"))
    storymem = next(d for d in kite.iterdir()
                    if json.loads((d / "config.json").read_text())["memory"])
    shutil.copytree(storymem, out / kite.name / storymem.name)
    shutil.copytree(storymem, out / kite.name / "0123456789ab")
    found, problems = find_rendered_stories(str(out))
    assert not problems
    assert sorted(s.method for s in found) == ["storymem-0123456789ab", f"storymem-{storymem.name}"]


def test_method_label_reads_the_memory_flag_and_old_baseline_renders():
    from storymem_model.evaluation.renders import method_label

    assert method_label({"model_id": "tiny", "memory": True}) == "storymem"
    assert method_label({"model_id": "tiny"}) == "storymem"  # configs before the flag
    assert method_label({"model_id": "tiny", "memory": False}) == "independent"
    assert method_label({"model_id": "tiny+independent"}) == "independent"  # old baseline


def test_bench_with_fast_sampling_puts_both_paths_side_by_side(tmp_path):
    """`--sampling fast` renders the same scripts and seeds on the fast and the standard
    path and evaluates both in one report."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "baker.json").write_text(json.dumps(BAKER))
    (scripts / "kite.json").write_text(json.dumps(KITE))
    out = tmp_path / "out"
    small = [a for a in SMALL if a not in ("--steps", "1")]  # the preset names its steps
    code, printed = run_cli(["bench-stbench", "--scripts", str(scripts), "--out", str(out),
                             "--sampling", "fast", *small])
    assert code == 0, printed
    rows = pq.read_table(out / "_eval" / "eval.parquet").to_pylist()
    summary = {r["method"]: r for r in _level(rows, "benchmark")}
    assert set(summary) == {"storymem", "storymem-fast"}
    assert all(row["num_stories"] == 2 for row in summary.values())
    printed_table = _printed_table(printed)
    assert set(printed_table) >= {"storymem", "storymem-fast"}
    configs = [json.loads(p.read_text()) for p in out.glob("*/*/config.json")]
    presets = sorted((c["sampling_preset"], c["sampling"]["guidance_scale"],
                      c["sampling"].get("step_list"), c["seed"]) for c in configs)
    # one render of each story per path, the same seeds; fast: no guidance, its step list
    assert presets == [("fast", 1.0, [1000, 750, 500, 250], 0)] * 2 + [
        ("standard", 3.5, None, 0)] * 2
    report = (out / "_eval" / "report.md").read_text()
    assert "| storymem-fast | " in report and "| storymem | " in report
