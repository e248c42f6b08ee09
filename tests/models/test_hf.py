"""The ``hf`` backbone and the ``text`` suite on a tiny random BERT saved to a temporary directory: what trains
(frozen, top layers, LoRA), pooling, errors naming the path, and a CLI run predicted from on new text."""

from __future__ import annotations

import json
import random
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import polytask
from polytask.cli import app
from polytask.config import Config, MethodConfig, check
from polytask.engine.loop import train_job
from polytask.errors import ConfigError, DataError
from polytask.flows.jobs import Job, spec_from_config
from polytask.models import build_backbone, build_model
from polytask.tasks import build_suite

ROOT = Path(__file__).resolve().parents[2]
NOUNS = {"sport": ["match", "team", "goal"], "music": ["album", "song", "band"], "film": ["movie", "actor", "scene"]}
ADJECTIVES = {"good": ["great", "wonderful", "excellent"], "bad": ["awful", "boring", "terrible"]}


def text_table(n: int, seed: int) -> pd.DataFrame:
    """Templated sentences labelled with their topic and sentiment; ~1/5 of the sentiments missing."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, mood = rng.choice(list(NOUNS)), rng.choice(list(ADJECTIVES))
        words = [rng.choice(NOUNS[topic]), rng.choice(["really", "quite", ""]), rng.choice(ADJECTIVES[mood])]
        text = " ".join(f"the {words[0]} was {words[1]} {words[2]}".split())
        rows.append({"id": i, "review": text, "topic": topic, "mood": None if i % 5 == 0 else mood})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "reviews.csv"
    text_table(120, 0).to_csv(path, index=False)
    return path


def config(bert: Path, table: Path, tmp: Path, backbone: dict, methods: list, epochs: int = 2) -> Config:
    return check(Config.model_validate({
        "seed": 0,
        "suite": {"name": "text", "params": {"path": str(table), "text": "review", "targets": ["topic", "mood"],
                                             "tokenizer": str(bert), "max_length": 16}},
        "model": {"backbone": "hf", "backbone_params": {"path": str(bert), **backbone}},
        "train": {"epochs": epochs, "batch_size": 16, "optimizer": {"lr": 0.01}},
        "methods": methods, "baselines": {"cache": False}, "output": {"dir": str(tmp), "name": "r"},
    }))


def train_once(cfg: Config, method: MethodConfig, tmp: Path) -> tuple[torch.nn.Module, dict, dict]:
    """Train one joint job of ``cfg`` with ``method``; the model, its parameters before and after, by name."""
    suite = build_suite(cfg.suite.name, cfg.suite.params, cfg.seed)
    spec = spec_from_config(Job(method.label, tuple(suite.task_names), method, "joint"), suite, cfg, tmp / "job")
    model = spec.model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_job(replace(spec, model=model))
    return model, before, dict(model.named_parameters())


def changed(before: dict, after: dict) -> set[str]:
    return {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("method", [MethodConfig(name="equal"), MethodConfig(name="upgrad"),
                                    MethodConfig(name="pcgrad", grad_mode="representation")], ids=lambda m: m.label
                         + "-" + m.grad_mode)
def test_a_frozen_encoder_stays_fixed_while_the_heads_learn(bert, table, tmp_path, method):
    cfg = config(bert, table, tmp_path, {"train": "none"}, [method])
    model, before, after = train_once(cfg, method, tmp_path)
    moved = changed(before, after)
    assert moved and all(n.startswith("heads.") for n in moved)
    assert {n for n in after if n.startswith("heads.")} == moved
    assert list(model.shared_parameters()) == []
    saved = load_file(tmp_path / "job" / "best.safetensors")
    assert not any(k.startswith("encoder.") and "weight" in k for k in saved)  # frozen weights are not saved


def test_training_the_top_layer_moves_only_it_and_the_heads(bert, table, tmp_path):
    method = MethodConfig(name="upgrad")  # params mode: the Jacobian of the trainable shared parameters only
    _, before, after = train_once(config(bert, table, tmp_path, {"train": 1}, [method]), method, tmp_path)
    moved = changed(before, after)
    encoder = {n for n in moved if n.startswith("encoder.")}
    assert encoder and all(n.startswith("encoder.model.encoder.layer.1.") for n in encoder)
    assert {n for n in after if n.startswith("heads.")} <= moved
    assert not any("pooler" in n or "embeddings" in n or "layer.0." in n for n in moved)


def test_lora_trains_only_the_adapters(bert, table, tmp_path):
    method = MethodConfig(name="equal")
    cfg = config(bert, table, tmp_path, {"lora": {"r": 2, "alpha": 4}}, [method])
    model, before, after = train_once(cfg, method, tmp_path)
    moved = changed(before, after)
    adapters = {f"encoder.{n}" for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert {n for n in moved if n.startswith("encoder.")} <= adapters  # the base weights are unchanged
    assert any("lora_B" in n for n in moved)  # B starts at zero: the adapters did learn
    saved = load_file(tmp_path / "job" / "best.safetensors")
    assert {k for k in saved if k.startswith("encoder.")} == adapters


def test_mean_pooling_ignores_padding_and_cls_reads_the_first_token(bert):
    enc, width = build_backbone("hf", {"path": str(bert)}, (2, 8))
    assert width == 32
    ids = torch.tensor([[2, 5, 15, 7, 24, 3], [2, 6, 19, 3, 0, 0]])
    mask = (ids != 0).long()
    x = torch.stack([ids, mask], 1)
    padded = torch.stack([torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1),
                          torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1)], 1)
    z = enc(x)
    assert torch.allclose(z, enc(padded), atol=1e-5)
    assert torch.allclose(z[1], enc(x[1:, :, :4])[0], atol=1e-5)  # the second row alone, without its padding
    with torch.no_grad():
        hidden = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(z, (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), atol=1e-5)
    assert not torch.allclose(z, hidden.mean(1), atol=1e-3)  # padding would have counted
    cls, _ = build_backbone("hf", {"path": str(bert), "pooling": "cls"}, (2, 8))
    assert torch.allclose(cls(x), hidden[:, 0], atol=1e-5)


def test_errors_name_the_path_the_key_and_the_column(bert, table, tmp_path):
    with pytest.raises(ConfigError, match=rf"model\.backbone_params\.path: {tmp_path / 'nope'} does not exist"):
        build_backbone("hf", {"path": str(tmp_path / "nope")}, (2, 8))
    with pytest.raises(ConfigError, match=rf"{tmp_path} has no config\.json"):
        build_backbone("hf", {"path": str(tmp_path)}, (2, 8))
    with pytest.raises(ConfigError, match=r"train: 3 top layers asked for, the model has 2"):
        build_backbone("hf", {"path": str(bert), "train": 3}, (2, 8))
    with pytest.raises(ConfigError, match=r"train: true is ambiguous"):
        build_backbone("hf", {"path": str(bert), "train": True}, (2, 8))
    with pytest.raises(ConfigError, match=r"lora trains the adapters only"):
        build_backbone("hf", {"path": str(bert), "train": "all", "lora": {}}, (2, 8))
    with pytest.raises(ConfigError, match=r"hf reads token ids"):
        build_backbone("hf", {"path": str(bert)}, (4,))
    params = {"path": str(table), "text": "review", "targets": ["topic"], "tokenizer": str(bert)}
    with pytest.raises(DataError, match=rf"tokenizer directory {tmp_path / 'gone'} does not exist"):
        build_suite("text", params | {"tokenizer": str(tmp_path / "gone")}, 0)
    with pytest.raises(DataError, match=r"has no column 'reviews'; close matches: 'review'"):
        build_suite("text", params | {"text": "reviews"}, 0)
    with pytest.raises(ConfigError, match=r"column 'topic' is both the text and a target"):
        build_suite("text", params | {"text": "topic"}, 0)
    blank = text_table(20, 1)
    blank.loc[7, "review"] = "  "
    blank.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(DataError, match=r"blank\.csv: text column 'review' is empty at row 7"):
        build_suite("text", params | {"path": str(tmp_path / "blank.csv")}, 0)


def test_the_text_suite_tokenizes_once_and_records_how(bert, table):
    suite = build_suite("text", {"path": str(table), "text": "review", "targets": {"topic": "classification",
                                 "mood": "auto"}, "tokenizer": str(bert), "max_length": 5}, 0)
    x = suite.splits["train"][0].x
    assert x.dtype == torch.int64 and x.shape[1:] == (2, 5)  # every review is longer than 5 tokens: truncated
    assert suite.info["truncated_rows"] == 120
    pre = json.loads(json.dumps(suite.preprocessing()))
    assert pre["text"] == {"column": "review", "tokenizer": str(bert.resolve()), "max_length": 5}
    assert pre["tasks"]["topic"]["classes"] == ["film", "music", "sport"]
    mood = torch.cat([s.y["mood"] for srcs in suite.splits.values() for s in srcs])
    assert int(torch.isnan(mood).sum()) == 24  # the blank sentiments are missing labels


def test_a_cli_run_on_text_predicts_new_text(bert, table, tmp_path):
    (tmp_path / "c.yaml").write_text(f"""
seed: 0
suite: {{name: text, params: {{path: {table}, text: review, targets: [topic, mood], tokenizer: {bert}}}}}
model: {{backbone: hf, backbone_params: {{path: {bert}, train: 1}}}}
train: {{epochs: 2, batch_size: 16, optimizer: {{lr: 0.003}}}}
methods: [equal]
baselines: {{single_task: false}}
output: {{dir: {tmp_path}, name: r}}
""")
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml"), "--quiet"])
    assert r.exit_code == 0, r.output[-2000:]
    new = pd.DataFrame({"review": ["the goal was really great", "the song was awful", "the actor was boring"],
                        "note": ["extra columns are not read", "", ""]})
    new.to_csv(tmp_path / "new.csv", index=False)
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "r"), "--input", str(tmp_path / "new.csv"), "--out",
                                 str(tmp_path / "pred.csv"), "--proba"])
    assert r.exit_code == 0, r.output[-2000:]
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == 3 and set(pred["topic"]) <= {"sport", "music", "film"} and set(pred["mood"]) <= {"good", "bad"}
    assert pred.filter(like="topic:proba:").sum(axis=1).round(5).eq(1).all()
    loaded = polytask.load(tmp_path / "r", "equal")
    assert loaded.predict(new).equals(pred[["topic", "mood"]])
    with pytest.raises(DataError, match=r"has no column 'review'"):
        loaded.predict(new.rename(columns={"review": "text"}))


def test_example_text_multitask_runs_on_a_model_directory(bert, tmp_path, monkeypatch, capsys):
    script = ROOT / "examples" / "text_multitask.py"
    assert len(script.read_text().splitlines()) <= 40
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), str(bert)])
    runpy.run_path(str(script), run_name="__main__")
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(scores) == {"sentiment", "topic", "intensity"}
    assert all(0 <= s["accuracy"] <= 1 for s in scores.values())
    assert (tmp_path / "runs" / "text-example" / "summary.json").is_file()


def test_a_text_model_rebuilds_from_its_config(bert, table):
    suite = build_suite("text", {"path": str(table), "text": "review", "targets": ["topic"],
                                 "tokenizer": str(bert)}, 0)
    model = build_model(suite.tasks, suite.input_shape, "hf", {"path": str(bert), "train": 1})
    again = build_model(suite.tasks, suite.input_shape, "hf", {"path": str(bert), "train": 1})
    again.load_state_dict(model.state_dict())  # frozen weights come from the directory, the rest from the file
    x = suite.splits["test"][0].x
    model.eval()
    again.eval()
    assert torch.equal(model(x)["topic"], again(x)["topic"])


def test_gradient_affinity_of_a_frozen_encoder_is_a_config_error(bert, table, tmp_path):
    from polytask.engine.progress import Reporter
    from polytask.flows.relate import relate

    cfg = config(bert, table, tmp_path, {"train": "none"}, ["equal"])
    cfg.relate.estimators = ["grad_cosine"]
    with pytest.raises(ConfigError, match=r"gradient probes .* none trains .* use logme, leep, hscore or nce"):
        relate(cfg, reporter=Reporter(quiet=True))


def test_a_resumed_job_ends_as_one_that_never_stopped(bert, table, tmp_path):
    """The checkpoint holds only what trains (the top layer, the heads); the rest is read again from the path."""
    method = MethodConfig(name="upgrad")
    cfg = config(bert, table, tmp_path, {"train": 1}, [method])
    suite = build_suite(cfg.suite.name, cfg.suite.params, cfg.seed)
    job = Job(method.label, tuple(suite.task_names), method, "joint")
    straight = train_job(spec_from_config(job, suite, cfg, tmp_path / "straight"))
    first = spec_from_config(job, suite, cfg, tmp_path / "stopped")
    train_job(replace(first, epochs=1))
    resumed = train_job(first)
    assert resumed["test"] == straight["test"]
    a, b = (load_file(tmp_path / d / "best.safetensors") for d in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("encoder.model.encoder.layer.1.") for k in a)
    assert not any(k.startswith("encoder.model.embeddings.") for k in a)
