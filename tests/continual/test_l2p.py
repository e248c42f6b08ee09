"""L2P (Wang et al. 2022) on a tiny random BERT and a text table split into a stream: key-matched prompt selection,
the frozen encoder, the surrogate loss, the class mask, the errors, every scenario, and exact resume after SIGKILLs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from polytask.continual import STRATEGIES, build_stream
from polytask.continual.config import ContinualConfig
from polytask.continual.strategies.l2p import L2P, L2PModel, L2PParams, batch_vote, pull_loss
from polytask.errors import ConfigError
from polytask.flows import continual as flow
from polytask.models import build_model

ROOT = Path(__file__).resolve().parents[2]
TOPICS = {"sport": ["match", "team", "goal"], "music": ["album", "song", "band"], "film": ["movie", "actor", "scene"]}
ADJECTIVES = ["great", "wonderful", "excellent", "awful", "boring", "terrible"]
SMALL = {"pool_size": 4, "top_n": 2, "prompt_length": 2}


def texts(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` short sentences: three topics and a fourth class of bare adjectives, and a ``source`` column (two
    values) to split a domain stream by."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["sport", "music", "film", "mood"][i % 4]
        if label == "mood":
            text = f"{rng.choice(['really', 'very', 'quite'])} {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}"
        else:
            text = f"the {rng.choice(TOPICS[label])} was {rng.choice(['', 'not ', 'really '])}{rng.choice(ADJECTIVES)}"
        rows.append({"text": " ".join(text.split()), "label": label, "source": "a" if (i // 4) % 2 else "b"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "texts.csv"
    texts(48).to_csv(path, index=False)
    return path


def stream_params(table: Path, bert: Path, **extra) -> dict:
    return {"path": str(table), "target": "label", "by": "label", "text": "text", "tokenizer": str(bert),
            "max_length": 16, **extra}


def wrapped(bert: Path, stream, params=None, seed: int = 0, **backbone) -> tuple[L2P, L2PModel]:
    torch.manual_seed(seed)
    model = build_model(stream.tasks, stream.input_shape, "hf", {"path": str(bert), "pooling": "cls", **backbone})
    strategy = STRATEGIES.build("l2p", {**SMALL, **(params or {})}, where="test")
    strategy.seed = seed
    return strategy, strategy.wrap(model, stream)


def run_config(tmp: Path, table: Path, bert: Path, name: str, strategies: list, **stream) -> dict:
    return {"seeds": [0], "stream": {"name": "table", "params": stream_params(table, bert, **stream)},
            "model": {"backbone": "hf", "backbone_params": {"path": str(bert), "pooling": "cls"}},
            "train": {"epochs": 2, "batch_size": 4, "checkpoint_every": 2,
                      "optimizer": {"name": "adam", "lr": 0.01}},
            "strategies": strategies, "output": {"dir": str(tmp), "name": name}}


# ---------------------------------------------------------------- the text stream


def test_a_text_table_is_a_stream_split_by_its_target_or_a_column(table, bert):
    s = build_stream("table", stream_params(table, bert), seed=0)
    assert s.scenario == "class" and len(s.experiences) == 2 and s.input_shape[0] == 2
    x = s.experiences[0].suite.splits["train"][0].x
    assert x.dtype == torch.int64 and bool((x[:, 1] <= 1).all())  # token ids and mask, not standardised
    assert s.info["standardisation"].startswith("none")
    by_source = build_stream("table", stream_params(table, bert, by="source"), seed=0)
    assert by_source.scenario == "domain" and [e.name for e in by_source.experiences] == ["a", "b"]
    with pytest.raises(ConfigError, match="needs tokenizer"):
        build_stream("table", {**stream_params(table, bert), "tokenizer": None}, seed=0)
    with pytest.raises(ConfigError, match="exclude each other"):
        build_stream("table", {**stream_params(table, bert), "features": ["source"]}, seed=0)


# ---------------------------------------------------------------- the method's properties


def test_prompts_are_selected_by_key_matching(table, bert):
    """Each row's prompts are its top-N keys by cosine with the frozen encoder's [CLS] feature, most similar first,
    and the feature is the mean of the prompt positions of the encoder run on [CLS] + prompts + text."""
    stream = build_stream("table", stream_params(table, bert), seed=0)
    _, model = wrapped(bert, stream)
    model.eval()
    x = stream.experiences[0].suite.splits["train"][0].x[:6]
    q = model.query(x)
    cos = torch.nn.functional.cosine_similarity(q[:, None], model.keys[None], dim=-1)
    ids = model.select(q)
    for row in range(len(x)):
        order = sorted(range(model.pool_size), key=lambda j: -float(cos[row, j].detach()))
        assert ids[row].tolist() == order[:2]
    with torch.no_grad():
        feature = model.features(x)[0]
        hf = model.encoder.model
        mask = x[:, 1][:, x[:, 1].any(0)]
        words = hf.get_input_embeddings()(x[:, 0][:, x[:, 1].any(0)])
        prompts = torch.cat([model.prompts[ids[:, 0]], model.prompts[ids[:, 1]]], dim=1)
        seq = torch.cat([words[:, :1], prompts, words[:, 1:]], dim=1)
        full = torch.cat([mask[:, :1], torch.ones(len(x), 4, dtype=mask.dtype), mask[:, 1:]], dim=1)
        want = hf(inputs_embeds=seq, attention_mask=full).last_hidden_state[:, 1:5].mean(1)
        assert torch.equal(q, model.encoder(x))  # the query is the backbone's own feature, without prompts
    torch.testing.assert_close(feature, want)
    # batch-wise selection (training only): every row takes the ids chosen most often, ties to the lower id
    votes = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 0]])
    counts = Counter(votes.flatten().tolist())
    assert batch_vote(votes, 4, 2)[0].tolist() == sorted(counts, key=lambda j: (-counts[j], j))[:2] == [0, 1]
    _, model_b = wrapped(bert, stream, {"batchwise": True})
    model_b.train()
    chosen = model_b.select(model_b.query(x))
    assert bool((chosen == chosen[0]).all())
    model_b.eval()
    assert torch.equal(model_b.select(model_b.query(x)), ids)  # per row at test time (same seed, same keys)


def test_the_surrogate_loss_pulls_the_selected_keys_toward_the_queries(table, bert):
    stream = build_stream("table", stream_params(table, bert), seed=0)
    strategy, model = wrapped(bert, stream)
    model.train()
    x = stream.experiences[0].suite.splits["train"][0].x[:8]
    # the task loss never reaches the keys: selection is not differentiable
    model(x)["class"].logsumexp(1).sum().backward()
    assert model.keys.grad is None and model.prompts.grad is not None
    q = model.query(x)
    ids = model.select(q)
    # the strategy's extra loss is λ times the surrogate on the step's rows
    src = stream.experiences[0].suite.splits["train"][0]
    step = SimpleNamespace(batch=SimpleNamespace(sources=[src], rows=[torch.arange(8)]))
    torch.testing.assert_close(strategy.extra_loss(None, step), 0.1 * pull_loss(q, model.keys, ids))
    # its gradient reaches the selected keys only (one row: 2 of the 4 keys)
    pull_loss(q[:1], model.keys, ids[:1]).backward()
    for j in range(model.pool_size):
        assert (float(model.keys.grad[j].abs().sum()) > 0) == (j in ids[0].tolist())
    model.keys.grad = None
    cos = torch.nn.functional.cosine_similarity(q[:, None], model.keys[None], dim=-1).gather(1, ids).detach()
    opt = torch.optim.SGD([model.keys], lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        pull_loss(q, model.keys, ids).backward()
        opt.step()
    after = torch.nn.functional.cosine_similarity(q[:, None], model.keys[None], dim=-1).gather(1, ids).detach()
    assert float(after.mean()) > float(cos.mean()) + 0.05  # selected keys moved toward their queries


def test_the_class_mask_applies_in_training_only(table, bert):
    stream = build_stream("table", stream_params(table, bert), seed=0)
    strategy, model = wrapped(bert, stream)
    strategy.begin(stream, 1)
    x = stream.experiences[1].suite.splits["train"][0].x[:4]
    model.train()
    logits = model(x)["class"]
    assert bool(torch.isinf(logits[:, :2]).all()) and bool(torch.isfinite(logits[:, 2:]).all())
    model.eval()
    assert bool(torch.isfinite(model(x)["class"]).all())
    off, model_off = wrapped(bert, stream, {"train_mask": False})
    off.begin(stream, 1)
    model_off.train()
    assert bool(torch.isfinite(model_off(x)["class"]).all())


def test_a_run_trains_prompts_keys_and_heads_and_never_the_encoder(tmp_path, table, bert, monkeypatch):
    """Through the continual flow (two experiences, the class mask, the surrogate loss, clipping): the pretrained
    encoder's weights are bit-identical to the saved model's afterwards; the pool and the head moved."""
    built = {}
    wrap = L2P.wrap

    def recording(self, model, stream):
        built["initial"] = {k: v.clone() for k, v in model.state_dict().items()}
        built["model"] = wrap(self, model, stream)
        built["pool"] = (built["model"].prompts.detach().clone(), built["model"].keys.detach().clone())
        return built["model"]

    monkeypatch.setattr(L2P, "wrap", recording)
    cfg = run_config(tmp_path, table, bert, "run", [{"name": "l2p", "params": SMALL}])
    _, summary = flow.continual(ContinualConfig.model_validate(cfg))
    model = built["model"]
    from transformers import AutoModel

    fresh = AutoModel.from_pretrained(bert, local_files_only=True)
    for (name, p), (_, q) in zip(model.encoder.model.named_parameters(), fresh.named_parameters(), strict=True):
        assert not p.requires_grad and torch.equal(p, q), name
    assert not torch.equal(model.prompts, built["pool"][0]) and not torch.equal(model.keys, built["pool"][1])
    assert not torch.equal(model.heads["class"].weight, built["initial"]["heads.class.weight"])
    assert set(model.state_dict()) == {"prompts", "keys", "heads.class.weight", "heads.class.bias"}
    assert len(summary["results"]["l2p"][0]["accuracy"]) == 2


@pytest.mark.parametrize("scenario", ["task", "domain", "multitask"])
def test_it_runs_in_the_task_domain_and_multitask_scenarios(tmp_path, table, bert, scenario):
    extra = {"scenario": "task"} if scenario == "task" else {"by": "source"}
    cfg = run_config(tmp_path, table, bert, scenario, [{"name": "l2p", "params": SMALL}], **extra)
    if scenario == "multitask":  # the text suite's two target columns, one per experience
        cfg["stream"] = {"name": "suite", "params": {"name": "text", "params": {
            "path": str(table), "text": "text", "targets": ["label", "source"], "tokenizer": str(bert),
            "max_length": 16}}}
    cfg["train"]["epochs"] = 1
    _, summary = flow.continual(ContinualConfig.model_validate(cfg))
    assert summary["stream"]["scenario"] == scenario
    assert len(summary["results"]["l2p"][0]["accuracy"]) == 2


def test_the_pool_is_a_function_of_the_seed(table, bert):
    stream = build_stream("table", stream_params(table, bert), seed=0)
    a, b, c = (wrapped(bert, stream, seed=s)[1] for s in (0, 0, 1))
    assert torch.equal(a.prompts, b.prompts) and torch.equal(a.keys, b.keys)
    assert not torch.equal(a.prompts, c.prompts)
    assert a.prompts.shape == (4, 2, 32) and a.keys.shape == (4, 32)
    assert bool((a.prompts.detach().abs() <= 1).all())
    composed = STRATEGIES.build("compose", {"strategies": [{"name": "l2p", "params": SMALL}, "naive"]}, where="test")
    composed.seed = 1
    torch.manual_seed(1)
    inner = composed.wrap(build_model(stream.tasks, stream.input_shape, "hf", {"path": str(bert)}), stream)
    assert torch.equal(inner.prompts, c.prompts)  # a composed l2p draws its pool from the run's seed too


def test_errors_name_what_to_change(table, bert):
    stream = build_stream("table", stream_params(table, bert), seed=0)
    with pytest.raises(ConfigError, match=r"model\.backbone: hf"):
        L2P(L2PParams()).wrap(build_model(stream.tasks, (2, 4), "mlp", {"hidden": [8]}), stream)
    with pytest.raises(ConfigError, match="train: none"):
        wrapped(bert, stream, train="all")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        wrapped(bert, stream, {"pool_size": 10, "top_n": 10, "prompt_length": 6})
    with pytest.raises(ConfigError, match="top_n"):
        STRATEGIES.build("l2p", {"pool_size": 3, "top_n": 4}, where="strategies.0.params")


# ---------------------------------------------------------------- exact resume


def test_a_run_killed_inside_an_experience_resumes_bit_identically(tmp_path, table, bert):
    """The shared kill test of test_continual.py on the text stream (one kill, to keep it short: a second process
    start costs the transformers import again): SIGKILLed at global step 11, inside the second experience (its
    third step, after its checkpoint at step 2), the resumed run ends with the same weights (pool, keys, head) and
    accuracy matrix as a run that never stopped; batch-wise selection on, so the vote is replayed too."""
    strategies = [{"name": "l2p", "params": {**SMALL, "batchwise": True}}]
    cfg = run_config(tmp_path, table, bert, "straight", strategies)
    cfg["train"]["checkpoint_interval_s"] = 0  # every checkpoint and end state written: the kill's place is known
    straight, _ = flow.continual(ContinualConfig.model_validate(cfg))
    assert json.loads((straight / "jobs" / "l2p-s0" / "e0" / "done.json").read_text())["steps"] == 8
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output": {"dir": str(tmp_path), "name": "killed"}}))
    killed = tmp_path / "killed"
    out = subprocess.run([sys.executable, "-m", "polytask.cli", "continual", str(path), "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "POLYTASK_KILL_AT": "step:11"},
                         timeout=600, cwd=ROOT)
    assert out.returncode == -9, out.stderr
    assert (killed / "jobs" / "l2p-s0" / "e0" / "done.json").is_file()
    assert not (killed / "jobs" / "l2p-s0" / "e1" / "done.json").exists()
    flow.continual(None, resume=killed)
    for d in sorted((straight / "jobs").glob("*/*")):
        twin = killed / "jobs" / d.parent.name / d.name
        assert (twin / "end.safetensors").read_bytes() == (d / "end.safetensors").read_bytes(), d
    want = json.loads((straight / "summary.json").read_text())["results"]["l2p"]
    got = json.loads((killed / "summary.json").read_text())["results"]["l2p"]
    assert [r["accuracy"] for r in want] == [r["accuracy"] for r in got]
    assert [r["metrics"] for r in want] == [r["metrics"] for r in got]
