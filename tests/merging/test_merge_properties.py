"""One property suite over every registered merge method: the identities each method promises.

- merging one model returns it (under the method's identity parameters, e.g. density 1 for TIES);
- merging K identical models is idempotent (returns that model);
- permuting the models (with their weights and per-model parameters) does not change the result, for the
  methods that declare ``order_invariant``;
- lambda = 0 returns the base, for every method with a lambda.
"""

import pytest
import torch

from polytask.merging import METHODS, merge_encoders, merge_state_dicts

ALL = [e.name for e in METHODS]
DATA_FREE = [e.name for e in METHODS if e.extra["kind"] == "data-free"]
DATA = [e.name for e in METHODS if e.extra["kind"] == "data"]


def _states(k, identical=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(7, 5, generator=g), "a.bias": torch.randn(7, generator=g),
            "b.weight": torch.randn(3, 7, generator=g), "step": torch.tensor(3)}
    one = {n: t + 0.5 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in base.items()}
    models = [one if identical else
              {n: t + 0.5 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in base.items()}
              for _ in range(k)]
    return base, models


def _close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for n in a:
        assert torch.allclose(a[n].double(), b[n].double(), atol=atol, rtol=0), (n, (a[n] - b[n]).abs().max())


def _merge(name, k, identical=False, params=None, weights=None, order=None, model_params=None, task_models=None):
    entry = METHODS.get(name)
    if entry.extra["kind"] == "data":
        ctx = task_models(k, identical)
        ref = ctx.encoders[0]
        if order is not None:
            ctx = ctx.permuted(order)
            weights = None if weights is None else [weights[i] for i in order]
        return merge_encoders(name, params or {}, ctx, weights), ref, ctx.pretrained
    base, models = _states(k, identical)
    mp = model_params or [{}] * k
    if order is not None:
        models = [models[i] for i in order]
        weights = None if weights is None else [weights[i] for i in order]
        mp = [mp[i] for i in order]
    base_arg = base if entry.extra["needs_base"] else None
    return merge_state_dicts(name, base_arg, models, params, weights, mp, seed=5), models[0], base


@pytest.mark.parametrize("name", ALL)
def test_merging_one_model_returns_it(name, task_models):
    merged, model, _ = _merge(name, 1, params=METHODS.get(name).extra["identity"](1), task_models=task_models)
    _close(merged, model)


@pytest.mark.parametrize("name", ALL)
def test_merging_identical_models_is_idempotent(name, task_models):
    merged, model, _ = _merge(name, 3, identical=True, params=METHODS.get(name).extra["identity"](3),
                              task_models=task_models)
    _close(merged, model)


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).extra["order_invariant"]])
def test_order_of_models_does_not_matter(name, task_models):
    entry = METHODS.get(name)
    weights = [1.0, 0.5, 2.0] if entry.extra["uses_weights"] else None
    per_model = [{"density": d} for d in (0.3, 0.6, 0.9)] if "density" in entry.extra["per_model"] else None
    params = {"steps": 5} if entry.extra["kind"] == "data" and "steps" in entry.params.model_fields else None
    if name == "lwptv":  # per-model density reaches the method lwptv wraps
        params = {"base_method": "ties", "threshold": 0.9}
    a, _, _ = _merge(name, 3, params=params, weights=weights, model_params=per_model, task_models=task_models)
    b, _, _ = _merge(name, 3, params=params, weights=weights, order=[2, 0, 1], model_params=per_model,
                     task_models=task_models)
    _close(a, b, atol=1e-4 if entry.extra["kind"] == "data" else 1e-6)


def _lambda_zero(name):
    entry = METHODS.get(name)
    fields = entry.params.model_fields
    if "lam" in fields:
        return {"lambda": 0.0}
    if name == "lwptv":
        return {"base_params": {"lambda": 0.0}}
    return None


@pytest.mark.parametrize("name", [n for n in ALL if _lambda_zero(n) is not None])
def test_lambda_zero_returns_the_base(name, task_models):
    merged, _, base = _merge(name, 3, params=_lambda_zero(name), task_models=task_models)
    _close(merged, base)


def test_every_method_is_in_the_suite_and_documented():
    assert set(ALL) == {"average", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "generalized",
                        "metagpt", "lwptv", "fisher", "regmean", "adamerging", "divmerge"}
    for e in METHODS:
        assert e.paper and e.summary and e.build.__doc__, e.name
        for key in ("kind", "per_model", "order_invariant", "uses_weights", "needs_base", "identity"):
            assert key in e.extra, (e.name, key)


def test_the_non_order_invariant_methods_really_depend_on_order():
    base, models = _states(3)
    a = merge_state_dicts("dare", base, models, {"drop_rate": 0.5}, seed=1)
    b = merge_state_dicts("dare", base, models[::-1], {"drop_rate": 0.5}, seed=1)
    assert not torch.allclose(a["a.weight"], b["a.weight"])
