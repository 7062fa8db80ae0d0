"""The HPSv3 gate as a shared scorer actor running under the HPS environment's interpreter.

Ray starts the actor with runtime_env `py_executable=.hps-venv/bin/python` (transformers
4.45.2, the real hpsv3 package) and the batch's workers call it like any other scorer.
Needs `make hps-env`.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.batch import ScorerPoolOptions
from pipelines.scorer_pools import DEFAULT_HPS_PYTHON, ScorerPoolError, start_scorer_pools
from storymem_model.specs import ScorerSpec

pytestmark = [pytest.mark.hps, pytest.mark.ray]


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    from storymem_model.scorers.hps_scorer import build_tiny_hps

    if not DEFAULT_HPS_PYTHON.exists():
        pytest.fail(f"HPS environment missing at {DEFAULT_HPS_PYTHON}: run `make hps-env`")
    return build_tiny_hps(tmp_path_factory.mktemp("tiny-hps-actor"), seed=0)


def test_hps_gate_actor_runs_in_the_hps_env_and_batches(ray_cluster, tiny_hps):
    ray = ray_cluster
    from storymem_model.model_identity import gate_identity, scorer_identity

    spec = ScorerSpec(preset="tiny", hps_checkpoint=tiny_hps["checkpoint_path"],
                      hps_base_model=tiny_hps["base_model_path"])
    options = ScorerPoolOptions(max_batch_size=6, max_wait_s=1.0, cpus_per_actor=0.25)
    pools = start_scorer_pools(spec, scorer_identity(spec), options, name_prefix="test-hps")
    try:
        info = pools.info["gate"][0]
        assert info.python.startswith(str(DEFAULT_HPS_PYTHON.parent))
        assert info.transformers == "4.45.2"  # the pinned stack, not the main venv's
        # the HPSv3 content id the config hash names, reported by the actor that loaded it
        assert info.name == pools.gate_id == gate_identity(spec)[0]
        assert pools.gate_id.startswith("hpsv3:") and pools.gate_threshold == 3.0
        frames = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
        gate = pools.gate[0]
        together = ray.get([gate.score_images.remote(frames[i:i + 2]) for i in (0, 2, 4)])
        stats = pools.stats()["gate"]["methods"]["score_images"]
        assert stats["max_requests_per_batch"] == 3  # three callers, one scorer call
        alone = pools.keyframe_scorers().gate.score_images(frames[2:4])
        np.testing.assert_allclose(together[1], alone, atol=1e-4)
        assert np.isfinite(np.concatenate(together)).all()
    finally:
        pools.kill()


def test_missing_hps_env_is_a_clear_error(ray_cluster, tmp_path):
    from storymem_model.model_identity import ScorerIdentity

    spec = ScorerSpec(preset="tiny", hps_checkpoint="x.safetensors", hps_base_model="qwen",
                      hps_python=str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(ScorerPoolError, match="make hps-env"):
        start_scorer_pools(spec, ScorerIdentity("clip", "hpsv3", 3.0), ScorerPoolOptions())
