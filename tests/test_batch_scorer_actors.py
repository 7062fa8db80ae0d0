"""Shared scorer actors on the local Ray cluster: batching across callers, exact results."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.batch import ScorerPoolOptions
from pipelines.scorer_pools import start_scorer_pools
from storymem_model.model_identity import scorer_identity
from storymem_model.specs import ScorerSpec

pytestmark = pytest.mark.ray
TINY_IDENTITY = scorer_identity(ScorerSpec(preset="tiny"))  # what a tiny render config names


@pytest.fixture(scope="module")
def pools(ray_cluster):
    options = ScorerPoolOptions(max_batch_size=8, max_wait_s=1.0, cpus_per_actor=0.25)
    pools = start_scorer_pools(ScorerSpec(preset="tiny"), TINY_IDENTITY, options,
                               name_prefix="test-scorers")
    yield pools
    pools.kill()


def _frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_requests_from_several_callers_are_batched_and_results_are_exact(pools, ray_cluster):
    from storymem_model.model_identity import TINY_EMBEDDER_ID, TINY_GATE_ID
    from storymem_model.scorers import TINY_GATE_THRESHOLD

    ray = ray_cluster
    clip = pools.clip[0]
    batches = [_frames(seed, 2) for seed in range(4)]
    # Four callers at once (as four stories would): one call of 8 images serves all.
    results = ray.get([clip.embed_images.remote(frames) for frames in batches])
    stats = pools.stats()["clip"]["methods"]["embed_images"]
    assert stats["max_requests_per_batch"] == 4 and stats["max_items_per_batch"] == 8
    # Each caller gets exactly what it gets when it is alone in its batch.
    alone = [ray.get(clip.embed_images.remote(frames)) for frames in batches]
    for result, single in zip(results, alone):
        assert result.shape[0] == 2
        np.testing.assert_array_equal(result, single)  # the scorer's fixed-shape forwards
        np.testing.assert_allclose(np.linalg.norm(result, axis=1), 1.0, atol=1e-4)
    assert pools.stats()["clip"]["methods"]["embed_images"]["batches"] == stats["batches"] + 4

    gate = pools.keyframe_scorers().gate
    frames = _frames(9, 6)
    together = gate.score_images(frames)
    np.testing.assert_array_equal(together[:3], gate.score_images(frames[:3]))
    assert together.shape == (6,) and together.dtype == np.float32
    assert pools.gate_threshold == pytest.approx(TINY_GATE_THRESHOLD)
    assert (pools.embedder_id, pools.gate_id) == (TINY_EMBEDDER_ID, TINY_GATE_ID)
    assert [i.name for i in pools.info["clip"]] == [TINY_EMBEDDER_ID]  # what the actors load
    assert [i.name for i in pools.info["gate"]] == [TINY_GATE_ID]


def test_requests_of_different_image_sizes_are_never_mixed_in_one_call(pools, ray_cluster):
    """Keyframe selection and consistency send frames of different sizes at the same time
    (smart-resized frames and decoded shots): each size is its own group, each caller still
    gets what it gets alone, and the counters add up per method."""
    ray = ray_cluster
    clip = pools.clip[0]
    before = pools.stats()["clip"]["methods"]["embed_images"]
    small = _frames(11, 2)
    large = np.random.default_rng(12).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    mixed = ray.get([clip.embed_images.remote(f) for f in (small, large, small, large)])
    alone = [ray.get(clip.embed_images.remote(f)) for f in (small, large)]
    for result, single in zip(mixed, alone * 2):
        np.testing.assert_array_equal(result, single)
    after = pools.stats()["clip"]["methods"]["embed_images"]
    assert after["requests"] == before["requests"] + 6
    # the four mixed requests ran as two calls, one per size; the two alone as two more
    assert after["batches"] == before["batches"] + 4


def test_bad_input_is_refused_clearly_and_the_actor_keeps_serving(pools):
    proxy = pools.keyframe_scorers().embedder
    with pytest.raises(Exception, match="uint8"):
        proxy.embed_images(np.zeros((2, 8, 8, 3), dtype=np.float32))
    assert proxy.embed_images(_frames(1, 1)).shape[0] == 1
    assert proxy.embed_texts(["a lighthouse", "a boat"]).shape[0] == 2



def test_embeddings_sent_to_the_wrong_actor_or_in_the_wrong_shape_are_refused(pools,
                                                                              ray_cluster):
    ray = ray_cluster
    with pytest.raises(Exception, match="cannot score embeddings"):
        ray.get(pools.clip[0].score_embeddings.remote(np.ones((2, 64), dtype=np.float32)))
    with pytest.raises(Exception, match=r"must be \(N, D\)"):
        ray.get(pools.gate[0].score_embeddings.remote(np.ones(64, dtype=np.float32)))
    row = np.zeros((1, 64), dtype=np.float32)
    row[0, 0] = 1.0
    assert ray.get(pools.gate[0].score_embeddings.remote(row)).shape == (1,)  # still serving

def test_clients_per_actor_follows_the_sticky_routing():
    from pipelines.scorer_pools import clients_per_actor

    assert clients_per_actor(None, 2) == [None, None]
    assert clients_per_actor(1, 1) == [1]
    assert clients_per_actor(5, 2) == [3, 2]  # workers 0, 2, 4 -> actor 0; 1, 3 -> actor 1
    assert clients_per_actor(1, 3) == [1, 1, 1]  # idle actors still need a valid count


def test_tiny_gate_scores_the_clip_pools_embeddings_like_the_in_process_scorers(pools):
    """The tiny aesthetic head sits on the CLIP the CLIP pool serves: as in process, a
    worker embeds each frame once and the gate actor scores the embeddings; the keyframes
    are the ones the in-process scorers pick."""
    from actors.scorer_proxies import EmbeddingGateProxy
    from storymem_model.keyframe_selection import extract_keyframes
    from storymem_model.scorers import build_scorers

    remote = pools.keyframe_scorers(client_index=0)
    assert isinstance(remote.gate, EmbeddingGateProxy)
    assert remote.gate.embedder is remote.embedder
    local = build_scorers("tiny")
    frames = np.repeat(_frames(3, 6), 3, axis=0)  # runs of near-duplicates, like a shot
    frames[1::3] = np.clip(frames[1::3].astype(int) + 3, 0, 255).astype(np.uint8)
    ours = extract_keyframes(frames, remote)
    theirs = extract_keyframes(frames, local)
    assert ours.indices == theirs.indices and ours.candidates == theirs.candidates
    np.testing.assert_allclose(ours.embeddings, theirs.embeddings, atol=1e-5)
    np.testing.assert_allclose(ours.scores, theirs.scores, atol=1e-4)
    assert remote.gate.score_images(frames[:2]).shape == (2,)  # images still accepted


def test_set_clients_tells_each_actor_how_many_live_workers_call_it(pools, ray_cluster):
    """After workers are gone for good, a live worker's request runs without waiting."""
    import time

    ray = ray_cluster
    clip = pools.clip[0]
    try:
        pools.set_clients([0, 1])  # two workers: a lone request waits for the other
        ray.get(clip.stats.remote())  # calls from one caller run in order: it is applied
        proxy = pools.keyframe_scorers(client_index=0).embedder
        started = time.monotonic()
        proxy.embed_images(_frames(7, 2))
        waited = time.monotonic() - started
        pools.set_clients([0])  # worker 1 is gone: nothing to wait for
        ray.get(clip.stats.remote())  # the set_expected_clients call has been processed
        started = time.monotonic()
        proxy.embed_images(_frames(8, 2))
        alone = time.monotonic() - started
        assert waited >= 0.9  # the fixture's max wait is 1 s
        assert alone < waited
    finally:
        ray.get([h.set_expected_clients.remote(None) for h in pools.actors()])


def test_a_scorer_actor_killed_under_a_request_is_restarted_and_the_request_retried(
        pools, ray_cluster):
    """SIGKILL of the CLIP actor's process while a request waits in its batcher: Ray
    restarts the actor (max_restarts) and re-sends the call (max_task_retries); the caller
    gets the same embeddings as before the crash. Runs last: the pool survives it."""
    import os
    import signal
    import time

    ray = ray_cluster
    clip = pools.clip[0]
    frames = _frames(5, 3)
    before = ray.get(clip.embed_images.remote(frames))
    pid = ray.get(clip.info.remote()).pid
    pending = clip.embed_images.remote(frames)  # waits up to 1 s for batch mates
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    after = ray.get(pending, timeout=120)
    np.testing.assert_array_equal(after, before)
    assert ray.get(clip.info.remote()).pid != pid  # a new incarnation served it



def test_a_scorer_actor_dead_past_its_restarts_is_replaced_and_calls_go_on(ray_cluster):
    """With no Ray restart left, a killed CLIP actor is replaced by the driver's
    supervision under the same name; a worker's call that was waiting on it is sent to
    the replacement and returns the same embeddings. Once the replacements are used up,
    the next death stops the run with one error naming the actor."""
    import os
    import signal
    import threading
    import time

    from pipelines.scorer_pools import ScorerPoolError

    ray = ray_cluster
    options = ScorerPoolOptions(max_batch_size=8, max_wait_s=0.05, cpus_per_actor=0.25,
                                max_restarts=0, max_replacements=1)
    pools = start_scorer_pools(ScorerSpec(preset="tiny"), TINY_IDENTITY, options,
                               name_prefix="test-replace", clients=1)
    try:
        scorers = pools.keyframe_scorers(client_index=0)  # the proxies a worker holds
        frames = _frames(21, 2)
        before = scorers.embedder.embed_images(frames)
        os.kill(ray.get(pools.clip[0].info.remote()).pid, signal.SIGKILL)
        result = {}
        call = threading.Thread(
            target=lambda: result.update(after=scorers.embedder.embed_images(frames)))
        call.start()
        replaced = []
        deadline = time.monotonic() + 180
        while (call.is_alive() or not replaced) and time.monotonic() < deadline:
            replaced += pools.supervise()  # what the driver does every loop
            time.sleep(0.1)
        call.join(timeout=5)
        assert [name for name, _ in replaced] == ["test-replace-clip-0"]
        np.testing.assert_array_equal(result["after"], before)
        assert pools.replacements == 1 and pools.handles().clip_names == ("test-replace-clip-0",)

        os.kill(ray.get(pools.clip[0].info.remote()).pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        with pytest.raises(ScorerPoolError, match="test-replace-clip-0 died past its Ray "
                                                  "restarts") as info:
            while time.monotonic() < deadline:
                pools.supervise()
                time.sleep(0.1)
        assert "1 scorer replacement(s) are used up" in str(info.value)
    finally:
        pools.kill()
