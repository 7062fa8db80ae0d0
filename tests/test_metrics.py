"""ST-Bench metric math against values computed by hand on synthetic embeddings."""
from __future__ import annotations

import math

import numpy as np
import pytest

from storymem_model.evaluation import metrics


def _angles(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def _cos(deg):
    return math.cos(math.radians(deg))


def test_three_shots_all_pairs_and_top10_with_fewer_than_10_pairs():
    # pairs: (x, y) = 0, (x, diag) = 1/sqrt2, (y, diag) = 1/sqrt2
    shots = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = (0.0 + 2 / math.sqrt(2)) / 3  # = sqrt(2)/3
    assert metrics.consistency_all_pairs(shots) == pytest.approx(expected, abs=1e-12)
    # only 3 pairs exist, so "top-10" averages all three
    assert metrics.consistency_top_k(shots, 10) == pytest.approx(expected, abs=1e-12)
    assert metrics.consistency_top_k(shots, 1) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert metrics.consistency_top_k(shots, 2) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_top10_picks_the_ten_most_similar_of_fifteen_pairs():
    # 6 shots at 0, 10, ..., 50 degrees: the pair gaps are 10 deg x5, 20 x4, 30 x3, 40 x2, 50 x1
    shots = _angles([0, 10, 20, 30, 40, 50]) * np.array([[1.0], [2.0], [0.5], [3.0], [1.0], [7.0]])
    all_pairs = (5 * _cos(10) + 4 * _cos(20) + 3 * _cos(30) + 2 * _cos(40) + _cos(50)) / 15
    top10 = (5 * _cos(10) + 4 * _cos(20) + 1 * _cos(30)) / 10
    result = metrics.story_consistency(shots)
    assert result["num_shot_pairs"] == 15
    assert result["consistency_all_pairs"] == pytest.approx(all_pairs, abs=1e-12)
    assert result["consistency_top10"] == pytest.approx(top10, abs=1e-12)
    assert result["consistency_top10"] > result["consistency_all_pairs"]


def test_identical_shots_score_one():
    shots = np.tile(np.array([[0.3, -1.2, 2.0, 0.1]]), (4, 1))
    result = metrics.story_consistency(shots)
    assert result["consistency_all_pairs"] == pytest.approx(1.0, abs=1e-12)
    assert result["consistency_top10"] == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(metrics.similarity_matrix(shots), 1.0)


def test_one_shot_story_has_no_pairs_so_consistency_is_nan():
    result = metrics.story_consistency(np.array([[1.0, 2.0, 3.0]]))
    assert result["num_shot_pairs"] == 0
    assert math.isnan(result["consistency_all_pairs"])
    assert math.isnan(result["consistency_top10"])
    # and a benchmark mean skips such stories instead of turning NaN
    assert metrics.benchmark_mean([0.5, result["consistency_all_pairs"], 0.7]) == pytest.approx(0.6)
    assert math.isnan(metrics.benchmark_mean([math.nan]))


def test_prompt_following_is_row_wise_cosine_of_unnormalised_inputs():
    videos = np.array([[3.0, 4.0], [1.0, 0.0]])
    texts = np.array([[4.0, 3.0], [0.0, 5.0]])
    assert metrics.prompt_following(videos, texts) == pytest.approx([24 / 25, 0.0], abs=1e-12)


def test_aesthetic_quality_is_mean_over_frames_on_the_papers_0_1_scale():
    assert metrics.aesthetic_quality([5.0, 6.0, 7.0]) == pytest.approx(0.6)
    assert metrics.aesthetic_quality(np.array([[6.5], [5.5]]), scale=1.0) == pytest.approx(6.0)


def test_similarity_matrix_is_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(0)
    matrix = metrics.similarity_matrix(rng.normal(size=(5, 7)))
    assert matrix.shape == (5, 5)
    assert np.allclose(matrix, matrix.T)
    assert np.allclose(np.diag(matrix), 1.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.consistency_all_pairs(np.zeros(4)), "2-D"),
        (lambda: metrics.consistency_all_pairs(np.array([[1.0, 0.0], [0.0, 0.0]])), "rows [1]"),
        (lambda: metrics.consistency_all_pairs(np.array([[1.0, np.nan]])), "NaN"),
        (lambda: metrics.prompt_following(np.ones((2, 3)), np.ones((3, 3))), "row by row"),
        (lambda: metrics.aesthetic_quality([]), "at least one"),
        (lambda: metrics.consistency_top_k(np.eye(3), 0), "k >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(metrics.MetricInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()
