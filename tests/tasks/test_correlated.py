"""The ``correlated`` suite (Ma et al. 2018, Section 3.2): shapes, determinism, the weight cosine, the label
correlation's rise with p, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polytask.tasks.suites  # noqa: F401  (registers the suites)
from polytask.errors import ConfigError
from polytask.tasks.registry import SUITES, build_suite
from polytask.tasks.suites.correlated import pearson, sine_targets
from polytask.tasks.task import SPLITS

SMALL = {"d": 16, "n_train": 2000, "n_val": 200, "n_test": 300}


def test_registered_with_shapes_splits_and_targets() -> None:
    assert "correlated" in SUITES.names()
    suite = build_suite("correlated", {**SMALL, "correlation": 0.3}, seed=0)
    assert suite.task_names == ["y1", "y2"]
    assert all(t.kind == "regression" and t.n_outputs == 1 and t.scale is None for t in suite.tasks)
    seen: list[int] = []
    for split, n in zip(SPLITS, (2000, 200, 300), strict=True):
        (data,) = suite.splits[split]
        assert data.x.shape == (n, 16) and data.x.dtype == torch.float32
        assert all(data.y[t].shape == (n,) and not data.y[t].isnan().any() for t in suite.task_names)
        seen += data.index.tolist()
    assert sorted(seen) == list(range(2500))  # disjoint splits of fresh rows
    # the targets are Eqs. 3-4 of the stored weights and sine parameters, plus noise of the configured size
    (train,) = suite.splits["train"]
    w, alpha, beta = (np.array(suite.info[k]) for k in ("weights", "alpha", "beta"))
    clean = sine_targets(train.x.double().numpy() @ w.T, alpha, beta)
    residual = np.stack([train.y["y1"].numpy(), train.y["y2"].numpy()], 1) - clean
    assert abs(residual.std() - 0.1) < 0.01 and abs(residual.mean()) < 0.01
    assert np.allclose(np.linalg.norm(w, axis=1), 1.0)


def test_same_seed_same_suite_and_correlation_changes_only_w2() -> None:
    a = build_suite("correlated", SMALL, seed=4)
    b = build_suite("correlated", SMALL, seed=4)
    other = build_suite("correlated", SMALL, seed=5)
    moved = build_suite("correlated", {**SMALL, "correlation": -0.2}, seed=4)
    for split in SPLITS:
        assert torch.equal(a.splits[split][0].x, b.splits[split][0].x)
        assert torch.equal(a.splits[split][0].y["y2"], b.splits[split][0].y["y2"])
        assert torch.equal(a.splits[split][0].x, moved.splits[split][0].x)
        assert torch.equal(a.splits[split][0].y["y1"], moved.splits[split][0].y["y1"])  # w1, alpha, beta, noise kept
    assert not torch.equal(a.splits["train"][0].x, other.splits["train"][0].x)
    assert not torch.equal(a.splits["train"][0].y["y2"], moved.splits["train"][0].y["y2"])


@pytest.mark.parametrize("p", [-1.0, -0.5, 0.0, 0.5, 0.9, 1.0])
def test_weight_cosine_is_p_and_linear_parts_correlate_by_p(p: float) -> None:
    suite = build_suite("correlated", {**SMALL, "correlation": p, "n_train": 10000}, seed=1)
    w = np.array(suite.info["weights"])
    assert abs(w[0] @ w[1] / (np.linalg.norm(w[0]) * np.linalg.norm(w[1])) - p) < 1e-6
    assert abs(suite.info["cosine"] - p) < 1e-6
    # empirical Pearson of w1^T x, w2^T x: p up to sampling error (sd about (1 - p^2) / sqrt(n) = 0.01)
    assert abs(suite.info["linear_correlation"] - p) < 0.04
    (train,) = suite.splits["train"]
    assert suite.info["label_correlation"] == pytest.approx(
        pearson(train.y["y1"].double().numpy(), train.y["y2"].double().numpy()), abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(low=st.floats(0.0, 0.75), gap=st.floats(0.25, 1.0), seed=st.integers(0, 50))
def test_higher_p_gives_higher_label_correlation(low: float, gap: float, seed: int) -> None:
    """On [0, 1] the population label correlation rises with p (see the module docstring); with the same seed the
    two suites share inputs, noise and sine parameters, so a gap of 0.25 stands out of the sampling noise."""
    high = min(1.0, low + gap)
    params = {"d": 16, "n_train": 2000, "n_val": 1, "n_test": 1}
    r_low = build_suite("correlated", {**params, "correlation": low}, seed).info["label_correlation"]
    r_high = build_suite("correlated", {**params, "correlation": high}, seed).info["label_correlation"]
    assert r_high > r_low


@pytest.mark.parametrize(("params", "key"), [
    ({"correlation": 1.5}, "correlation"),
    ({"correlation": -1.01}, "correlation"),
    ({"d": 1}, "d"),
    ({"c": 0}, "c"),
    ({"m": -1}, "m"),
    ({"noise": -0.1}, "noise"),
    ({"n_train": 1}, "n_train"),
    ({"corelation": 0.5}, "corelation"),
])
def test_bad_params_are_errors_naming_the_key(params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"suite\.params\.{key}"):
        build_suite("correlated", params, 0)
