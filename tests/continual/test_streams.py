"""The built-in streams (split/permuted/rotated MNIST from a user's file, MNIST-1D domains, a table split by a
column or by class) and a user's own Datasets as a stream: structure per scenario, seeded and recorded order and
transforms, and errors that name what is at fault. MNIST is faked: a few random 28x28 images per class."""

import struct

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from polytask.continual import STREAMS, build_stream, stream_from_datasets
from polytask.continual.config import ContinualConfig
from polytask.continual.streams.mnist import pixel_permutation, rotate
from polytask.continual.streams.mnist1d import Mnist1dSettings, mnist1d_signals, templates
from polytask.errors import ConfigError, DataError
from polytask.flows.continual import continual
from polytask.tasks import Task

N_TRAIN, N_TEST = 12, 4  # images per class


def _fake_mnist(seed=0):
    rng = np.random.default_rng(seed)
    y_train = np.repeat(np.arange(10), N_TRAIN).astype(np.uint8)
    y_test = np.repeat(np.arange(10), N_TEST).astype(np.uint8)
    return {"x_train": rng.integers(0, 256, (len(y_train), 28, 28), dtype=np.uint8), "y_train": y_train,
            "x_test": rng.integers(0, 256, (len(y_test), 28, 28), dtype=np.uint8), "y_test": y_test}


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """(path of an .npz, path of a directory of IDX files, the arrays) of one fake MNIST."""
    arrays = _fake_mnist()
    root = tmp_path_factory.mktemp("mnist")
    np.savez(root / "mnist.npz", **arrays)
    idx = root / "idx"
    idx.mkdir()
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for key, name in names.items():
        a = arrays[key]
        (idx / name).write_bytes(bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())
    return str(root / "mnist.npz"), str(idx), arrays


def _images(arrays):
    """The fake MNIST as the streams index it: train rows, then test rows, as floats in [0, 1]."""
    return torch.from_numpy(np.concatenate([arrays["x_train"], arrays["x_test"]])).float() / 255


def _sources(e, split):
    (d,) = e.suite.splits[split]
    return d


# ---------------------------------------------------------------- split-mnist


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_split_mnist_in_every_scenario_from_npz_and_idx(mnist, scenario):
    npz, idx, arrays = mnist
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    s = build_stream("split-mnist", {"path": npz, "scenario": scenario, "shuffle": True}, seed=3)
    assert s.scenario == scenario and len(s.experiences) == 5 and s.input_shape == (784,)
    assert len(s.tasks) == (5 if scenario == "task" else 1)
    seen = set()
    for e, group in zip(s.experiences, s.info["groups"], strict=True):
        index = torch.cat([_sources(e, split).index for split in ("train", "val", "test")])
        assert set(labels[index.numpy()].tolist()) == set(group)
        assert not seen & set(index.tolist())
        seen |= set(index.tolist())
        test = _sources(e, "test")
        assert (test.index >= 10 * N_TRAIN).all()  # the test split is MNIST's test set
        assert torch.equal(test.x, _images(arrays)[test.index].reshape(-1, 784))
    assert len(seen) == len(labels)
    same = build_stream("split-mnist", {"path": idx, "scenario": scenario, "shuffle": True}, seed=3)
    for a, b in zip(s.experiences, same.experiences, strict=True):
        assert torch.equal(_sources(a, "train").x, _sources(b, "train").x)
    assert s.info["groups"] == same.info["groups"]
    assert build_stream("split-mnist", {"path": npz, "shuffle": True}, seed=4).info["groups"] != s.info["groups"]


def test_split_mnist_subsamples_per_class_and_keeps_images(mnist):
    npz, _, _ = mnist
    s = build_stream("split-mnist", {"path": npz, "n_train_per_class": 5, "n_test_per_class": 2, "flatten": False},
                     seed=0)
    assert s.input_shape == (1, 28, 28)
    for e in s.experiences:
        (task,) = e.tasks
        counts = torch.bincount(_sources(e, "test").y[task.name].long())
        assert counts[counts > 0].tolist() == [2, 2]
        train_val = sum(len(_sources(e, sp)) for sp in ("train", "val"))
        assert train_val == 2 * 5  # at most n_train_per_class of each class, val carved from them


# ---------------------------------------------------------------- permuted and rotated MNIST


def test_permuted_mnist_applies_one_seeded_permutation_to_every_split(mnist):
    npz, _, arrays = mnist
    images = _images(arrays).reshape(-1, 784)
    s = build_stream("permuted-mnist", {"path": npz, "n_experiences": 3}, seed=5)
    assert s.scenario == "domain" and [t.name for t in s.tasks] == ["digit"]
    assert [p["rng"] for p in s.info["permutations"]] == [[5, 0], [5, 1], [5, 2]]
    assert [p["identity"] for p in s.info["permutations"]] == [True, False, False]
    for i, e in enumerate(s.experiences):
        perm = pixel_permutation(5, i, 784, identity=i == 0)
        for split in ("train", "val", "test"):
            d = _sources(e, split)
            assert torch.equal(d.x, images[d.index][:, perm])
            assert torch.equal(d.y["digit"], torch.from_numpy(
                np.concatenate([arrays["y_train"], arrays["y_test"]])[d.index.numpy()]).float())
    assert not torch.equal(pixel_permutation(5, 1, 784), pixel_permutation(5, 2, 784))
    again = build_stream("permuted-mnist", {"path": npz, "n_experiences": 3}, seed=5)
    other = build_stream("permuted-mnist", {"path": npz, "n_experiences": 3, "first_identity": False}, seed=6)
    assert torch.equal(_sources(again.experiences[2], "train").x, _sources(s.experiences[2], "train").x)
    assert not torch.equal(_sources(other.experiences[2], "train").x, _sources(s.experiences[2], "train").x)
    assert not other.info["permutations"][0]["identity"]


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_transformed_streams_in_the_task_and_class_scenarios(mnist, scenario):
    npz, _, _ = mnist
    s = build_stream("permuted-mnist", {"path": npz, "n_experiences": 2, "scenario": scenario}, seed=0)
    if scenario == "task":
        assert [t.name for t in s.tasks] == ["e0", "e1"] and all(t.n_outputs == 10 for t in s.tasks)
    else:
        (task,) = s.tasks
        assert task.n_outputs == 20 and task.classes[10] == "p1:0"
        y1 = _sources(s.experiences[1], "train").y["class"]
        assert set(y1.long().tolist()) == set(range(10, 20))


def test_rotation_by_0_is_the_identity_and_by_90_is_rot90():
    x = torch.rand(3, 28, 28)
    assert torch.allclose(rotate(x, 0), x, atol=1e-6)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, (-2, -1)), atol=1e-6)
    assert torch.allclose(rotate(x, -90), torch.rot90(x, -1, (-2, -1)), atol=1e-6)
    assert torch.allclose(rotate(x, 180), torch.rot90(x, 2, (-2, -1)), atol=1e-6)
    r, c = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = torch.exp(-((r - 9) ** 2 + (c - 17) ** 2) / 18)[None]  # smooth, off-centre: interpolation is accurate
    assert torch.allclose(rotate(rotate(blob, 45), 45), torch.rot90(blob, 1, (-2, -1)), atol=0.06)
    assert not torch.allclose(rotate(blob, 45), blob, atol=0.1)
    wide = torch.rand(1, 4, 6)  # a non-square image keeps its pixels square: 180 degrees flips both axes
    assert torch.allclose(rotate(wide, 180), torch.flip(wide, (-2, -1)), atol=1e-6)


def test_rotated_mnist_records_its_angles_and_rotates_every_split(mnist):
    npz, _, arrays = mnist
    images = _images(arrays)
    s = build_stream("rotated-mnist", {"path": npz, "n_experiences": 3, "angle_step": 30}, seed=0)
    assert s.info["angles"] == [0.0, 30.0, 60.0] and len(s.experiences) == 3
    given = build_stream("rotated-mnist", {"path": npz, "angles": [90, 10]}, seed=0)
    assert given.info["angles"] == [90.0, 10.0]
    for split in ("train", "test"):
        d = _sources(given.experiences[0], split)
        assert torch.allclose(d.x, torch.rot90(images[d.index], 1, (-2, -1)).reshape(-1, 784), atol=1e-6)
        d = _sources(s.experiences[1], split)
        assert torch.allclose(d.x, rotate(images[d.index], 30).reshape(-1, 784), atol=1e-6)


def test_mnist_errors_name_the_file(mnist, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_stream("split-mnist", {"path": str(tmp_path / "nope.npz")}, seed=0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"bad.npz lacks the array\(s\)"):
        build_stream("permuted-mnist", {"path": str(bad)}, seed=0)
    with pytest.raises(ConfigError, match=r"stream\.params\.class_order"):
        build_stream("split-mnist", {"path": mnist[0], "class_order": [0, 1]}, seed=0)
    with pytest.raises(ConfigError, match="n_experimentz"):
        build_stream("permuted-mnist", {"path": mnist[0], "n_experimentz": 2}, seed=0)


# ---------------------------------------------------------------- MNIST-1D


def test_mnist1d_without_nuisances_is_its_templates():
    clean = Mnist1dSettings(padding=(0, 0), scale_coeff=0, max_translation=1, corr_noise_scale=0,
                            iid_noise_scale=0, shear_scale=0, final_seq_length=12)
    labels = np.array([3, 0, 9, 3])
    x = mnist1d_signals(labels, clean, np.random.default_rng(0))
    assert np.allclose(x, templates()[labels], atol=1e-7)
    shifted = Mnist1dSettings(**{**clean.model_dump(), "max_translation": 12})
    rolled = mnist1d_signals(np.repeat(labels[:1], 50), shifted, np.random.default_rng(0))
    rows = {tuple(np.round(r, 6)) for r in rolled}
    assert all(any(np.allclose(r, np.roll(templates()[3], k), atol=1e-6) for k in range(12)) for r in rolled)
    assert len(rows) > 3  # the translation is drawn per signal


def test_mnist1d_domains_are_seeded_recorded_and_standardised_on_the_first():
    params = {"n_experiences": 3, "n_train_per_class": 20, "n_val_per_class": 3, "n_test_per_class": 5}
    s = build_stream("mnist1d", params, seed=1)
    assert s.scenario == "domain" and s.input_shape == (40,) and len(s.experiences) == 3
    assert [d["padding"] for d in s.info["domains"]] == [[0, 20], [20, 40], [40, 60]]
    x0 = _sources(s.experiences[0], "train").x
    assert abs(float(x0.mean())) < 1e-5 and float(x0.std(correction=0)) == pytest.approx(1, abs=1e-4)
    assert torch.bincount(_sources(s.experiences[2], "test").y["digit"].long()).tolist() == [5] * 10
    again = build_stream("mnist1d", params, seed=1)
    assert torch.equal(_sources(again.experiences[2], "train").x, _sources(s.experiences[2], "train").x)
    assert not torch.equal(_sources(build_stream("mnist1d", params, seed=2).experiences[0], "train").x, x0)
    given = build_stream("mnist1d", {**params, "domains": [{}, {"max_translation": 2}]}, seed=1)
    assert [d["max_translation"] for d in given.info["domains"]] == [48, 2]


def test_mnist1d_domains_of_different_lengths_and_unknown_settings_are_refused():
    with pytest.raises(DataError, match=r"experience 'd1' has inputs of shape \(30,\)"):
        build_stream("mnist1d", {"domains": [{}, {"final_seq_length": 30}], "n_train_per_class": 2,
                                 "n_val_per_class": 1, "n_test_per_class": 1}, seed=0)
    with pytest.raises(ConfigError, match=r"domains\.1\.shear_scal"):
        build_stream("mnist1d", {"domains": [{}, {"shear_scal": 2}]}, seed=0)


# ---------------------------------------------------------------- a user's table


def _table(tmp_path, extra=None):
    rng = np.random.default_rng(0)
    n = 90
    region = np.repeat(["north", "south", "east"], n // 3)
    f1, f2 = rng.normal(size=n) + (region == "east") * 3, rng.normal(size=n)
    frame = pd.DataFrame({"f1": f1, "f2": f2, "region": region,
                          "y": np.where(f1 + f2 > 0, "hi", "lo"), "cls": np.arange(n) % 4,
                          "amount": 1000 + 200 * f2})
    if extra is not None:
        frame = pd.concat([frame, pd.DataFrame(extra)], ignore_index=True)
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return path, frame


def test_table_split_by_a_column_gives_one_experience_per_value(tmp_path):
    path, frame = _table(tmp_path)
    base = {"path": str(path), "target": "y", "by": "region", "features": ["f1", "f2"]}
    s = build_stream("table", base, seed=0)
    assert s.scenario == "domain" and [e.name for e in s.experiences] == ["east", "north", "south"]
    assert s.info["order"] == ["east", "north", "south"] and s.input_shape == (2,)
    seen = set()
    for e in s.experiences:
        rows = torch.cat([_sources(e, sp).index for sp in ("train", "val", "test")]).numpy()
        assert sorted(rows.tolist()) == np.flatnonzero(frame["region"] == e.name).tolist()
        assert not seen & set(rows.tolist())
        seen |= set(rows.tolist())
    assert len(seen) == len(frame)
    # standardised with the first experience's training rows only: they are centred, the later ones are not
    assert torch.allclose(_sources(s.experiences[0], "train").x.mean(0), torch.zeros(2), atol=1e-5)
    assert float(_sources(s.experiences[1], "train").x[:, 0].mean()) < -1
    given = build_stream("table", {**base, "order": ["south", "east", "north"]}, seed=0)
    assert [e.name for e in given.experiences] == ["south", "east", "north"]
    shuffled = [build_stream("table", {**base, "shuffle": True}, seed=k).info["order"] for k in range(6)]
    assert len({tuple(o) for o in shuffled}) > 1 and shuffled[0] == build_stream(
        "table", {**base, "shuffle": True}, seed=0).info["order"]
    heads = build_stream("table", {**base, "scenario": "task"}, seed=0)
    assert [t.name for t in heads.tasks] == ["y@east", "y@north", "y@south"]
    regression = build_stream("table", {**base, "target": "amount", "features": ["f1"]}, seed=0)
    (task,) = regression.tasks
    assert task.kind == "regression" and task.scale is not None
    first = regression.experiences[0]
    assert float(_sources(first, "train").y["amount"].mean()) == pytest.approx(0, abs=1e-5)


def test_table_split_by_the_target_is_class_incremental(tmp_path):
    path, frame = _table(tmp_path)
    s = build_stream("table", {"path": str(path), "target": "cls", "by": "cls", "features": ["f1", "f2"],
                               "order": [3, 1, 0, 2]}, seed=0)
    assert s.scenario == "class" and s.info["groups"] == [[3, 1], [0, 2]]
    (task,) = s.tasks
    assert task.classes == (3, 1, 0, 2)
    for e, want in zip(s.experiences, ({3, 1}, {0, 2}), strict=True):
        rows = torch.cat([_sources(e, sp).index for sp in ("train", "val", "test")]).numpy()
        assert set(frame["cls"].to_numpy()[rows].tolist()) == want
    texts = build_stream("table", {"path": str(path), "target": "y", "by": "y", "classes_per_experience": 1,
                                   "features": ["f1", "f2"]}, seed=0)
    assert texts.tasks[0].classes == ("hi", "lo")


def test_table_errors_name_the_column_value_or_class_at_fault(tmp_path):
    path, _ = _table(tmp_path, extra={"f1": [0.1, 0.2], "f2": [0.0, 0.3], "region": ["west", "west"],
                                      "y": ["hi", "lo"], "cls": [9, 9], "amount": [1.0, 2.0]})
    base = {"path": str(path), "target": "y", "features": ["f1", "f2"]}
    with pytest.raises(DataError, match="no column 'regoin'; close matches: 'region'"):
        build_stream("table", {**base, "by": "regoin"}, seed=0)
    with pytest.raises(DataError, match="region = 'west' has 2 row"):
        build_stream("table", {**base, "by": "region"}, seed=0)
    with pytest.raises(DataError, match="class 9 of 'cls' has 2 row"):
        build_stream("table", {**base, "target": "cls", "by": "cls"}, seed=0)
    with pytest.raises(ConfigError, match=r"stream\.params\.order.*missing \['west'\]"):
        build_stream("table", {**base, "by": "region", "order": ["north", "south", "east"]}, seed=0)
    with pytest.raises(ConfigError, match="'amount' is a regression target"):
        build_stream("table", {**base, "target": "amount", "by": "amount"}, seed=0)
    with pytest.raises(ConfigError, match="class-incremental splits the target"):
        build_stream("table", {**base, "by": "region", "scenario": "class"}, seed=0)


# ---------------------------------------------------------------- a user's Datasets


class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _blobs(classes, n, seed, dim=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat(n)
    return Pairs(torch.randn(len(y), dim, generator=g) + 3 * torch.nn.functional.one_hot(y, dim).float(), y)


def _class_experiences(dim=4, seeds=(0, 1)):
    return [tuple(_blobs(c, 8, s + k, dim) for k in range(3)) for c, s in zip(([0, 1], [2, 3]), seeds, strict=True)]


def test_a_users_datasets_train_end_to_end_through_the_flow(tmp_path):
    task = Task("class", "classification", 4)
    stream = stream_from_datasets("blobs", "class", _class_experiences(), task)
    assert [e.name for e in stream.experiences] == ["e0", "e1"] and stream.input_shape == (4,)
    (d,) = stream.experiences[1].suite.splits["train"]
    assert set(d.y["class"].long().tolist()) == {2, 3}
    cfg = ContinualConfig.model_validate({
        "seeds": [0], "model": {"backbone": "mlp", "backbone_params": {"hidden": [8]}},
        "train": {"epochs": 1, "batch_size": 8}, "strategies": ["naive"],
        "output": {"dir": str(tmp_path), "name": "blobs"}})
    run_dir, summary = continual(cfg, stream=stream)
    (result,) = summary["results"]["naive"]
    assert summary["stream"]["name"] == "blobs" and len(result["accuracy"]) == 2
    assert all(len(row) == 2 for row in result["accuracy"]) and (run_dir / "jobs" / "naive-s0" / "e1").is_dir()
    # a task-incremental stream: one Task per experience, (x, {task: y}) items
    t0, t1 = Task("a", "classification", 4), Task("b", "classification", 4)
    multi = stream_from_datasets("heads", "task", {"first": _class_experiences()[0][:2],
                                                   "second": _class_experiences()[1]}, [t0, [t1]])
    assert [t.name for t in multi.tasks] == ["a", "b"] and [e.name for e in multi.experiences] == ["first", "second"]


def test_bad_user_datasets_are_errors_naming_the_experience():
    task = Task("class", "classification", 4)
    good = _class_experiences()
    with pytest.raises(DataError, match=r"experience 'e1'.*empty"):
        stream_from_datasets("s", "class", [good[0], (Pairs([], []), good[1][1], good[1][2])], task)
    with pytest.raises(DataError, match="experience 'e1' has inputs of shape \\(5,\\)"):
        stream_from_datasets("s", "class", [good[0], _class_experiences(dim=5)[1]], task)
    earlier = (good[1][0], good[1][1], _blobs([0, 3], 4, 9))  # e1 tests class 0, which only e0 trains: allowed
    (d,) = stream_from_datasets("s", "class", [good[0], earlier], task).experiences[1].suite.splits["test"]
    assert set(d.y["class"].long().tolist()) == {0, 3}
    never = (good[0][0], good[0][1], _blobs([1, 3], 4, 9))  # class 3 is tested but trained by no experience
    with pytest.raises(DataError, match=r"experience 'e0' tests class\(es\) \[3\]"):
        stream_from_datasets("s", "class", [never], task)
    with pytest.raises(ConfigError, match="tasks has 1 entries for 2 experiences"):
        stream_from_datasets("s", "task", good, [task])


def test_every_stream_is_listed_with_a_summary():
    for name in ("split-digits", "split-mnist", "permuted-mnist", "rotated-mnist", "mnist1d", "table"):
        assert STREAMS.get(name).summary


def test_a_config_names_a_file_stream_and_trains_it(mnist, tmp_path):
    cfg = ContinualConfig.model_validate({
        "seeds": [0], "stream": {"name": "rotated-mnist", "params": {"path": mnist[0], "angles": [0, 45],
                                                                     "n_train_per_class": 5}},
        "model": {"backbone": "mlp", "backbone_params": {"hidden": [8]}},
        "train": {"epochs": 1, "batch_size": 16}, "strategies": ["naive"],
        "output": {"dir": str(tmp_path), "name": "rot"}})
    _, summary = continual(cfg)
    assert summary["stream"]["info"]["angles"] == [0.0, 45.0]
    assert len(summary["results"]["naive"][0]["accuracy"]) == 2


def test_a_table_stream_runs_from_the_cli(tmp_path):
    """`polytask continual` on a user's CSV split by a column: one matrix row and column per value, in the report."""
    import json
    import subprocess
    import sys

    import yaml

    path, _ = _table(tmp_path)
    config = {"stream": {"name": "table", "params": {"path": str(path), "target": "y", "by": "region",
                                                       "features": ["f1", "f2"]}},
              "model": {"backbone": "mlp", "backbone_params": {"hidden": [8]}},
              "train": {"epochs": 1, "batch_size": 16}, "strategies": ["naive", "ewc"],
              "output": {"dir": str(tmp_path), "name": "regions"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "polytask.cli", "continual", str(tmp_path / "c.yaml"), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "table (domain-incremental, 3 experiences)" in out.stdout and "ewc" in out.stdout
    summary = json.loads((tmp_path / "regions" / "summary.json").read_text())
    assert [e["name"] for e in summary["stream"]["experiences"]] == ["east", "north", "south"]
    for label in ("naive", "ewc"):
        (run,) = summary["results"][label]
        assert np.asarray(run["accuracy"]).shape == (3, 3)
    assert "regions" in (tmp_path / "regions" / "report.html").read_text()
