"""Config validation: unknown keys with suggestions, bad values naming the key, overrides."""

import pytest

from polytask.config import Config, apply_override, dump_config, load_config
from polytask.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_default_experiment_is_the_packaged_advise_study():
    cfg = load_config()
    assert cfg.flow == "advise" and cfg.suite.name == "synthetic" and cfg.group.estimator in cfg.relate.estimators
    assert Config().flow == "compare" and Config().suite.name == "multidigits"  # the keys' own defaults


def test_unknown_key_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*did you mean 'epochs'"):
        load_config(write(tmp_path, "train:\n  epoch: 3\n"))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'sead'.*'seed'"):
        load_config(write(tmp_path, "sead: 1\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs: .*integer.*'three'"):
        load_config(write(tmp_path, "train:\n  epochs: three\n"))


def test_bad_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.optimizer.lr: .*greater than 0"):
        load_config(write(tmp_path, "train:\n  optimizer:\n    lr: -1\n"))


def test_unknown_suite_param_names_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'suite.params.n_trian'.*'n_train'"):
        load_config(write(tmp_path, "suite:\n  name: multidigits\n  params:\n    n_trian: 10\n"))


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown method 'equl'.*'equal'"):
        load_config(write(tmp_path, "methods: [equl]\n"))


def test_static_weights_must_name_every_task(tmp_path):
    from polytask.weighting import build_weighting

    with pytest.raises(ConfigError, match="no weight for task 'right'"):
        build_weighting("static", {"weights": {"left": 1.0}}, ["left", "right"])


def test_duplicate_method_labels(tmp_path):
    with pytest.raises(ConfigError, match=r"label 'equal' is used twice"):
        load_config(write(tmp_path, "methods: [equal, equal]\n"))


def test_overrides():
    cfg = load_config(None, ["train.epochs=3", "methods.0.label=eq", "suite.params.n_train=100", "seed=7"])
    assert cfg.train.epochs == 3 and cfg.methods[0].label == "eq" and cfg.suite.params["n_train"] == 100
    assert cfg.seed == 7


def test_override_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epochz'"):
        load_config(None, ["train.epochz=3"])
    with pytest.raises(ConfigError, match="has no item 5"):
        apply_override({"methods": []}, "methods.5.name=x")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=2"])
    p = write(tmp_path, dump_config(cfg))
    assert load_config(p) == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))


def test_device_values():
    from polytask.engine.loop import resolve_device

    with pytest.raises(ConfigError, match=r"train.device: String should match"):
        load_config(None, ["train.device=gpu"])
    assert str(resolve_device(load_config(None, ["train.device=auto"]).train.device)) in ("cpu", "cuda")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_seed_out_of_range_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^seed: .*greater than or equal to 0 \(got -1\)$"):
        load_config(None, ["seed=-1"])
    with pytest.raises(ConfigError, match=r"^seed: .*less than or equal to 4294967295"):
        load_config(None, [f"seed={2**32}"])
    with pytest.raises(ConfigError, match=r"^group\.seeds\.1: .*greater than or equal to 0"):
        load_config(write(tmp_path, "group: {seeds: [0, -3]}\n"))


def test_override_through_a_value_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"--set seed\.x: seed is a value \(0\), not a section"):
        load_config(None, ["seed.x=1"])
    with pytest.raises(ConfigError, match=r"--set train\.epochs\.n: train\.epochs is a value \(\d+\)"):
        load_config(None, ["train.epochs.n=1"])
