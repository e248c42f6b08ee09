"""The shared parts of task-vector merging, against hand-computed values and slow references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.merging import merge_state_dicts, merge_tensors, ops
from polytask.merging.methods import dare_generator, lwptv_saliency

floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=1, max_size=300), st.data())
def test_kth_largest_abs_matches_kthvalue(values, data):
    t = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    assert ops.kth_largest_abs(t, k) == float(torch.kthvalue(t.abs(), len(values) - k + 1).values)


def _reference_keep(t, rank):
    """The top ``rank`` entries by (magnitude desc, index asc): a stable sort, the rule of trim_ties: first."""
    order = sorted(range(t.numel()), key=lambda i: (-abs(float(t[i])), i))
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[order[:rank]] = True
    return keep


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=200), st.data(), st.booleans())
def test_thresholds_and_exact_k_trim_match_a_stable_sort(values, data, radix):
    t = torch.tensor(values, dtype=torch.bfloat16).float() * 0.37  # many ties, as bf16 task vectors have
    n = t.numel()
    r = data.draw(st.integers(1, n))
    old = ops.CHUNK
    ops.CHUNK = 16 if radix else old  # several chunks, or one
    try:
        if radix:  # the model-scope path: two histogram passes
            sel = ops.RadixSelect()
            sel.count_high(t)
            sel.locate([r])
            sel.count_low(t)
            th = sel.thresholds()[r]
            assert th == ops.thresholds(t, [r])[r]
        else:
            th = ops.thresholds(t, [r])[r]
        pruned = ops.magnitude_prune(t, r / n + 1e-9) if r < n else t
    finally:
        ops.CHUNK = old
    keys = ops.magnitude_keys(t)
    assert int((keys > th.key).sum()) == th.greater and int((keys == th.key).sum()) == th.equal
    assert th.greater < r <= th.greater + th.equal
    k = max(1, int((r / n + 1e-9) * n))
    if r < n:
        assert torch.equal(pruned != 0, _reference_keep(t, k) & (t != 0))


def test_kth_largest_abs_over_several_chunks(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK", 1000)
    t = torch.randn(10_007)
    for k in (1, 17, 5000, 10_007):
        assert ops.kth_largest_abs(t, k) == float(torch.kthvalue(t.abs(), 10_007 - k + 1).values)


def test_magnitude_prune_keeps_the_top_density_entries():
    tau = torch.tensor([0.1, -0.5, 0.3, -0.05, 0.9, 0.0, -0.2, 0.4, 0.01, -0.7])
    out = ops.magnitude_prune(tau, 0.3)
    assert out.tolist() == pytest.approx([0, -0.5, 0, 0, 0.9, 0, 0, 0, 0, -0.7])
    assert tau[0] == pytest.approx(0.1)  # pure: input untouched
    assert ops.magnitude_prune(tau, 0.01).count_nonzero() == 1  # k = max(1, int(density * n))
    assert torch.equal(ops.magnitude_prune(tau, 1.0), tau)
    assert ops.magnitude_prune(tau, 0.0).count_nonzero() == 0


def test_ties_at_the_threshold_keep_exactly_k_in_index_order_or_all_of_them():
    # the case in small: bf16 values tie at the k-th magnitude; k = 4 of 10
    tau = torch.tensor([0.5, -2.0, 0.5, 1.0, -0.5, 0.5, 3.0, -0.5, 0.25, 0.5], dtype=torch.bfloat16)
    first = ops.magnitude_prune(tau, 0.4)
    assert first.float().tolist() == [0.5, -2.0, 0, 1.0, 0, 0, 3.0, 0, 0, 0]  # the first tied 0.5 only
    every = ops.magnitude_prune(tau, 0.4, rule="all")
    assert int(every.count_nonzero()) == 9  # all six entries tied at 0.5 are kept (the official code's >=)


def test_magnitude_band_drops_outliers_and_smallest():
    tau = torch.arange(1.0, 21.0) * torch.tensor([1.0, -1.0]).repeat(10)  # |tau| = 1..20
    out = ops.magnitude_band(tau, density=0.5, gamma=0.1)  # keep 10, drop the 2 largest, so ranks 9..18
    kept = sorted(int(v) for v in out.abs().tolist() if v)
    assert kept == list(range(9, 19))
    tied = torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    band = ops.magnitude_band(tied, density=0.3, gamma=0.2)  # ranks 3..5 of the stable order: 3, 2, 2
    assert band.tolist() == [0, 0, 3.0, 2.0, 2.0, 0, 0, 0, 0, 0]


def test_model_scope_trim_is_the_tensor_trim_of_the_whole_task_vector():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (30, 20), "b": (50,), "c": (7, 3)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    scale = {"a": 0.5, "b": 2.0, "c": 1.0}  # tensors moved by different amounts: the scope matters
    model = {n: base[n] + torch.randint(-3, 4, s, generator=g).float() * scale[n] for n, s in shapes.items()}
    for method, params, kind in (("ties", {"density": 0.3}, "magnitude"),
                                 ("breadcrumbs", {"density": 0.4, "gamma": 0.1}, "band")):
        for rule in ("first", "all"):
            merged = merge_state_dicts(method, base, [model], {**params, "trim_scope": "model", "trim_ties": rule})
            whole = torch.cat([(model[n] - base[n]).reshape(-1) for n in shapes])  # in merge order
            if kind == "magnitude":
                want = ops.magnitude_prune(whole, params["density"], rule=rule)
            else:
                want = ops.magnitude_band(whole, params["density"], params["gamma"], rule=rule)
            got = torch.cat([(merged[n] - base[n]).reshape(-1) for n in shapes])
            assert torch.equal(got != 0, want != 0), (method, rule)
            tensor_scope = merge_state_dicts(method, base, [model], {**params, "trim_ties": rule})
            assert any(not torch.equal(tensor_scope[n], merged[n]) for n in shapes)


def test_random_drop_is_seeded_and_unbiased():
    tau = torch.ones(200_000)
    a = ops.random_drop(tau, 0.75, ops.drop_stream(1))
    b = ops.random_drop(tau, 0.75, ops.drop_stream(1))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 4.0}
    assert a.mean().item() == pytest.approx(1.0, abs=0.02)
    assert (a == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_ties_by_hand():
    base = torch.zeros(4)
    models = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -0.5, 0.0]),
              torch.tensor([-1.0, 1.0, -1.0, 0.0])]
    # no trim; elected signs: +, +, -, + (0 -> +); disjoint means: (1+3)/2, (1+1)/2, (-0.5-1)/2, 0
    out = merge_tensors("ties", base, models, {"density": 1.0})
    assert out.tolist() == pytest.approx([2.0, 1.0, -0.75, 0.0])
    # weights scale the vectors and the divisor: (1*1 + 2*3)/(1+2) for entry 0
    out = merge_tensors("ties", base, models, {"density": 1.0}, weights=[1.0, 2.0, 1.0])
    assert out[0].item() == pytest.approx(7 / 3)


def test_task_arithmetic_adds_and_negates():
    base = torch.tensor([1.0, 1.0])
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    assert merge_tensors("task_arithmetic", base, [a, b], {"lambda": 0.5}).tolist() == [1.5, 2.0]
    assert merge_tensors("task_arithmetic", base, [a], weights=[-1.0]).tolist() == [0.0, 1.0]  # forgetting


def test_dare_masks_depend_only_on_seed_name_and_position():
    base = torch.zeros(1000)
    models = [torch.ones(1000), 2 * torch.ones(1000)]
    a = merge_tensors("dare", base, models, {"drop_rate": 0.5}, name="x", seed=3)
    b = merge_tensors("dare", base, models, {"drop_rate": 0.5}, name="x", seed=3)
    c = merge_tensors("dare", base, models, {"drop_rate": 0.5}, name="y", seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 2.0, 4.0, 6.0}


def test_metagpt_coefficients_are_squared_norm_shares():
    base = {"l.weight": torch.zeros(2), "l.bias": torch.zeros(1), "m.weight": torch.zeros(1)}
    m1 = {"l.weight": torch.tensor([3.0, 0.0]), "l.bias": torch.tensor([0.0]), "m.weight": torch.tensor([1.0])}
    m2 = {"l.weight": torch.tensor([0.0, 0.0]), "l.bias": torch.tensor([4.0]), "m.weight": torch.tensor([1.0])}
    out = merge_state_dicts("metagpt", base, [m1, m2])  # layer l: norms 9 and 16 -> 9/25, 16/25
    assert out["l.weight"].tolist() == pytest.approx([3 * 9 / 25, 0])
    assert out["l.bias"].tolist() == pytest.approx([4 * 16 / 25])
    assert out["m.weight"].tolist() == pytest.approx([1.0])  # 1/2 + 1/2
    model = merge_state_dicts("metagpt", base, [m1, m2], {"scope": "model"})  # norms 10 and 17
    assert model["l.weight"][0].item() == pytest.approx(3 * 10 / 27)


def test_lwptv_prunes_layers_a_model_barely_changed():
    stats = {"a.weight": [4.0, 1.0, 4.0], "b.weight": [0.04, 1.0, 4.0]}  # squared norms per model, then numel
    sal = lwptv_saliency(stats)
    assert sal["b"][0] == pytest.approx(0.02 / 1.01) and sal["a"][0] == pytest.approx(2 / 1.01)
    assert sal["a"][1] == pytest.approx(1.0)
    base = {"a.weight": torch.zeros(4), "b.weight": torch.zeros(4)}
    m = {"a.weight": torch.ones(4), "b.weight": torch.full((4,), 0.1)}
    out = merge_state_dicts("lwptv", base, [m], {"threshold": 0.5})
    assert out["a.weight"].tolist() == [1.0] * 4 and out["b.weight"].tolist() == [0.0] * 4
    assert merge_state_dicts("lwptv", base, [m], {"threshold": 0.0})["b.weight"][0].item() == pytest.approx(0.1)


def test_generalized_composes_the_same_parts_as_the_named_methods():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g)
    models = [base + torch.randn(50, generator=g) for _ in range(3)]
    ties = merge_tensors("ties", base, models, {"density": 0.4, "lambda": 0.8})
    gen = merge_tensors("generalized", base, models, {"sparsify": ["magnitude"], "consensus": True,
                                                        "normalize": True, "density": 0.4, "lambda": 0.8})
    assert torch.equal(ties, gen)
    dare = merge_tensors("dare", base, models, {"drop_rate": 0.3}, name="n", seed=2)
    gen = merge_tensors("generalized", base, models, {"sparsify": ["random"], "drop_rate": 0.3}, name="n", seed=2)
    assert torch.equal(dare, gen)


CASES = [("ties", {"density": 0.3}), ("ties", {"density": 0.3, "trim_ties": "all"}),
         ("ties", {"density": 0.3, "trim_scope": "model"}), ("dare_ties", {"drop_rate": 0.5}),
         ("dare_ties", {"drop_rate": 0.3, "density": 0.6}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
         ("generalized", {"sparsify": ["random", "band", "random"], "drop_rate": 0.3, "density": 0.6, "gamma": 0.05,
                          "consensus": True, "normalize": True}),
         ("task_arithmetic", {"lambda": 0.7}), ("dare", {"drop_rate": 0.9})]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_blocks_chunks_and_worker_threads_change_nothing(monkeypatch, method, params):
    """The merge runs in blocks split between threads (DARE streams moved to each block, tied entries cut at
    positions decided on the whole tensor): any split gives the result of one block on one thread."""
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(3000, generator=g), "b": torch.randn(500, generator=g)}
    models = [{n: t + torch.randint(-3, 4, t.shape, generator=g).float() * 0.1 for n, t in base.items()}
              for _ in range(4)]  # many ties at every threshold
    weights = [1.0, 0.5, 2.0, 0.8]
    monkeypatch.setattr(ops, "WORKERS", 1)
    whole = merge_state_dicts(method, base, models, params, weights, seed=3)
    monkeypatch.setattr(ops, "CHUNK", 256)
    monkeypatch.setattr(ops, "BLOCK", 92)  # blocks that do not line up with chunks or with DARE's 4 draws
    monkeypatch.setattr(ops, "PARALLEL_MIN", 1000)
    for workers in (1, 3):
        monkeypatch.setattr(ops, "WORKERS", workers)
        split = merge_state_dicts(method, base, models, params, weights, seed=3)
        assert all(torch.equal(whole[n], split[n]) for n in base), workers
    assert all(math.isfinite(float(t.sum())) for t in whole.values())


def test_dare_in_blocks_draws_what_one_pass_over_the_whole_tensor_draws(monkeypatch):
    """Each random step's mask is the one random_drop makes over the whole task vector, a second step
    continuing the same stream, however the tensor is split."""
    g = torch.Generator().manual_seed(1)
    base, model = torch.randn(1001, generator=g), torch.randn(1001, generator=g)
    monkeypatch.setattr(ops, "BLOCK", 100)
    monkeypatch.setattr(ops, "PARALLEL_MIN", 200)
    monkeypatch.setattr(ops, "WORKERS", 3)
    got = merge_tensors("generalized", base, [model], {"sparsify": ["random", "random"], "drop_rate": 0.4},
                        name="w", seed=5)
    stream = dare_generator(5, "w", 0)
    tau = ops.random_drop(ops.random_drop(model - base, 0.4, stream), 0.4, stream)
    assert torch.equal(got, base + tau)
    assert 0.3 < float((tau == 0).float().mean()) < 0.8  # two drops of 0.4: about 0.64 dropped


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.3, -0.7])
def test_the_disjoint_mean_divisor_by_count_is_the_sum_of_the_agreeing_weights(weight):
    """With equal weights the divisor of TIES' disjoint mean is looked up by how many models agree; it must be
    the in-order sum of their weights, bit for bit (0.3 + 0.3 + 0.3 is not 3 * 0.3 in float32)."""
    g = torch.Generator().manual_seed(2)
    k, m = 7, 4000
    taus = torch.randn(k, m, generator=g) * (torch.rand(k, m, generator=g) < 0.5)  # some models at zero
    base = torch.randn(m, generator=g)
    by_count = ops._Combine.of([weight] * k, True, True, 1.0, torch.float32)
    assert by_count.count is not None
    summed = ops._Combine([weight] * k, True, True, 1.0)
    a, b = base.clone(), base.clone()
    ops._combine_block(a, taus.clone(), by_count, torch.empty(4, m))
    ops._combine_block(b, taus.clone(), summed, torch.empty(4, m))
    assert torch.equal(a, b)



@pytest.mark.parametrize("rule", ["first", "all"])
def test_a_band_trim_in_blocks_is_the_band_of_the_whole_task_vector(monkeypatch, rule):
    """Breadcrumbs masks every model's block at once from key thresholds, correcting rows whose tied entries
    are cut inside the block: the result is magnitude_band of each whole task vector."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3001, generator=g)
    models = [base + torch.randint(-4, 5, (3001,), generator=g).float() * 0.1 for _ in range(3)]  # many ties
    monkeypatch.setattr(ops, "BLOCK", 100)
    monkeypatch.setattr(ops, "PARALLEL_MIN", 200)
    monkeypatch.setattr(ops, "WORKERS", 2)
    params = {"density": 0.5, "gamma": 0.1, "trim_ties": rule}
    got = merge_tensors("breadcrumbs", base, models, params, weights=[1.0, 1.0, 1.0])
    taus = [ops.magnitude_band(m - base, 0.5, 0.1, rule=rule) for m in models]
    assert torch.equal(got, base + ((taus[0] + taus[1]) + taus[2]))
    one = merge_tensors("breadcrumbs", base, models[:1], params)
    assert torch.equal(one, base + taus[0])
    if rule == "first":  # exactly int(density * n) entries survive
        assert int((taus[0] != 0).sum()) == 1500
