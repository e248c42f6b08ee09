"""Task grouping: TAG / HOA scores, exact branch and bound against brute force, beam against exact."""

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.errors import ConfigError, DataError
from polytask.relations import (
    GROUPING_SOLVERS,
    TAG_SINGLETON_SCORE,
    AffinityMatrix,
    Candidate,
    Candidates,
    FunctionScore,
    Grouping,
    HoaScore,
    TagScore,
    evaluate_groups,
    select_beam,
    select_exact,
)
from polytask.relations.grouping import _Search, dominated, from_mask, members


def names(k):
    return [f"t{i}" for i in range(k)]


def tag(z, singleton=0.0, tasks=None):
    z = np.asarray(z, dtype=float)
    return TagScore(AffinityMatrix(z, tasks or names(len(z)), "test"), singleton)


def brute_force(score, k, budget, max_group_size=None):
    """Reference: try every set of <= budget candidate groups (tests only; K <= 6, b <= 3)."""
    m = max_group_size or k
    groups = [g for r in range(1, m + 1) for g in itertools.combinations(range(k), r)]
    rows = np.full((len(groups), k), -np.inf)
    for r, g in enumerate(groups):
        for j in g:
            rows[r, j] = score(j, g)
    best, arg = -np.inf, None
    for n in range(1, budget + 1):
        combos = np.array(list(itertools.combinations(range(len(groups)), n)), dtype=np.int64)
        if not len(combos):
            continue
        vals = rows[combos].max(1)
        ok = np.isfinite(vals).all(1)
        if ok.any():
            tot = np.where(ok, np.where(ok[:, None], vals, 0.0).sum(1), -np.inf)
            i = int(np.argmax(tot))
            if tot[i] > best:
                best, arg = float(tot[i]), [groups[c] for c in combos[i]]
    return best, arg


# -- scores ------------------------------------------------------------------------------------------------------
Z3 = np.array([[9.0, 1.0, 4.0], [2.0, 9.0, 6.0], [3.0, 5.0, 9.0]])  # [i, j] = effect of i on j


def test_tag_score_is_mean_affinity_onto_the_task():
    s = tag(Z3, singleton=-7.0)
    assert s(0, (0, 1, 2)) == pytest.approx((2.0 + 3.0) / 2)  # Z[1,0], Z[2,0]: onto task 0
    assert s(2, (0, 2)) == pytest.approx(4.0)  # Z[0,2]
    assert s(1, (1,)) == -7.0  # singleton
    assert TagScore(AffinityMatrix(Z3, names(3), "x"))(1, (1,)) == TAG_SINGLETON_SCORE == -1e6


def test_tag_score_negates_loss_like_matrices():
    s = TagScore(AffinityMatrix(Z3, names(3), "x", higher_is_better=False), 0.0)
    assert s(0, (0, 1)) == -2.0


def test_hoa_is_mean_pairwise_loss_and_single_task_alone():
    # pairs[i, j] = L_j({i, j}); diagonal = single-task loss L_j({j}); lower is better.
    pairs = np.array([[1.0, 0.5, 0.9], [0.7, 2.0, 0.4], [0.8, 0.6, 3.0]])
    s = HoaScore(AffinityMatrix(pairs, names(3), "pairwise", higher_is_better=False))
    assert s(0, (0,)) == -1.0
    assert s(0, (0, 1, 2)) == pytest.approx(-(0.7 + 0.8) / 2)
    assert s(2, (1, 2)) == pytest.approx(-0.4)
    measured = {frozenset(names(3)): {"t0": 0.1}}
    s2 = HoaScore(AffinityMatrix(pairs, names(3), "pairwise", higher_is_better=False), measured)
    assert s2(0, (0, 1, 2)) == pytest.approx(-0.1)  # a trained network overrides the approximation
    assert s2(1, (0, 1, 2)) == pytest.approx(-(0.5 + 0.6) / 2)
    t = s2.table(np.array([0b111, 0b001, 0b110]))
    np.testing.assert_allclose(t[0], [-0.1, -0.55, -(0.9 + 0.4) / 2])
    assert t[1, 0] == -1.0 and np.isneginf(t[1, 1:]).all() and np.isneginf(t[2, 0])


def test_hoa_needs_single_task_values():
    pairs = np.array([[np.nan, 0.5], [0.7, 2.0]])
    with pytest.raises(DataError, match="single-task"):
        HoaScore(AffinityMatrix(pairs, names(2), "pairwise", higher_is_better=False))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 7), st.integers(0, 10_000))
def test_tables_agree_with_calls(k, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(k, k))
    masks = np.arange(1, 1 << k)
    scores = [tag(z, singleton=float(rng.normal())),
              HoaScore(AffinityMatrix(np.abs(z), names(k), "p", higher_is_better=False))]
    for s in scores:
        t = s.table(masks)
        for r, mask in enumerate(masks):
            g = from_mask(int(mask))
            for j in range(k):
                want = s(j, g) if j in g else -np.inf
                assert t[r, j] == pytest.approx(want)


# -- hand-checkable groupings -----------------------------------------------------------------------------------
TWO_PAIRS = np.array(
    [[0.0, 1.0, -0.5, -0.5],
     [1.0, 0.0, -0.5, -0.5],
     [-0.5, -0.5, 0.0, 1.0],
     [-0.5, -0.5, 1.0, 0.0]]
)
ABCD = ["A", "B", "C", "D"]


@pytest.mark.parametrize("solver", [select_exact, select_beam])
def test_two_strong_pairs_budget_two(solver):
    g = solver(tag(TWO_PAIRS, tasks=ABCD), ABCD, 2)
    assert g.groups == [["A", "B"], ["C", "D"]]
    assert g.assignment == {"A": 0, "B": 0, "C": 1, "D": 1}
    assert g.total == pytest.approx(4.0)
    assert g.per_task == {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0}


def test_budget_one_is_the_group_of_everyone():
    g = select_exact(tag(TWO_PAIRS, tasks=ABCD), ABCD, 1)
    assert g.groups == [ABCD]
    assert g.per_task["A"] == pytest.approx((1.0 - 0.5 - 0.5) / 3)
    assert g.total == pytest.approx(0.0)


def test_all_negative_with_enough_budget_gives_singletons():
    z = -np.ones((4, 4))
    g = select_exact(tag(z, singleton=0.0, tasks=ABCD), ABCD, 4)
    assert g.groups == [["A"], ["B"], ["C"], ["D"]]
    assert g.total == 0.0
    # TAG's own singleton score (-1e6) never leaves a task alone when it can share: pairs instead.
    g2 = select_exact(tag(z, singleton=TAG_SINGLETON_SCORE, tasks=ABCD), ABCD, 4)
    assert all(len(x) >= 2 for x in g2.groups) and g2.total == pytest.approx(-4.0)


def test_planted_three_groups_of_eight_tasks_are_recovered():
    rng = np.random.default_rng(0)
    label = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    z = np.where(label[:, None] == label[None, :], 1.0, -1.0) + 0.1 * rng.normal(size=(8, 8))
    for solver in (select_exact, select_beam):
        g = solver(tag(z), names(8), 3)
        assert sorted(g.groups) == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6", "t7"]]


def test_overlap_is_allowed_and_each_task_takes_its_best_group():
    # t0 likes t1 and t2 separately, t1 and t2 hate each other; budget 2 lets t0 sit in both groups.
    z = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, -5.0], [1.0, -5.0, 0.0]])
    g = select_exact(tag(z), names(3), 2)
    assert g.groups == [["t0", "t1"], ["t0", "t2"]]
    assert g.per_task == {"t0": 1.0, "t1": 1.0, "t2": 1.0}


def test_max_group_size_is_respected():
    z = np.ones((6, 6))
    g = select_exact(tag(z), names(6), 3, max_group_size=2)
    assert all(len(x) <= 2 for x in g.groups) and g.total == pytest.approx(6.0)


def test_evaluate_groups_and_json_round_trip():
    g = evaluate_groups(tag(TWO_PAIRS, tasks=ABCD), ABCD, [["C", "D"], ["A", "B", "C"]])
    assert g.groups == [["A", "B", "C"], ["C", "D"]]
    assert g.per_task["C"] == 1.0 and g.assignment["C"] == 1
    assert g.per_task["A"] == pytest.approx(0.25)
    back = Grouping.from_json(json.loads(json.dumps(g.to_json(), allow_nan=False)))
    assert back == g


# -- exact vs brute force ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**32 - 1), st.sampled_from(["tag", "hoa", "fn"]))
def test_exact_equals_brute_force(k, budget, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "tag":
        score = tag(rng.normal(size=(k, k)), singleton=float(rng.choice([0.0, -1e6, rng.normal()])))
    elif kind == "hoa":
        score = HoaScore(AffinityMatrix(rng.uniform(0.1, 2.0, size=(k, k)), names(k), "p", higher_is_better=False))
    else:  # an arbitrary score that depends on the whole group, not only on pairs
        w = rng.normal(size=(k, 1 << k))
        score = FunctionScore(lambda j, g: float(w[j, sum(1 << i for i in g)]), names(k))
    m = None if rng.random() < 0.6 else int(rng.integers(max(1, -(-k // budget)), k + 1))
    want, _ = brute_force(score, k, budget, m)
    # the subset-convolution tail alone (K <= 10), branching alone (dp_tail=0), both, and a beam warm start
    for kw in ({}, {"dp_tail": 0}, {"dp_tail": 2}, {"dp_tail": 0, "warm_start": True}):
        got = select_exact(score, names(k), budget, max_group_size=m, **kw)
        assert got.total == pytest.approx(want, rel=1e-9, abs=1e-9), kw
    g = got
    assert len(g.groups) <= budget and all(len(x) <= (m or k) for x in g.groups)
    assert {t for x in g.groups for t in x} == set(names(k))
    for t, v in g.per_task.items():  # each task's reported score is its best chosen group
        j = int(t[1:])
        best = max(score(j, tuple(int(x[1:]) for x in grp)) for grp in g.groups if t in grp)
        assert v == pytest.approx(best)


@pytest.mark.parametrize("budget", [2, 3])
@pytest.mark.parametrize("dp_tail", [0, 3, 10])
def test_search_equals_brute_force_at_k6(budget, dp_tail):
    rng = np.random.default_rng(budget)
    for _ in range(30 if dp_tail == 0 else 10):
        s = tag(rng.normal(size=(6, 6)), singleton=float(rng.choice([0.0, -0.5])))
        want, _ = brute_force(s, 6, budget)
        assert select_exact(s, names(6), budget, dp_tail=dp_tail).total == pytest.approx(want, abs=1e-9)


def completions(parts, rest, budget):
    """Every way to put the tasks in ``rest`` into the parts (bit masks) or into new parts, <= budget in all."""
    if not rest:
        yield list(parts)
        return
    bit = 1 << rest[0]
    for s in range(len(parts)):
        yield from completions([*parts[:s], parts[s] | bit, *parts[s + 1 :]], rest[1:], budget)
    if len(parts) < budget:
        yield from completions([*parts, bit], rest[1:], budget)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(0, 6))
def test_node_bound_is_valid_and_tail_is_exact(seed, budget, placed):
    k = 6
    rng = np.random.default_rng(seed)
    s = tag(rng.normal(size=(k, k)), singleton=float(rng.normal()))
    masks = np.arange(1, 1 << k)
    table = np.full((1 << k, k), -np.inf)
    table[masks] = s.table(masks)
    order = [int(i) for i in rng.permutation(k)]
    search = _Search(table, masks, k, budget, order, tail=0)
    parts: list[int] = []
    for i in order[:placed]:  # a random restricted-growth assignment of the first tasks
        j = int(rng.integers(0, min(len(parts) + 1, budget)))
        parts = [*parts, 1 << i] if j == len(parts) else [*parts[:j], parts[j] | (1 << i), *parts[j + 1 :]]
    best = max((sum(search.w[p] for p in c) for c in completions(parts, order[placed:], budget)), default=-np.inf)
    value = sum(search.w[p] for p in parts)
    assert search.bound(parts, value, placed) >= best - 1e-9
    exact = _Search(table, masks, k, budget, order, tail=k - placed)._tail(parts, placed, rebuild=True)
    assert exact[0] == pytest.approx(best, abs=1e-9) if np.isfinite(best) else exact[0] == -np.inf
    if np.isfinite(best):  # the rebuilt parts extend the given ones and reach the value
        assert sum(search.w[p] for p in exact[1]) == pytest.approx(best, abs=1e-9)
        assert all(any(p & q == p for q in exact[1]) for p in parts) and len(exact[1]) <= budget


def test_search_agrees_across_tails_at_k12():
    rng = np.random.default_rng(5)
    for budget in (2, 4):
        s = tag(rng.normal(size=(12, 12)))
        totals = {t: select_exact(s, names(12), budget, dp_tail=t).total for t in (0, 4, 12)}
        assert max(totals.values()) - min(totals.values()) < 1e-9, totals


def test_dominated_groups_are_dropped_only_for_a_superset_at_least_as_good():
    s = tag(TWO_PAIRS, tasks=ABCD)
    masks = np.arange(1, 16)
    table = np.full((16, 4), -np.inf)
    table[masks] = s.table(masks)
    dom = dominated(table, masks, 4)
    dropped = {tuple(from_mask(int(m))) for m in masks[dom]}
    assert (0,) in dropped and (0, 1) not in dropped  # {A} < {A, B}; {A, B} beats {A, B, C} for A and B
    for m in masks[dom]:
        mem = members(np.array([m]), 4)[0]
        assert any(
            (table[m | (1 << t)][mem] >= table[m][mem]).all() for t in range(4) if not mem[t]
        )


# -- beam vs exact ---------------------------------------------------------------------------------------------------
def test_beam_is_close_to_exact_on_random_k8():
    rng = np.random.default_rng(123)
    ratios = []
    for _ in range(20):
        z = rng.normal(0.3, 1.0, size=(8, 8))
        s = tag(z)
        b = int(rng.integers(2, 5))
        ex = select_exact(s, names(8), b)
        bm = select_beam(s, names(8), b)
        assert bm.total <= ex.total + 1e-9
        ratios.append(bm.total / ex.total)
    ratios = np.array(ratios)
    assert ratios.mean() >= 0.98 and ratios.min() >= 0.9, ratios


def test_beam_handles_thirty_tasks():
    rng = np.random.default_rng(7)
    label = rng.integers(0, 5, size=30)
    z = np.where(label[:, None] == label[None, :], 1.0, -1.0) + 0.2 * rng.normal(size=(30, 30))
    g = select_beam(tag(z), names(30), 5)
    assert len(g.groups) <= 5 and {t for x in g.groups for t in x} == set(names(30))
    planted = {frozenset(f"t{i}" for i in np.flatnonzero(label == c)) for c in np.unique(label)}
    assert {frozenset(x) for x in g.groups} == planted


# -- errors and registry ---------------------------------------------------------------------------------------------
def test_errors_are_actionable():
    s = tag(np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="budget"):
        select_exact(s, names(4), 0)
    with pytest.raises(ConfigError, match="cannot cover"):
        select_exact(s, names(4), 1, max_group_size=3)
    with pytest.raises(DataError, match="score is over tasks"):
        select_exact(s, ["a", "b", "c", "d"], 2)
    with pytest.raises(ConfigError, match="at most 16"):
        select_exact(tag(np.zeros((17, 17))), names(17), 2)
    with pytest.raises(DataError, match="must be a number"):
        select_exact(FunctionScore(lambda j, g: float("nan"), names(2)), names(2), 1)


def test_registry_builds_solvers_by_name():
    s = tag(TWO_PAIRS, tasks=ABCD)
    g = GROUPING_SOLVERS.build("exact", {"max_group_size": 2}, s, ABCD, 2)
    assert g.groups == [["A", "B"], ["C", "D"]] and g.solver == "exact" and g.meta["optimal"]
    assert GROUPING_SOLVERS.build("beam", {"beam_width": 4}, s, ABCD, 2).groups == g.groups
    with pytest.raises(ConfigError, match="beam_width"):
        GROUPING_SOLVERS.build("beam", {"beam_widht": 4}, s, ABCD, 2)


# -- candidate networks with their own costs (Standley et al. 2020's setting) --------------------------------------
def brute_force_candidates(cands, budget):
    """Reference: every subset of the candidate list within the budget that covers every task (tests only)."""
    n, best, arg = len(cands.networks), -np.inf, None
    for r in range(1, n + 1):
        for combo in itertools.combinations(range(n), r):
            if cands.costs[list(combo)].sum() > budget + 1e-9:
                continue
            vals = cands.rows[list(combo)].max(0)
            if np.isfinite(vals).all() and vals.sum() > best:
                best, arg = float(vals.sum()), combo
    return best, arg


def random_candidates(rng, k, n, costs=(0.5, 1.0, 0.75)):
    tasks = names(k)
    nets = []
    for _ in range(n):
        size = int(rng.integers(1, k + 1))
        ts = tuple(sorted(rng.choice(tasks, size=size, replace=False)))
        nets.append(Candidate(ts, float(rng.choice(costs)), {t: float(rng.uniform(0.1, 2.0)) for t in ts},
                              f"n{len(nets)}"))
    nets += [Candidate((t,), 1.0, {t: float(rng.uniform(0.5, 3.0))}, f"s{t}") for t in tasks]  # always coverable
    return Candidates(nets, tasks, higher_is_better=False)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.sampled_from([1.0, 1.5, 2.0, 2.25, 3.5]), st.integers(0, 2**32 - 1))
def test_exact_candidates_equal_brute_force(k, n, budget, seed):
    rng = np.random.default_rng(seed)
    cands = random_candidates(rng, k, n)
    want, _ = brute_force_candidates(cands, budget)
    if not np.isfinite(want):
        with pytest.raises((DataError, ConfigError)):
            select_exact(cands, cands.tasks, budget)
        return
    g = select_exact(cands, cands.tasks, budget)
    assert -g.total == pytest.approx(want, abs=1e-9)  # values are losses: the solver minimises their sum
    assert g.total_cost <= budget + 1e-9 and g.meta["optimal"] and not g.meta["higher_is_better"]
    chosen = [next(n for n in cands.networks if n.label == lab) for lab in g.labels]
    assert [list(n.tasks) for n in chosen] == g.groups and [n.cost for n in chosen] == g.costs
    for t, v in g.per_task.items():  # each task is served by its best chosen network, in loss units
        assert v == min(n.values[t] for n in chosen if t in n.tasks)
    beam = select_beam(cands, cands.tasks, budget)
    assert beam.total >= g.total - 1e-9 and beam.total_cost <= budget + 1e-9  # losses: never below the optimum


def test_half_size_single_task_networks_at_half_cost():
    """Standley et al.: with budget 1.5, a full network for the pair that helps each other plus a half-size
    network for the task that wants to be alone beats any two full networks' budget (which is not affordable)."""
    tasks = ["a", "b", "c"]
    full = [Candidate(g, 1.0, v) for g, v in [
        (("a",), {"a": 1.0}), (("b",), {"b": 1.0}), (("c",), {"c": 1.0}),
        (("a", "b"), {"a": 0.6, "b": 0.6}), (("a", "c"), {"a": 1.5, "c": 1.5}), (("b", "c"), {"b": 1.5, "c": 1.5}),
        (("a", "b", "c"), {"a": 0.8, "b": 0.8, "c": 1.6})]]
    half = [Candidate((t,), 0.5, {t: 1.2}, "half-size") for t in tasks]
    cands = Candidates(full + half, tasks, higher_is_better=False)
    for solver in (select_exact, select_beam):
        g = solver(cands, tasks, 1.5)
        assert g.groups == [["a", "b"], ["c"]] and g.costs == [1.0, 0.5] and g.labels == ["", "half-size"]
        assert g.per_task == {"a": 0.6, "b": 0.6, "c": 1.2} and g.total == pytest.approx(2.4)
        assert g.total_cost == 1.5
    g1 = select_exact(cands, tasks, 1.0)  # one full network only
    assert g1.groups == [["a", "b", "c"]] and g1.total == pytest.approx(3.2)
    g2 = select_exact(cands, tasks, 2.0)  # the full single-task network for c is better than the half-size one
    assert g2.groups == [["a", "b"], ["c"]] and g2.costs == [1.0, 1.0] and g2.total == pytest.approx(2.2)
    back = Grouping.from_json(json.loads(json.dumps(g.to_json(), allow_nan=False)))
    assert back == g and back.to_json()["total_cost"] == 1.5


def test_equal_estimates_prefer_the_smaller_network():
    """HOA tie: {A, B, C}'s estimates for A and B equal {A, B}'s (C's pair losses with A and B equal theirs), and C
    is served by {C, D}: on equal totals the smaller network {A, B} is trained, not {A, B, C}."""
    pairs = np.array([[2.0, 1.0, 9.0, 9.0],  # [i, j] = L_j({i, j}); diagonal: single-task loss
                      [1.0, 2.0, 9.0, 9.0],
                      [1.0, 1.0, 2.0, 0.1],
                      [9.0, 9.0, 0.1, 2.0]])
    hoa = HoaScore(AffinityMatrix(pairs, ABCD, "pairwise", higher_is_better=False))
    assert hoa(0, (0, 1, 2)) == hoa(0, (0, 1)) and hoa(1, (0, 1, 2)) == hoa(1, (0, 1))
    for solver in (select_exact, select_beam):
        g = solver(hoa, ABCD, 2)
        assert g.groups == [["A", "B"], ["C", "D"]], solver
    cands = Candidates.from_score(hoa, ABCD)
    for solver in (select_exact, select_beam):
        assert solver(cands, ABCD, 2).groups == [["A", "B"], ["C", "D"]]
    # a tie between a cheap and a dear network for the same tasks: the cheap one
    same = Candidates([Candidate(("A", "B", "C", "D"), 1.0, dict.fromkeys(ABCD, 1.0), "dear"),
                       Candidate(("A", "B", "C", "D"), 0.5, dict.fromkeys(ABCD, 1.0), "cheap")], ABCD)
    assert select_exact(same, ABCD, 3).labels == ["cheap"] and select_beam(same, ABCD, 3).labels == ["cheap"]


def test_real_valued_budget_with_a_score():
    s = tag(TWO_PAIRS, tasks=ABCD)
    assert select_exact(s, ABCD, 2.5).groups == [["A", "B"], ["C", "D"]]
    assert select_exact(s, ABCD, 1.99).groups == [ABCD]
    g = select_exact(s, ABCD, 1.0, network_cost=0.5)  # two networks at half a unit each
    assert g.groups == [["A", "B"], ["C", "D"]] and g.costs == [0.5, 0.5] and g.meta["networks_allowed"] == 2
    assert select_beam(s, ABCD, 1.0, network_cost=0.5).groups == g.groups
    with pytest.raises(ConfigError, match="buys no network"):
        select_exact(s, ABCD, 0.5)
    with pytest.raises(ConfigError, match="budget must be a number"):
        select_beam(s, ABCD, float("nan"))


def test_candidates_are_validated_with_the_network_named():
    ok = Candidate(("a",), 1.0, {"a": 1.0})
    with pytest.raises(DataError, match=r"network a\+zz.*unknown task"):
        Candidates([ok, Candidate(("a", "zz"), 1.0, {"a": 1.0, "zz": 1.0})], ["a"])
    with pytest.raises(DataError, match=r"network a \(half\).*cost"):
        Candidates([Candidate(("a",), 0.0, {"a": 1.0}, "half")], ["a"])
    with pytest.raises(DataError, match="missing"):
        Candidates([Candidate(("a", "b"), 1.0, {"a": 1.0})], ["a", "b"])
    with pytest.raises(DataError, match="non-finite"):
        Candidates([Candidate(("a",), 1.0, {"a": float("nan")})], ["a"])
    cands = Candidates([ok], ["a", "b"])
    with pytest.raises(DataError, match="covers every task"):
        select_exact(cands, ["a", "b"], 3)
    with pytest.raises(DataError, match="covers every task"):
        select_beam(cands, ["a", "b"], 3)
    with pytest.raises(DataError, match="over tasks"):
        select_exact(cands, ["b", "a"], 3)
    more = cands.extended([Candidate(("b",), 1.0, {"b": -2.0})], higher_is_better=True)  # a score, negated
    assert select_exact(more, ["a", "b"], 2).per_task == {"a": 1.0, "b": 2.0}


def test_exact_candidates_at_k12_many_costs():
    rng = np.random.default_rng(11)
    tasks = names(12)
    cands = random_candidates(rng, 12, 300, costs=(0.5, 0.75, 1.0, 1.25))
    g = select_exact(cands, tasks, 3.0)
    beam = select_beam(cands, tasks, 3.0)
    assert g.total_cost <= 3.0 + 1e-9 and beam.total_cost <= 3.0 + 1e-9
    assert g.total - 1e-9 <= beam.total <= 1.1 * g.total  # losses: within 10 % of the optimum


@pytest.mark.parametrize("budget", [1.5, 2.5])
def test_beam_covers_when_cheap_partial_selections_cannot_be_completed(budget):
    """Standley's setting at K = 10: after one full network only a half-size one fits, so most partial selections
    that pass the cost lower bound cannot be completed; the beam still returns a covering selection near the
    optimum."""
    rng = np.random.default_rng(10)
    tasks = names(10)
    pairs = rng.uniform(0.5, 1.5, size=(10, 10))
    full = Candidates.from_score(HoaScore(AffinityMatrix(pairs, tasks, "pairwise", higher_is_better=False)), tasks)
    cands = full.extended([Candidate((t,), 0.5, {t: float(-pairs[i, i] * rng.uniform(1.0, 1.3))}, "half-size")
                           for i, t in enumerate(tasks)])
    ex, bm = select_exact(cands, tasks, budget), select_beam(cands, tasks, budget)
    assert bm.total_cost <= budget and bm.total <= ex.total + 1e-9
    assert bm.total >= ex.total * 1.02  # score units (negated losses): within 2 % of the optimum


def test_group_singleton_score_lets_a_task_that_only_loses_stay_alone(tmp_path):
    """TAG's official -1e6 puts every task in a group while the budget allows fewer networks than tasks;
    group.singleton_score: 0 keeps alone a task whose every mate gives it negative affinity."""
    from polytask.config import Config
    from polytask.relations import AffinityMatrix
    from polytask.relations.workflow import choose_groups

    z = np.array([[0, 0.5, 0.4, -0.3], [0.5, 0, 0.4, -0.2], [0.4, 0.5, 0, -0.4], [-0.5, -0.6, -0.4, 0]])
    aff = AffinityMatrix(z, ["a", "b", "c", "d"], "grad_cosine")
    official = choose_groups(Config.model_validate({"group": {"budget": 2}}), aff, tmp_path)
    zero = choose_groups(Config.model_validate({"group": {"budget": 2, "singleton_score": 0}}), aff, tmp_path)
    assert all(len(g) > 1 for g in official.groups)
    assert sorted(map(sorted, zero.groups)) == [["a", "b", "c"], ["d"]]
