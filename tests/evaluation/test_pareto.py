"""Pareto dominance, fronts and hypervolume: hand examples and properties against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.evaluation.pareto import (
    contributions,
    dominates,
    hypervolume,
    non_dominated,
    normalise,
    orient,
    reference_point,
    worse_than,
)


def grid_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Count of unit cells [c, c+1]^d below integer ``ref`` that some integer point weakly dominates."""
    lo = int(min(points.min(), ref.min()))
    axes = [np.arange(lo, int(r)) for r in ref]
    cells = np.array(list(itertools.product(*axes)), dtype=np.float64).reshape(-1, len(ref))
    covered = (points[None, :, :] <= cells[:, None, :]).all(axis=2).any(axis=1)
    return float(covered.sum())


def inclusion_exclusion(points: np.ndarray, ref: np.ndarray) -> float:
    """Σ over non-empty subsets S of (-1)^(|S|+1) · volume of the intersection of their boxes [p, ref]."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(range(len(points)), size):
            corner = points[list(subset)].max(axis=0)
            total += (-1) ** (size + 1) * float(np.prod(np.clip(ref - corner, 0, None)))
    return total


def int_sets(d: int, max_n: int = 7, hi: int = 6):
    return st.lists(st.lists(st.integers(0, hi), min_size=d, max_size=d), min_size=1, max_size=max_n).map(
        lambda rows: np.asarray(rows, dtype=np.float64))


def float_sets(draw, d: int, max_n: int = 6) -> np.ndarray:
    rows = draw(st.lists(st.lists(st.floats(-5, 5, allow_nan=False, allow_infinity=False), min_size=d, max_size=d),
                         min_size=1, max_size=max_n))
    return np.asarray(rows, dtype=np.float64)


@st.composite
def cases(draw, dims=(2, 3, 4)):
    d = draw(st.sampled_from(dims))
    points = float_sets(draw, d)
    ref = np.asarray(draw(st.lists(st.floats(-2, 7, allow_nan=False), min_size=d, max_size=d)), dtype=np.float64)
    return points, ref


# --- hand examples -----------------------------------------------------------------------------------------------

def test_dominates_needs_one_strict_improvement():
    assert dominates([1, 2], [2, 2]) and dominates([1, 1], [2, 2])
    assert not dominates([1, 2], [1, 2])  # equal points: neither dominates
    assert not dominates([1, 3], [2, 2]) and not dominates([2, 2], [1, 3])
    with pytest.raises(ValueError, match="different lengths"):
        dominates([1, 2], [1, 2, 3])


def test_non_dominated_is_stable_and_keeps_equal_points():
    points = [[3, 1], [1, 3], [2, 2], [2, 2], [3, 3], [1, 4]]
    assert non_dominated(points) == [0, 1, 2, 3]
    assert non_dominated([[5.0, 5.0]]) == [0]
    assert non_dominated(np.zeros((0, 2))) == []


def test_hypervolume_hand_values():
    assert hypervolume([[1, 2], [2, 1]], [3, 3]) == 3.0  # two 2x1 boxes overlapping in a 1x1 square
    assert hypervolume([[1, 1]], [3, 4]) == 6.0
    assert hypervolume([[2.0]], [5.0]) == 3.0
    # three boxes sharing y in [2, 4]: the (x, z) union is 3 + 2 + 1 = 6, times 2
    assert hypervolume([[1, 2, 3], [3, 2, 1], [2, 2, 2]], [4, 4, 4]) == 12.0
    assert hypervolume([[0, 0, 0, 0]], [1, 2, 3, 4]) == 24.0
    assert hypervolume(np.zeros((0, 3)), [1, 1, 1]) == 0.0


def test_points_not_strictly_better_than_ref_contribute_nothing():
    assert hypervolume([[3, 1], [4, 0]], [3, 3]) == 0.0  # on and beyond the reference's first objective
    assert hypervolume([[1, 1], [3, 0]], [3, 3]) == 4.0


def test_orient_normalise_and_worse_than():
    values = [[0.9, 2.0], [0.8, 1.0]]  # accuracy (higher better), mse (lower better)
    assert orient(values, [True, False]).tolist() == [[-0.9, 2.0], [-0.8, 1.0]]
    rel = normalise(values, [0.8, 2.0], [True, False])
    # accuracy +12.5% counts -0.125 (better), mse -50% counts -0.5
    np.testing.assert_allclose(rel, [[-0.125, 0.0], [0.0, -0.5]])
    assert worse_than(rel, [0.0, 0.0]).tolist() == [[False, False], [False, False]]
    assert worse_than([[1.0, -1.0]], [0.0, 0.0]).tolist() == [[True, False]]
    with pytest.raises(ValueError, match=r"objective\(s\) \[1\] are 0"):
        normalise(values, [0.8, 0.0], [True, False])
    with pytest.raises(ValueError, match="one direction per objective"):
        orient(values, [True])


def test_reference_point_rules():
    points = np.array([[0.0, 4.0], [2.0, 4.0]])
    np.testing.assert_allclose(reference_point(points), [2.2, 4.4])  # range 0 on y: 10% of |4|
    np.testing.assert_allclose(reference_point([[0.0, 0.0]]), [0.1, 0.1])
    np.testing.assert_allclose(reference_point(points, baseline=[1.0, 5.0]), [1.0, 5.0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[np.nan, 1.0]], [2, 2])


def test_contributions_are_exclusive_volumes():
    c = contributions([[1, 2], [2, 1], [2, 2], [1, 2]], [3, 3])
    # the two copies of (1, 2) each lose nothing alone; (2, 2) is dominated
    np.testing.assert_allclose(c, [0.0, 1.0, 0.0, 0.0])


# --- properties --------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 3]).flatmap(int_sets))
def test_2d_and_3d_equal_a_grid_count(points):
    ref = np.full(points.shape[1], 7.0)
    assert hypervolume(points, ref) == grid_hypervolume(points, ref)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_equals_inclusion_exclusion(case):
    points, ref = case
    assert hypervolume(points, ref) == pytest.approx(inclusion_exclusion(points, ref), rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(cases(), st.lists(st.floats(-5, 5, allow_nan=False), min_size=4, max_size=4))
def test_adding_a_point_never_lowers_it(case, extra):
    points, ref = case
    more = np.vstack([points, np.asarray(extra[: points.shape[1]])])
    assert hypervolume(more, ref) >= hypervolume(points, ref) - 1e-9


@settings(max_examples=60, deadline=None)
@given(cases(), st.data())
def test_a_dominated_point_adds_nothing(case, data):
    points, ref = case
    base = points[data.draw(st.integers(0, len(points) - 1))]
    shift = np.asarray(data.draw(st.lists(st.floats(0, 3), min_size=len(base), max_size=len(base))))
    more = np.vstack([points, base + shift])
    assert hypervolume(more, ref) == pytest.approx(hypervolume(points, ref), rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_permutation_invariant(case, rnd):
    points, ref = case
    order = list(range(len(points)))
    rnd.shuffle(order)
    assert hypervolume(points[order], ref) == pytest.approx(hypervolume(points, ref), rel=1e-12, abs=1e-12)
    assert sorted(np.asarray(order)[non_dominated(points[order])].tolist()) == non_dominated(points)


@settings(max_examples=60, deadline=None)
@given(cases(), st.floats(0.1, 10), st.data())
def test_scaling_one_objective_scales_it(case, factor, data):
    points, ref = case
    k = data.draw(st.integers(0, points.shape[1] - 1))
    scaled_points, scaled_ref = points.copy(), ref.copy()
    scaled_points[:, k] *= factor
    scaled_ref[k] *= factor
    assert hypervolume(scaled_points, scaled_ref) == pytest.approx(factor * hypervolume(points, ref), rel=1e-9,
                                                                   abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_front_members_are_not_dominated_and_others_are(case):
    points, _ = case
    front = set(non_dominated(points))
    for i, p in enumerate(points):
        beaten = any(dominates(q, p) for q in points)
        assert beaten == (i not in front)


def test_wfg_on_a_larger_4d_front_equals_inclusion_exclusion():
    rng = np.random.default_rng(0)
    points = rng.dirichlet(np.ones(4), size=12)  # points on the simplex: all mutually non-dominated
    ref = np.full(4, 1.1)
    assert hypervolume(points, ref) == pytest.approx(inclusion_exclusion(points, ref), rel=1e-9)
