"""End to end through the command line (tiny preset, real Ray, Prefect test server, moto S3):

* `storymem flow dataset` output -> `storymem train prepare` -> `storymem train fit` ->
  `storymem render --lora-dir {out}/lora`;
* `storymem train flow` (the Prefect flow train_lora: prepare -> fit with `--validate-every`
  -> validate -> publish).
"""
from __future__ import annotations

import io
import json
import os

import pyarrow.parquet as pq
import pytest

import test_train_support as support
from storymem_model import storage

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

TINY = ["--preset", "tiny", "--height", "32", "--width", "32", "--num-frames", "9"]
SCRIPTS = {
    "lighthouse.json": {"story_name": "Lighthouse", "story_overview": "A keeper lights the lamp.",
                        "scenes": [{"scene_num": 1, "video_prompts": [
                            "A lighthouse keeper climbs the spiral stairs at dusk",
                            "She lights the lamp and looks over the stormy sea",
                            "The beam sweeps across the dark water"], "cut": [True, True, False]}]},
    "market.json": {"story_name": "Market", "story_overview": "Two friends at a market.",
                    "scenes": [{"scene_num": 1, "video_prompts": [
                        "Two friends walk through a busy fruit market in the morning",
                        "They laugh at a stall piled with oranges"], "cut": [True, True]}]},
}


def test_dataset_flow_output_trains_a_lora_that_renders(s3_endpoint, ray_cluster, tmp_path):
    import flows_support

    from flows.cli import main

    bucket = flows_support.new_bucket(s3_endpoint, "train-e2e")
    for name, script in SCRIPTS.items():
        storage.write_bytes(f"{bucket}/scripts/{name}", json.dumps(script).encode())
    dataset = f"{bucket}/dataset"
    assert main(["flow", "dataset", "--source", f"{bucket}/scripts/", "--out", dataset, "--retry-backoff", "0.2",
                 "--steps", "2", *TINY]) == 0

    prepared = f"{bucket}/prepared"
    assert main(["train", "prepare", "--clips", dataset, "--out", prepared, *TINY, "--workers", "1",
                 "--cpus-per-worker", "0.5"]) == 0
    from pipelines.dataset_writer import read_dataset
    from storymem_model.training.prepared import read_manifest

    counts = read_manifest(prepared)["counts"]
    assert (counts["clips"], counts["groups"], counts["errors"]) == (4, 2, 1)
    errors = pq.read_table(io.BytesIO(storage.read_bytes(f"{prepared}/errors.parquet"))).to_pylist()
    # the MI2V shot was saved without its given first frame: 8 frames, one short of 9
    assert [(e["caption"], e["reason"].split(":")[0]) for e in errors] == \
        [("The beam sweeps across the dark water", "too short")]
    groups = pq.read_table(io.BytesIO(storage.read_bytes(f"{prepared}/clips.parquet"))).to_pylist()
    stories = read_dataset(dataset).to_pylist()
    assert {g["group_id"] for g in groups} == {r["story_id"] for r in stories}  # the dataset's stories
    for g in groups:  # each clip keeps its shot index as its order
        assert g["order"] == next(r["shot_index"] for r in stories if r["video_uri"] == g["clip_uri"])

    fit = str(tmp_path / "fit")  # the high-noise expert only, DDP over 2 workers
    assert main(["train", "fit", "--data", prepared, "--out", fit, "--preset", "tiny", "--steps", "4",
                 "--expert", "high", "--parallel", "ddp", "--workers", "2", "--cpus-per-worker", "0.5",
                 "--lr", "1e-3", "--warmup-steps", "1", "--checkpoint-every", "2"]) == 0
    card = json.loads(open(f"{fit}/training_card.json").read())
    assert card["steps"] == {"high": 4} and card["parallelism"]["mode"] == "ddp"
    assert sorted(os.listdir(f"{fit}/lora")) == ["backbone_high_noise.safetensors", "backbone_low_noise.safetensors"]
    origins = {v["expert"]: v["origin"] for v in card["lora_files"].values()}
    assert origins == {"high": "trained", "low": "zero"}  # the untrained expert: a LoRA that changes nothing
    from safetensors.torch import load_file

    assert not any(t.any() for t in load_file(f"{fit}/lora/backbone_low_noise.safetensors").values())
    assert any(t.any() for t in load_file(f"{fit}/lora/backbone_high_noise.safetensors").values())

    script = tmp_path / "story.json"
    script.write_text(json.dumps(SCRIPTS["market.json"]))
    renders = str(tmp_path / "renders")
    assert main(["render", str(script), "--out", renders, *TINY, "--steps", "2", "--lora-dir", f"{fit}/lora",
                 "--progress", "none"]) == 0
    from storymem_model.model_identity import lora_identity

    [config_file] = (tmp_path / "renders").glob("*/*/config.json")
    config_dir = config_file.parent
    config = json.loads(config_file.read_text())
    assert config["lora_id"] == lora_identity(f"{fit}/lora/backbone_high_noise.safetensors",
                                              f"{fit}/lora/backbone_low_noise.safetensors", 1.0)
    assert storage.is_committed(str(config_dir))


def test_train_flow_prepares_fits_validates_and_publishes(ray_cluster, tmp_path):
    from flows.cli import main

    clips = support.write_clips(str(tmp_path / "clips"), [
        {"name": f"c{i}.mp4", "caption": f"a red room {i}", "base": 0, "variant": i, "group_id": "room", "order": i}
        for i in range(3)])
    script = tmp_path / "validation.json"
    script.write_text(json.dumps(["a red room", "the red room again"]))
    out = str(tmp_path / "run")
    publish = str(tmp_path / "models" / "my-lora")
    rc = main(["train", "flow", "--clips", clips, "--out", out, "--publish-to", publish, *TINY,
               "--workers", "1", "--cpus-per-worker", "0.5", "--steps", "2", "--lr", "1e-3", "--warmup-steps", "1",
               "--checkpoint-every", "2", "--validate-every", "2", "--validation-script", str(script),
               "--validation-steps", "2", "--grad-accum", "2"])
    assert rc == 0
    metrics = pq.read_table(f"{out}/metrics.parquet").to_pylist()
    assert [(m["expert"], m["step"], m["samples_seen"]) for m in metrics] == \
        [("high", 1, 2), ("high", 2, 4), ("low", 1, 2), ("low", 2, 4)]  # 2 micro-steps of 1 worker
    validation = pq.read_table(f"{out}/validation.parquet").to_pylist()
    assert [(v["expert"], v["step"]) for v in validation] == [("high", 2), ("low", 2)]
    assert all(-1 <= v["consistency_all_pairs"] <= 1 and v["num_shot_pairs"] == 1 for v in validation)
    final = json.loads(open(f"{out}/validation_final.json").read())
    assert final["story_uri"].startswith(f"{out}/validation/final")
    assert storage.verify_commit(publish) == []
    assert sorted(storage.list_files(publish)) == ["_COMMITTED.json", "lora/backbone_high_noise.safetensors",
                                                   "lora/backbone_low_noise.safetensors", "training_card.json",
                                                   "validation_final.json"]
    card = json.loads(open(f"{publish}/training_card.json").read())
    assert card["validation"] == validation and card["data"]["uri"] == f"{out}/prepared"


def test_train_flow_whose_lock_is_taken_over_fits_and_publishes_nothing(ray_cluster, tmp_path,
                                                                         monkeypatch):
    """Another run takes the output's `train` lock over while this flow prepares (as if this
    one stalled past the lease): the flow stops before the fit - no LoRA in the output,
    nothing published - and leaves the new holder's lock alone."""
    import time

    import pipelines.training.prepare as prepare_module
    from flows.cli import main

    out = str(tmp_path / "run")
    lock_uri = f"{out}/_locks/train.json"
    real_prepare = prepare_module.run_prepare

    def prepare_then_lose_the_lock(spec):
        result = real_prepare(spec)
        now = time.time()
        storage.write_bytes(lock_uri, json.dumps({
            "owner": "another train run", "token": "theirs", "acquired_at": now,
            "renewed_at": now, "expires_at": now + 600}).encode())
        return result

    monkeypatch.setattr(prepare_module, "run_prepare", prepare_then_lose_the_lock)
    clips = support.write_clips(str(tmp_path / "clips"), [
        {"name": f"c{i}.mp4", "caption": f"a red room {i}", "base": 0, "variant": i, "group_id": "room", "order": i}
        for i in range(2)])
    publish = str(tmp_path / "models" / "my-lora")
    rc = main(["train", "flow", "--clips", clips, "--out", out, "--publish-to", publish, *TINY,
               "--workers", "1", "--cpus-per-worker", "0.5", "--steps", "1"])
    assert rc != 0
    assert storage.exists(f"{out}/prepared/manifest.json")  # prepared under the lock
    assert not os.path.exists(f"{out}/lora") and not os.path.exists(f"{out}/training_card.json")
    assert not os.path.exists(publish)
    assert json.loads(storage.read_bytes(lock_uri))["token"] == "theirs"
