"""STG-MTL clustering of tasks from data-map features; BenTo facility-location task selection."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score

from polytask.errors import ConfigError, DataError
from polytask.relations import (
    cluster_tasks,
    facility_location,
    fuzzy_membership,
    select_representatives,
)


def data_map_features(n_tasks, n_clusters, seed, n_samples=40, n_epochs=6, noise=0.15):
    """Synthetic data maps: tasks of one cluster find the same samples easy or hard. Per task and sample, the
    gold-label confidence over epochs; features = per-sample mean confidence and variability, concatenated."""
    rng = np.random.default_rng(seed)
    label = np.arange(n_tasks) % n_clusters
    rng.shuffle(label)
    hardness = rng.uniform(-2.0, 2.0, size=(n_clusters, n_samples))  # one pattern per cluster
    epochs = np.linspace(0.0, 1.5, n_epochs)
    feats = []
    for c in label:
        h = hardness[c] + noise * 10 * rng.normal(size=n_samples)
        conf = 1 / (1 + np.exp(h[None, :] - 2 * epochs[:, None] + noise * rng.normal(size=(n_epochs, n_samples))))
        feats.append(np.concatenate([conf.mean(0), conf.std(0)]))
    return np.array(feats), label


def test_recovers_120_planted_tasks():
    x, label = data_map_features(120, 6, seed=0)
    tasks = [f"task{i}" for i in range(120)]
    out = cluster_tasks(x, tasks, 6, seed=0)
    assert out.membership.shape == (120, 6)
    np.testing.assert_allclose(out.membership.sum(1), 1.0)
    hard = np.array([out.assignment[t] for t in tasks])
    assert adjusted_rand_score(label, hard) >= 0.9
    assert sorted(t for g in out.groups for t in g) == sorted(tasks)
    g = out.to_grouping()
    assert g.solver == "stg-mtl" and len(g.groups) == 6


def test_deterministic_given_seed_and_hard_mode_is_one_hot():
    x, _ = data_map_features(30, 3, seed=1)
    tasks = [str(i) for i in range(30)]
    a = cluster_tasks(x, tasks, 3, seed=4)
    b = cluster_tasks(x, tasks, 3, seed=4)
    np.testing.assert_array_equal(a.membership, b.membership)
    h = cluster_tasks(x, tasks, 3, seed=4, fuzzy=False)
    assert set(np.unique(h.membership)) == {0.0, 1.0} and (h.membership.sum(1) == 1).all()
    assert h.groups == a.groups  # m = 1.07 memberships peak at the k-means cluster


def test_fuzzy_membership_hand_cases():
    c = np.array([[0.0, 0.0], [2.0, 0.0]])
    u = fuzzy_membership(np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 0.0]]), c, fuzziness=2.0)
    np.testing.assert_allclose(u[0], [0.5, 0.5])  # equidistant
    assert u[1, 0] > 1 - 1e-12  # on a centroid
    # m = 2: u = d^-2 / sum d^-2 with d = 0.5, 1.5 -> 4 / (4 + 4/9) = 0.9
    np.testing.assert_allclose(u[2], [0.9, 0.1])
    sharp = fuzzy_membership(np.array([[0.9, 0.0]]), c)  # default m = 1.07: nearly hard, no overflow
    assert sharp[0, 0] > 0.99 and np.isfinite(sharp).all()
    flat = fuzzy_membership(np.array([[0.5, 0.0]]), c, fuzziness=1e6)
    np.testing.assert_allclose(flat, 0.5, atol=1e-5)
    with pytest.raises(ConfigError, match="> 1"):
        fuzzy_membership(np.zeros((1, 2)), c, fuzziness=1.0)


def test_cluster_errors():
    x = np.zeros((3, 2))
    with pytest.raises(ConfigError, match="n_groups"):
        cluster_tasks(x, ["a", "b", "c"], 4)
    with pytest.raises(DataError, match="3 feature rows for 2 tasks"):
        cluster_tasks(x, ["a", "b"], 1)
    with pytest.raises(DataError, match="NaN"):
        cluster_tasks(np.array([[0.0], [np.nan], [1.0]]), ["a", "b", "c"], 1)


# -- facility location ---------------------------------------------------------------------------------------------
def test_representatives_hand_case_one_per_block():
    # Two blocks of mutually similar tasks; the best 2 representatives take one from each block.
    s = np.full((5, 5), 0.1)
    s[:3, :3] = 0.9
    s[3:, 3:] = 0.8
    np.fill_diagonal(s, 1.0)
    for lazy in (True, False):
        assert select_representatives(s, 2, lazy=lazy) == [0, 3]
    assert select_representatives(s, 0) == []
    assert sorted(select_representatives(s, 5)) == [0, 1, 2, 3, 4]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(0, 10_000), st.booleans())
def test_lazy_greedy_equals_plain_greedy(n, seed, ties):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, size=(n, n)).astype(float) if ties else rng.normal(size=(n, n))
    k = int(rng.integers(0, n + 1))
    assert select_representatives(s, k, lazy=True) == select_representatives(s, k, lazy=False)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10_000))
def test_greedy_is_within_1_minus_1_over_e_of_the_optimum(n, seed):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 1, size=(n, n))
    floor = facility_location(s, [])
    for k in range(1, n + 1):
        got = facility_location(s, select_representatives(s, k)) - floor
        best = max(facility_location(s, list(c)) for c in itertools.combinations(range(n), k)) - floor
        assert got >= (1 - 1 / math.e) * best - 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 9), st.integers(0, 10_000))
def test_facility_location_is_monotone_submodular(n, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, n))
    a = [i for i in range(n) if rng.random() < 0.3]
    b = sorted(set(a) | {i for i in range(n) if rng.random() < 0.3})
    for x in set(range(n)) - set(b):
        gain_a = facility_location(s, [*a, x]) - facility_location(s, a)
        gain_b = facility_location(s, [*b, x]) - facility_location(s, b)
        assert gain_a >= gain_b - 1e-12 >= -1e-12  # diminishing, non-negative gains


def test_representative_errors():
    with pytest.raises(DataError, match="K x K"):
        select_representatives(np.zeros((2, 3)), 1)
    with pytest.raises(ConfigError, match="between 0 and 2"):
        select_representatives(np.zeros((2, 2)), 3)
