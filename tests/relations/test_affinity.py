"""AffinityMatrix: validation, NaN-safe JSON, atomic save, symmetric/subset/spearman; the SVG heatmap."""

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from polytask.errors import DataError
from polytask.relations import AffinityMatrix, heatmap_svg, save_heatmap, spearman_rho

TASKS = ["a", "b", "c"]
M = np.array([[np.nan, 0.5, -0.2], [0.1, np.nan, 0.3], [-0.4, 0.2, np.nan]])


def aff(matrix=M, tasks=TASKS, **kw):
    return AffinityMatrix(matrix, list(tasks), kw.pop("estimator", "test"), **kw)


def test_valid_matrix_keeps_nan_diagonal():
    a = aff(cost={"training_runs": 1})
    assert a.k == 3 and np.isnan(np.diag(a.matrix)).all()
    assert a.matrix[0, 1] == 0.5 and a.cost == {"training_runs": 1}


@pytest.mark.parametrize(
    ("matrix", "tasks", "needle"),
    [
        (np.zeros((2, 3)), ["a", "b"], "square"),
        (np.zeros((3, 3)), ["a", "b"], "2 task names"),
        (np.zeros((2, 2)), ["a", "a"], "unique"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), ["a", "b"], "'a' -> 'b'"),
        (np.array([[0.0, np.inf], [0.0, 0.0]]), ["a", "b"], "finite"),
        (np.array([[np.inf, 0.0], [0.0, 0.0]]), ["a", "b"], "diagonal"),
    ],
)
def test_invalid_matrices_raise_clear_errors(matrix, tasks, needle):
    with pytest.raises(DataError, match=needle):
        aff(matrix, tasks)


def test_json_round_trip_writes_null_for_nan():
    a = aff(cost={"wall_time_s": 1.5}, meta={"seed": 3, "bad": float("nan")}, higher_is_better=False)
    d = a.to_json()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN tokens
    assert d["matrix"][0][0] is None and d["meta"]["bad"] is None
    b = AffinityMatrix.from_json(text)
    assert b.tasks == TASKS and b.estimator == "test" and b.higher_is_better is False
    np.testing.assert_array_equal(np.isnan(b.matrix), np.isnan(a.matrix))
    np.testing.assert_allclose(np.nan_to_num(b.matrix), np.nan_to_num(a.matrix))


def test_from_json_rejects_missing_keys_and_other_formats():
    with pytest.raises(DataError, match="missing"):
        AffinityMatrix.from_json({"tasks": ["a"]})
    with pytest.raises(DataError, match="format"):
        AffinityMatrix.from_json({**aff().to_json(), "format": "something/9"})


def test_save_load_round_trip(tmp_path):
    a = aff(cost={"training_runs": 1, "forward_passes": 10})
    path = a.save(tmp_path / "sub" / "affinity.json")
    json.loads(path.read_text())
    b = AffinityMatrix.load(path)
    assert b.cost == a.cost and b.tasks == a.tasks
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # the temporary file was renamed away
    with pytest.raises(DataError, match="does not exist"):
        AffinityMatrix.load(tmp_path / "nope.json")


def test_symmetric_averages_pairs_and_keeps_diagonal():
    m = np.array([[1.0, 2.0], [4.0, 5.0]])
    s = aff(m, ["a", "b"]).symmetric()
    np.testing.assert_allclose(s.matrix, [[1.0, 3.0], [3.0, 5.0]])


def test_subset_reorders():
    s = aff().subset(["c", "a"])
    assert s.tasks == ["c", "a"]
    assert s.matrix[0, 1] == -0.4 and s.matrix[1, 0] == -0.2
    with pytest.raises(DataError, match="unknown task 'z'"):
        aff().subset(["z"])


def test_spearman_hand_cases():
    a = aff()
    assert a.spearman(a) == pytest.approx(1.0)
    assert a.spearman(aff(-M)) == pytest.approx(-1.0)
    # A loss matrix that ranks pairs the same way (lower = better) correlates +1 once oriented.
    assert a.spearman(aff(-M, higher_is_better=False)) == pytest.approx(1.0)
    # other's tasks in another order are aligned first
    assert a.spearman(a.subset(["b", "c", "a"])) == pytest.approx(1.0)
    assert math.isnan(a.spearman(aff(np.ones((3, 3)))))
    with pytest.raises(DataError, match="different tasks"):
        a.spearman(aff(np.zeros((2, 2)), ["a", "b"]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=3, max_size=30))
def test_spearman_rho_matches_scipy_with_ties(pairs):
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    ours = spearman_rho(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_spearman_is_invariant_to_monotone_maps(seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(4, 4))
    a = aff(m, list("wxyz"))
    b = aff(np.exp(3 * m) + 2, list("wxyz"))
    assert a.spearman(b) == pytest.approx(1.0)


def test_heatmap_svg_is_self_contained_and_escaped(tmp_path):
    tasks = ["a<b", "c&d", 'q"r']
    a = aff(M, tasks, estimator="tag <lookahead>")
    svg = heatmap_svg(a)
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    rects = [r for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert len(rects) == 9
    texts = "".join(t.text or "" for t in root.iter(f"{ns}text"))
    for t in tasks:
        assert t in texts
    assert "<script" not in svg and "href" not in svg and "url(" not in svg
    assert svg.count("http") == 1  # only the xmlns namespace
    fills = {r.find(f"{ns}title").text.split(":")[0]: r.get("fill") for r in rects}
    assert fills["a<b → a<b"] == "#dddddd"  # NaN diagonal
    red, _, blue = (int(fills["a<b → c&d"][i : i + 2], 16) for i in (1, 3, 5))
    assert red > blue  # +0.5 helps: red
    red, _, blue = (int(fills["q\"r → a<b"][i : i + 2], 16) for i in (1, 3, 5))
    assert blue > red  # -0.4 hurts: blue
    path = save_heatmap(a, tmp_path / "heat.svg")
    assert path.read_text() == svg


def _cell_fills(svg):
    ns = "{http://www.w3.org/2000/svg}"
    root = ET.fromstring(svg)
    return {r.find(f"{ns}title").text.split(":")[0]: r.get("fill") for r in root.iter(f"{ns}rect")
            if r.find(f"{ns}title") is not None}


def _luminance(fill):
    r, g, b = (int(fill[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_heatmap_flips_colours_for_losses():
    loss = aff(np.array([[0.0, 1.0], [3.0, 0.0]]), ["a", "b"], higher_is_better=False)
    fills = _cell_fills(heatmap_svg(loss, title="losses"))
    # all losses are one sign: a sequential scale, the best (smallest loss) darkest, the worst palest
    assert _luminance(fills["a → b"]) < _luminance(fills["b → a"]) - 0.3


def test_heatmap_has_a_colour_bar_in_the_matrix_units():
    for m, hib in ((M, True), (np.array([[0.0, 1.0], [3.0, 0.0]]), False)):
        a = aff(m, [f"t{i}" for i in range(len(m))], higher_is_better=hib)
        root = ET.fromstring(heatmap_svg(a))
        ns = "{http://www.w3.org/2000/svg}"
        bars = [g for g in root.iter(f"{ns}g") if g.get("class") == "colorbar"]
        assert len(bars) == 1
        ticks = [float(t.text) for t in bars[0].iter(f"{ns}text")]
        off = m[~np.eye(len(m), dtype=bool)]
        off = off[np.isfinite(off)]
        assert len(ticks) == 5 and len({_luminance(r.get("fill")) for r in bars[0].iter(f"{ns}rect")
                                        if r.get("fill") != "none"}) > 10
        if hib:  # diverging around 0: +-the largest magnitude, best at the top
            assert ticks[0] == pytest.approx(np.abs(off).max(), rel=1e-2) and ticks[2] == 0.0
        else:  # sequential over the values' range, best (smallest loss) at the top
            assert ticks[0] == pytest.approx(off.min()) and ticks[-1] == pytest.approx(off.max())


def test_heatmap_of_a_one_signed_matrix_shows_its_range():
    """A data-map correlation matrix (all off-diagonal values in 0.90..0.99) is not painted one dark colour."""
    m = np.array([[1.0, 0.90, 0.95, 0.93], [0.90, 1.0, 0.99, 0.91], [0.95, 0.99, 1.0, 0.97],
                  [0.93, 0.91, 0.97, 1.0]])
    fills = _cell_fills(heatmap_svg(aff(m, list("abcd"), estimator="datamap")))
    lum = {k: _luminance(v) for k, v in fills.items()}
    assert lum["b → c"] < lum["a → b"] - 0.4  # 0.99 dark, 0.90 pale
    assert max(lum.values()) - min(lum.values()) > 0.5
