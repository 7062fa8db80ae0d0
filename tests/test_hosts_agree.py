"""One story rendered by the in-process runner, by the Ray batch and by a Serve session gives
byte-identical shot files: every host calls the same shot step with the same spec."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from serve_support import running_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STORY = {"story_name": "Three hosts", "scenes": [
    {"scene_num": 1, "video_prompts": ["A keeper climbs a spiral stair with a lamp.",
                                       "He reaches the lamp room and polishes the lens."],
     "cut": [True, False]},
    {"scene_num": 2, "video_prompts": ["A storm at sea, a green boat between the waves."],
     "cut": [True]}]}
SEED = 5
FLAGS = ["--preset", "tiny", "--seed", str(SEED), "--transition", "mi2v"]
KEY = "hosts-agree-key-0123456789abcdef"


def _parser():
    import argparse

    from flows.cli.model_flags import add_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser


def _shot_files(story_uri: str) -> dict:
    """{shot key: {"video": bytes, "keyframes": {id: png bytes}, "memory": [ids]}}."""
    from storymem_model import storage

    shots = {}
    for rel in storage.list_files(story_uri):
        if rel.startswith("shots/") and rel.endswith(".json"):
            record = json.loads(storage.read_bytes(storage.join(story_uri, rel)))
            shots[(record["scene"], record["shot"])] = {
                "mode": record["mode"], "seed": record["seed"],
                "video": storage.read_bytes(storage.join(story_uri, record["video_key"])),
                "memory": record["memory_keyframe_ids"],
                "keyframes": {k: storage.read_bytes(storage.join(
                    story_uri, f"keyframes/{k}.png")) for k in record["keyframe_ids"]}}
    return shots


def test_runner_batch_and_serve_session_write_the_same_shots(ray_cluster, tmp_path):
    import torch

    from flows.cli.model_flags import render_spec_from_args
    from pipelines.batch import run_batch
    from pipelines.batch.spec import BatchOptions, BatchSpec, ScorerPoolOptions
    from storymem_model.runner import open_runner
    from storymem_model.story_script import load_script

    script_path = tmp_path / "story.json"
    script_path.write_text(json.dumps(STORY))
    spec = render_spec_from_args(_parser().parse_args(FLAGS), accelerator=False)

    # 1. the in-process runner (one torch thread, as the workers and replicas use)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = open_runner(spec).render(load_script(str(script_path)), str(tmp_path / "local"),
                                         progress=False)
    finally:
        torch.set_num_threads(saved)

    # 2. the Ray batch with the same RenderSpec
    summary = run_batch(BatchSpec(
        scripts=str(script_path), out=str(tmp_path / "batch"), render=spec, run_id="agree",
        options=BatchOptions(workers=1, cpus_per_worker=0.5,
                             scorers=ScorerPoolOptions(cpus_per_actor=0.25))))
    assert summary.rendered == 1 and summary.failed == 0
    batch_uri = str(tmp_path / "batch" / local.story_id / spec.config_hash)

    # 3. a Serve session with the same model flags, seed and transition
    with running_server([*FLAGS, "--storage", str(tmp_path / "serve"), "--cpus-per-replica",
                         "0.25", "--scorer-cpus", "0.05", "--torch-threads", "1"], KEY) as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        created = requests.post(url + "/v1/sessions", json={"seed": SEED, "transition": "mi2v"},
                                headers=headers, timeout=300)
        assert created.status_code == 201, created.text
        session = created.json()
        assert session["config_hash"] == spec.config_hash  # the same config, hence the same hash
        for scene_index, scene in enumerate(STORY["scenes"]):
            for shot_index, (prompt, cut) in enumerate(zip(scene["video_prompts"], scene["cut"])):
                body = {"prompt": prompt, "cut": cut, "return_video": "uri",
                        "new_scene": scene_index > 0 and shot_index == 0}
                response = requests.post(f"{url}/v1/sessions/{session['session_id']}/shots",
                                         json=body, headers=headers, timeout=600)
                assert response.status_code == 200, response.text
    session_uri = next(Path(tmp_path / "serve").glob(
        f"sessions/*/{session['session_id']}/story/*/{spec.config_hash}"))

    hosts = {"runner": _shot_files(local.story_uri), "batch": _shot_files(batch_uri),
             "serve session": _shot_files(str(session_uri))}
    reference = hosts["runner"]
    assert sorted(reference) == [(1, 1), (1, 2), (2, 1)]
    assert [reference[k]["mode"] for k in sorted(reference)] == ["t2v", "mi2v", "m2v"]
    assert sum(len(s["keyframes"]) for s in reference.values()) > 0  # memory was exercised
    for name, shots in hosts.items():
        assert sorted(shots) == sorted(reference), name
        for key, shot in reference.items():
            other = shots[key]
            assert other["video"] == shot["video"], f"{name}: shot {key} video differs"
            assert other["keyframes"] == shot["keyframes"], f"{name}: shot {key} keyframes differ"
            assert (other["memory"], other["mode"], other["seed"]) == (
                shot["memory"], shot["mode"], shot["seed"]), name
