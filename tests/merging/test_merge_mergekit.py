"""Users arriving from mergekit: its YAML layout and method names run unchanged; typos suggest the method meant."""

import subprocess
import sys

import pytest
import torch
import yaml

from polytask.errors import ConfigError
from polytask.merging import load_merge_config, merge_state_dicts, open_checkpoint, run_merge_config
from polytask.merging.methods import canonical_method


def _read(path):
    with open_checkpoint(path) as c:
        return {n: c.load(n) for n in c.names()}


def _mergekit_yaml(tmp_path, method, base_path, paths, shared=None, per_model=None, **top):
    cfg = {"merge_method": method, "base_model": str(base_path), "dtype": "float32",
           "models": [{"model": str(base_path)}]  # mergekit configs often list the base too: it is skipped
           + [{"model": str(p), "parameters": pm} for p, pm in zip(paths, per_model, strict=True)], **top}
    if shared:
        cfg["parameters"] = shared
    f = tmp_path / f"{method}.yml"
    f.write_text(yaml.safe_dump(cfg))
    return f


W = [1.0, 0.5, 0.8]
# mergekit method, its shared and per-model parameters, and the polytask merge they mean
CASES = [
    ("linear", {}, [{"weight": w} for w in W], "average", {}, [{}] * 3, False),
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": w} for w in W], "task_arithmetic", {"lambda": 0.7},
     [{}] * 3, True),
    ("ties", {"lambda": 0.9}, [{"weight": w, "density": d} for w, d in zip(W, (0.2, 0.5, 0.3), strict=True)],
     "ties", {"lambda": 0.9, "normalize": True}, [{"density": d} for d in (0.2, 0.5, 0.3)], True),
    ("ties", {"normalize": False, "density": 0.4}, [{"weight": w} for w in W],  # density shared by every model
     "ties", {"normalize": False}, [{"density": 0.4}] * 3, True),
    ("dare_ties", {}, [{"weight": w, "density": 1.0} for w in W], "dare_ties",
     {"drop_rate": 0.0, "density": 1.0, "normalize": False}, [{}] * 3, True),
    ("dare_linear", {}, [{"weight": w, "density": 0.7} for w in W], "dare", {"drop_rate": 0.3}, [{}] * 3, True),
    ("breadcrumbs", {}, [{"weight": w, "density": 0.8, "gamma": 0.05} for w in W], "breadcrumbs",
     {"density": 0.8, "gamma": 0.05}, [{}] * 3, True),
    ("breadcrumbs_ties", {}, [{"weight": w, "density": 0.7, "gamma": 0.02} for w in W], "generalized",
     {"sparsify": ["band"], "consensus": True, "normalize": False, "density": 0.7, "gamma": 0.02}, [{}] * 3, True),
]


@pytest.mark.parametrize("mk,shared,per_model,method,params,model_params,needs_base", CASES,
                         ids=[c[0] + ("-shared" if c[1].get("density") else "") for c in CASES])
def test_a_mergekit_config_runs_unchanged(make_family, tmp_path, mk, shared, per_model, method, params,
                                          model_params, needs_base):
    base_path, paths, base, models = make_family(3, "hf")
    f = _mergekit_yaml(tmp_path, mk, base_path, paths, shared, per_model)
    if mk == "linear":  # linear has no task vectors: the base listed among the models is averaged too
        text = yaml.safe_load(f.read_text())
        text["models"] = text["models"][1:]
        f.write_text(yaml.safe_dump(text))
    cfg = load_merge_config(f, output=tmp_path / "out")
    out, _ = run_merge_config(cfg)
    want = merge_state_dicts(method, base if needs_base else None, models, params, W, model_params, seed=0)
    got = _read(out)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want), mk


def test_the_cli_takes_a_mergekit_config_and_an_output_like_mergekit_yaml(make_family, tmp_path):
    base_path, paths, *_ = make_family(2, "hf")
    f = _mergekit_yaml(tmp_path, "dare_ties", base_path, paths, {"int8_mask": True},
                       [{"weight": 0.5, "density": 0.5}] * 2, out_dtype="bfloat16")
    r = subprocess.run([sys.executable, "-m", "polytask.cli", "merge", str(f), "merged"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "with dare_ties" in r.stdout and "note: DARE" in r.stdout
    got = _read(tmp_path / "merged")
    assert got["embed.weight"].dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"give it on the command line, polytask merge CONFIG OUTPUT"):
        load_merge_config(f)  # no output: the CLI prints this one line (exit 2), as for every ConfigError


@pytest.mark.parametrize("change,message", [
    ({"merge_method": "slerp"}, "merge_method: mergekit's 'slerp' has no polytask counterpart"),
    ({"merge_method": "ties_merging"}, "(did you mean 'ties'?)"),
    ({"slices": [{"sources": []}]}, "slices: mergekit's layer slicing is not supported"),
    ({"parameters": {"weight": [0.1, 0.9]}}, "parameters.weight: mergekit's per-layer gradients"),
    ({"parameters": {"rescale": True}}, "rescale: true (rescaling the trimmed task vector to its L1 norm)"),
    ({"tokenizer_source": "union"}, "tokenizer_source: 'union' is not supported"),
    ({"mergemethod": "x"}, "unknown key 'mergemethod' (did you mean 'merge_method'?)"),
])
def test_what_polytask_cannot_do_the_same_way_is_an_error_naming_the_key(make_family, tmp_path, change, message):
    base_path, paths, *_ = make_family(1, "hf")
    f = _mergekit_yaml(tmp_path, "ties", base_path, paths, None, [{"weight": 1.0}])
    data = {**yaml.safe_load(f.read_text()), **change}
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_merge_config(f, output=tmp_path / "out")
    assert message in str(e.value)


@pytest.mark.parametrize("typo,meant", [("ties_merging", "ties"), ("TIES-Merging", "ties"), ("tie", "ties"),
                                        ("adamergin", "adamerging"), ("task-arithmetic", "task_arithmetic"),
                                        ("Fisher merging", "fisher"), ("regmeen", "regmean"),
                                        ("model_soup", "average")])
def test_method_typos_suggest_the_method_meant(typo, meant):
    with pytest.raises(ConfigError, match=rf"unknown merge method '{typo}' \(did you mean '{meant}'\?\)"):
        canonical_method(typo)


def test_mergekit_names_are_accepted_in_polytask_configs_too():
    assert canonical_method("linear") == "average" and canonical_method("dare_linear") == "dare"
    with pytest.raises(ConfigError, match=r"mergekit's breadcrumbs_ties is generalized with params"):
        canonical_method("breadcrumbs_ties")
