"""Target and feature standardisation of user tables: trained on the standardised scale, reported in the
original units, the fitted maps saved with the run; and data errors that name the column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polytask.config import Config
from polytask.engine.loop import evaluate
from polytask.engine.progress import Reporter
from polytask.errors import DataError
from polytask.flows.run import run
from polytask.tasks import Task, build_suite
from polytask.tasks.task import Standardizer

NOISE = 300.0  # std of the price noise: the floor of a regressor's test MSE is NOISE**2
TARGETS = {"a": "classification", "b": "classification", "price": "regression"}
FEATURES = [f"f{i}" for i in range(6)]


def _frame(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Two classification columns and a price of about 6000 ± 2100 that is linear in two features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    return pd.DataFrame({
        **{f"f{i}": x[:, i] for i in range(6)},
        "a": (x[:, 0] + x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(int),
        "b": np.digitize(x[:, 2] - x[:, 3] + 0.3 * rng.normal(size=n), [-1, 0, 1]),
        "price": 6000 + 2078 * (0.8 * x[:, 4] + 0.6 * x[:, 5]) + NOISE * rng.normal(size=n),
    })


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("table") / "data.csv"
    _frame().to_csv(path, index=False)
    return path


def test_standardizer_round_trip_ignores_missing_rows_and_keeps_constant_columns() -> None:
    values = torch.tensor([[1.0, 5.0], [3.0, 5.0], [float("nan"), 5.0], [5.0, 5.0]], dtype=torch.float64)
    s = Standardizer.fit(values)
    assert s.mean == pytest.approx((3.0, 5.0)) and s.std == pytest.approx((np.sqrt(8 / 3), 1.0))
    z = s.encode(values[[0, 1, 3]])
    assert torch.allclose(z.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.decode(z), values[[0, 1, 3]])
    big = Standardizer.fit(torch.tensor([1e30, 3e30]))
    assert torch.equal(big.encode(torch.tensor([1e30, 3e30])), torch.tensor([-1.0, 1.0]))
    assert Standardizer.fit(torch.full((3,), float("nan"))) == Standardizer((0.0,), (1.0,))


def test_regression_targets_are_standardised_on_train_and_the_maps_are_saved(csv: Path) -> None:
    suite = build_suite("table", {"path": str(csv), "targets": TARGETS}, 0)
    raw = _frame()
    (train,) = suite.splits["train"]
    price = suite.task("price")
    truth = raw["price"].to_numpy()[train.index.numpy()]
    assert price.scale is not None
    assert price.scale.mean[0] == pytest.approx(truth.mean()) and price.scale.std[0] == pytest.approx(truth.std())
    assert abs(float(train.y["price"].mean())) < 1e-5 and float(train.y["price"].std(correction=0)) == pytest.approx(
        1.0, abs=1e-5)
    (test,) = suite.splits["test"]
    assert torch.allclose(price.decode(test.y["price"]),
                          torch.tensor(raw["price"].to_numpy()[test.index.numpy()]), rtol=1e-6)
    assert suite.task("a").scale is None
    saved = json.loads(json.dumps(suite.preprocessing()))
    assert saved["tasks"]["price"]["standardize"] == {"mean": list(price.scale.mean), "std": list(price.scale.std)}
    assert saved["tasks"]["b"]["classes"] == [0, 1, 2, 3] and saved["tasks"]["b"]["standardize"] is None
    assert saved["features"] == [f"f{i}" for i in range(6)]
    assert saved["input_standardize"]["mean"] == pytest.approx(
        raw[saved["features"]].to_numpy()[train.index.numpy()].mean(0).tolist())

    off = build_suite("table", {"path": str(csv), "targets": TARGETS, "standardize_targets": False}, 0)
    assert off.task("price").scale is None
    assert torch.allclose(off.splits["train"][0].y["price"], torch.tensor(truth, dtype=torch.float32))


def test_metrics_are_in_the_original_units(csv: Path) -> None:
    """A model that predicts 0 on the standardised scale predicts the train mean: its MSE and MAE are those of
    the train mean against the raw test prices, computed here from the CSV."""
    suite = build_suite("table", {"path": str(csv), "targets": TARGETS}, 0)

    class Zero(torch.nn.Module):
        def forward(self, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
            return {n: torch.zeros(len(x), suite.task(n).n_outputs) for n in names}

    (test,) = suite.splits["test"]
    raw = _frame()["price"].to_numpy()
    mean = raw[suite.splits["train"][0].index.numpy()].mean()
    scores = evaluate(Zero(), suite.splits["test"], [suite.task("price")])["price"]
    assert scores["mse"] == pytest.approx(((raw[test.index.numpy()] - mean) ** 2).mean(), rel=1e-6)
    assert scores["mae"] == pytest.approx(np.abs(raw[test.index.numpy()] - mean).mean(), rel=1e-6)
    assert scores["loss"] == pytest.approx(scores["mse"] / suite.task("price").scale.std[0] ** 2, rel=1e-5)


def test_a_6000_target_learns_to_its_noise_floor_without_hurting_joint_classification(
        csv: Path, tmp_path: Path) -> None:
    """Unscaled (the behaviour before), the price's single-task MSE was 4e7, above its variance of 4.4e6,
    and joint training lost 40 % on the classification losses; standardised, both are near their floor."""
    config = Config.model_validate({
        "suite": {"name": "table", "params": {"path": str(csv), "targets": TARGETS}},
        "model": {"backbone_params": {"hidden": [32]}},
        "train": {"epochs": 8, "batch_size": 64, "optimizer": {"lr": 0.01}},
        "methods": ["equal"], "baselines": {"cache": False}, "output": {"dir": str(tmp_path), "name": "r"},
    })
    run_dir, summary = run(config, reporter=Reporter(quiet=True), report=False)
    stl, joint = summary["results"]["stl"]["tasks"], summary["results"]["equal"]["tasks"]
    assert NOISE**2 * 0.5 < stl["price"]["mse"] < NOISE**2 * 1.5  # original units (standardised: ~0.03)
    assert joint["price"]["mse"] < NOISE**2 * 2.0
    for t in ("a", "b"):
        assert joint[t]["loss"] < 1.2 * stl[t]["loss"] and joint[t]["accuracy"] > stl[t]["accuracy"] - 0.03
    saved = json.loads((run_dir / "preprocessing.json").read_text())
    assert saved["tasks"]["price"]["standardize"]["mean"][0] == pytest.approx(6000, rel=0.05)
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert min(r["mse"] for r in val if r["split"] == "val" and r["task"] == "price") > NOISE**2 * 0.5


def _split_of_rows(csv: Path) -> dict[str, np.ndarray]:
    suite = build_suite("table", {"path": str(csv), "targets": TARGETS}, 0)
    return {s: suite.splits[s][0].index.numpy() for s in ("train", "val", "test")}


def test_a_target_without_labelled_validation_rows_is_a_data_error_naming_it(csv: Path, tmp_path: Path) -> None:
    rows = _split_of_rows(csv)
    frame = _frame()
    frame.loc[rows["val"], "price"] = np.nan
    frame["few"] = np.nan
    frame.loc[rows["train"][:3], "few"] = [0, 1, 0]
    path = tmp_path / "holes.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"task 'price' has no labelled rows in the val split \(labelled rows: "
                                        r"train 1200, val 0, test 400\)"):
        build_suite("table", {"path": str(path), "targets": TARGETS, "features": FEATURES}, 0)
    with pytest.raises(DataError, match=r"task 'few' has no labelled rows in the val and test splits"):
        build_suite("table", {"path": str(path), "targets": {"a": "auto", "few": "classification"},
                              "features": FEATURES}, 0)


def test_task_rejects_a_scale_or_classes_that_do_not_fit() -> None:
    with pytest.raises(DataError, match="'t': a target standardizer of 2 column"):
        Task("t", "regression", 1, scale=Standardizer((0.0, 0.0), (1.0, 1.0)))
    with pytest.raises(DataError, match="'c': 2 class labels for a classification task with 3 outputs"):
        Task("c", "classification", 3, classes=("x", "y"))


def test_cli_prints_one_error_line_for_bad_data_and_seeds(csv: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from polytask.cli import app

    rows = _split_of_rows(csv)
    frame = _frame()
    frame.loc[rows["val"], "price"] = np.nan
    frame.to_csv(tmp_path / "noval.csv", index=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"suite: {{name: table, params: {{path: {tmp_path / 'noval.csv'}, targets: {TARGETS}}}}}\n"
                      f"seed: 0\nmethods: [equal]\noutput: {{dir: {tmp_path}}}\n")
    cases = {("--set", "seed=-1"): "error: seed: ", ("--set", "seed.x=1"): "error: --set seed.x: seed is a value",
             (): "error: suite 'table': task 'price' has no labelled rows in the val split"}
    for args, start in cases.items():
        result = CliRunner().invoke(app, ["run", str(config), "--quiet", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(start), result.output


def test_two_class_targets_can_be_scored_by_auc(tmp_path: Path) -> None:
    """``auc: true`` adds ROC AUC after accuracy for every two-class target (not for regression or 3+ classes); its
    value is scikit-learn's on the same scores."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=n)
    frame = pd.DataFrame({"x": x, "rare": (x + rng.normal(size=n) > 1.5).astype(int),
                          "three": rng.integers(0, 3, n), "value": x * 2.0})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    targets = {"rare": "classification", "three": "classification", "value": "regression"}
    plain = build_suite("table", {"path": str(path), "targets": targets}, 0)
    suite = build_suite("table", {"path": str(path), "targets": targets, "auc": True}, 0)
    names = {t.name: [m.name for m in t.metrics] for t in suite.tasks}
    assert names == {"rare": ["accuracy", "auc"], "three": ["accuracy"], "value": ["mse", "mae"]}
    assert [m.name for m in plain.task("rare").metrics] == ["accuracy"]
    test = suite.splits["test"][0]
    out = torch.randn(len(test.x), 2, generator=torch.Generator().manual_seed(1))
    y = test.y["rare"]
    got = suite.task("rare").scores(out, y)["auc"]
    assert got == pytest.approx(roc_auc_score(y.numpy(), (out[:, 1] - out[:, 0]).numpy()), abs=1e-12)
