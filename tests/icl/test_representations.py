"""Task representations on tiny random Hugging Face causal LMs saved to a temporary directory (GPT-2 and Llama):
patching identities, the layer sweep, superposition by hand, the learnable task vector, the cipher probe, the
probe runner."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytask.errors import ConfigError, DataError
from polytask.icl.discrete import Cipher, Copy, Lookup, Successor
from polytask.icl.patching import (
    decoder_blocks,
    head_contributions,
    load_causal_lm,
    logits_at,
    num_layers,
    out_projection,
    patched,
    residual_at,
)
from polytask.icl.prompts import ARROW, SYMBOLS, TokenPrompts
from polytask.icl.representations import (
    answer_mass,
    cipher_probe,
    dummy_rows,
    fit_ltv,
    ltv_accuracy,
    ltv_logits,
    mixture_counts,
    probe,
    query_inputs,
    superposed_prompts,
    superposition,
    task_vector_diagnosis,
    task_vector_sweep,
    with_queries,
    zero_shot,
)

VOCAB = 16
TASK = Successor(alphabet=10)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                      bos_token_id=0, eos_token_id=0))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, build in (("gpt2", _gpt2), ("llama", _llama)):
        path = tmp_path_factory.mktemp("lm") / name
        build().save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def models(model_dirs):
    return {name: load_causal_lm(path) for name, path in model_dirs.items()}


def _prompts(batch=8, n=4, seed=0):
    return TASK.sample(torch.Generator().manual_seed(seed), batch, n)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_patching_the_states_a_prompt_produces_reproduces_its_outputs_exactly(models, name):
    model = models[name]
    p = _prompts()
    query = p.query - 4 * torch.arange(8).remainder(2)  # some rows at an earlier ARROW
    assert bool((p.tokens[torch.arange(8), query] == ARROW).all())
    hidden, logits = residual_at(model, p.tokens, query)
    assert hidden.shape == (num_layers(model), 8, 32)
    for layer in range(num_layers(model)):
        with patched(model, {layer: hidden[layer]}, query):
            again, logits_again = residual_at(model, p.tokens, query)
        assert torch.equal(logits_again, logits)
        assert torch.equal(again, hidden)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_patching_a_different_vector_changes_the_output_from_that_position_on(models, name):
    model = models[name]
    p = _prompts()
    full = model(input_ids=p.tokens).logits
    hidden, _ = residual_at(model, p.tokens, p.query)
    other = hidden[0] + 3 * torch.randn(hidden[0].shape, generator=torch.Generator().manual_seed(1))
    with patched(model, {0: other}, p.query):
        read, _ = residual_at(model, p.tokens, p.query, layers=[0])
        changed = model(input_ids=p.tokens).logits
    assert torch.equal(read[0], other)  # the stream holds the written vector
    assert not torch.allclose(changed[:, -1], full[:, -1], atol=1e-4)
    assert torch.equal(changed[:, :-1], full[:, :-1])  # causal: earlier positions untouched


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_last_layer_state_of_the_full_prompt_patched_into_zero_shot_gives_the_icl_logits(models, name):
    model = models[name]
    p = _prompts()
    hidden, icl = residual_at(model, p.tokens, p.query)
    bare = zero_shot(p)
    last = num_layers(model) - 1
    with patched(model, {last: hidden[last]}, bare.query):
        assert torch.equal(logits_at(model, bare.tokens, bare.query), icl)


def test_zero_shot_and_query_replacement_follow_the_layout():
    p = _prompts()
    x = query_inputs(p)
    assert torch.equal(x[:, 0], p.tokens[:, -2])
    bare = zero_shot(p)
    assert torch.equal(bare.tokens, torch.stack([p.tokens[:, -2], p.tokens[:, -1]], dim=1))
    assert torch.equal(bare.query, torch.ones(8, dtype=torch.long))
    swapped = with_queries(p, x.roll(1, dims=0))
    assert torch.equal(swapped[:, :-2], p.tokens[:, :-2])
    assert torch.equal(swapped[:, -2], p.tokens[:, -2].roll(1))


def test_dummy_queries_come_from_other_prompts_with_other_inputs():
    x = torch.tensor([[5], [5], [6], [7]])
    rows = dummy_rows(x, 2)
    assert rows.tolist() == [[2, 3], [2, 3], [3, 0], [0, 1]]  # row 0 skips row 1 (same input 5)
    assert dummy_rows(torch.tensor([[5], [5]]), 2).tolist() == [[1, 1], [0, 0]]  # too few differ: equal ones
    with pytest.raises(DataError, match="at least 2"):
        dummy_rows(x[:1], 2)


def test_layout_errors_name_the_problem():
    p = _prompts()
    with pytest.raises(DataError, match="ARROW"):
        zero_shot(TokenPrompts(p.tokens, p.answers, p.query - 1))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_layer_sweep_has_one_row_per_layer(models, name):
    model = models[name]
    rows = task_vector_sweep(model, _prompts(batch=16))
    assert [r["layer"] for r in rows] == list(range(num_layers(model)))
    assert len({r["icl"] for r in rows}) == 1 and len({r["zero_shot"] for r in rows}) == 1
    assert all(0 <= r[k] <= 1 for r in rows for k in ("icl", "task_vector", "zero_shot"))


def test_blocks_and_projections_are_found_or_named(models):
    assert len(decoder_blocks(models["gpt2"])) == 3
    assert type(out_projection(decoder_blocks(models["llama"])[0])).__name__ == "Linear"
    with pytest.raises(ConfigError, match="output projection"):
        out_projection(torch.nn.Linear(2, 2))
    p = _prompts()
    with pytest.raises(ConfigError, match="layer 7"), patched(models["gpt2"], {7: torch.zeros(32)}, p.query):
        pass


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_head_contributions_sum_to_the_attention_output(models, name):
    model = models[name]
    p = _prompts()
    heads = head_contributions(model, p.tokens, p.query)
    assert heads.shape == (3, 4, 32)
    projection = out_projection(decoder_blocks(model)[1])
    seen = {}
    handle = projection.register_forward_hook(lambda m, a, o: seen.update(out=o))
    try:
        model(input_ids=p.tokens)
    finally:
        handle.remove()
    mean_out = seen["out"][torch.arange(8), p.query].mean(dim=0)
    bias = projection(torch.zeros(projection.weight.shape[0 if name == "gpt2" else 1]))
    torch.testing.assert_close(heads[1].sum(dim=0) + bias, mean_out, rtol=1e-5, atol=1e-5)


def test_answer_mass_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    mass = answer_mass(logits, torch.tensor([[0, 1], [1, 1]]))
    torch.testing.assert_close(mass, torch.tensor([[0.5, 0.3], [0.3, 0.3]]))
    assert bool((mass.sum(dim=1) <= 1 + 1e-6).all())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=5).filter(lambda p: sum(p) > 0), st.integers(0, 20))
def test_mixture_counts_sum_to_n_and_round_the_proportions(proportions, n):
    counts = mixture_counts(proportions, n)
    assert sum(counts) == n
    for c, p in zip(counts, proportions, strict=True):
        assert abs(c - p / sum(proportions) * n) < 1


def test_superposed_prompts_write_each_demonstration_with_one_task():
    tasks = [Successor(alphabet=10), Copy(alphabet=10, length=1)]
    prompts, answers = superposed_prompts(tasks, [0.75, 0.25], torch.Generator().manual_seed(0), 6, 8)
    demos = prompts.tokens[:, :-2].reshape(6, 8, 4)  # x ARROW y SEP
    x, y = demos[:, :, 0] - SYMBOLS, demos[:, :, 2] - SYMBOLS
    successor = y == (x + 1) % 10
    assert bool((successor | (y == x)).all())
    assert successor.sum(dim=1).tolist() == [6] * 6  # 0.75 of 8 demonstrations
    xq = prompts.tokens[:, -2] - SYMBOLS
    assert torch.equal(answers, torch.stack([(xq + 1) % 10, xq], dim=1) + SYMBOLS)
    with pytest.raises(DataError, match="lookup"):
        superposed_prompts([tasks[0], Lookup(pairs=5)], [1, 1], torch.Generator(), 2, 2)


def test_superposition_equals_a_hand_computation_on_two_tasks(models):
    model = models["gpt2"]
    tasks = [Successor(alphabet=10), Copy(alphabet=10, length=1)]
    out = superposition(model, tasks, [1, 1], torch.Generator().manual_seed(3), batch=12, n_examples=4)
    prompts, answers = superposed_prompts(tasks, [1, 1], torch.Generator().manual_seed(3), 12, 4)
    probs = torch.softmax(model(input_ids=prompts.tokens).logits[:, -1], dim=-1)
    hand = [float(probs[torch.arange(12), answers[:, k]].mean()) for k in range(2)]
    assert out["mass"] == pytest.approx(hand, rel=1e-5)
    assert out["counts"] == [2, 2] and out["proportions"] == [0.5, 0.5]
    assert out["total"] <= 1


def test_learnable_task_vector_fits_a_realisable_target(models):
    """The target is what a known weighting (30 x N(0, 1): the tiny random model's heads write little) makes the
    model answer, chosen to differ from the unpatched answer on every prompt: fitting must move the output there."""
    model = models["gpt2"]
    demos = _prompts(batch=16, seed=1)
    heads = head_contributions(model, demos.tokens, demos.query)
    bare = zero_shot(_prompts(batch=32, seed=2))
    with torch.no_grad():
        plain = logits_at(model, bare.tokens, bare.query).argmax(dim=-1)
        for seed in range(20):  # the first known weighting that changes every answer
            target = 30 * torch.randn(heads.shape[:2], generator=torch.Generator().manual_seed(seed))
            wanted = ltv_logits(model, bare, target, heads).argmax(dim=-1)
            if bool((wanted != plain).all()):
                break
    assert bool((wanted != plain).all())
    train = TokenPrompts(bare.tokens, wanted[:, None], bare.query)
    ltv = fit_ltv(model, demos, train, steps=100, lr=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ltv.heads, heads)
    assert ltv.losses[-1] < ltv.losses[0]
    assert ltv_accuracy(model, train, ltv) >= 0.9


def test_cipher_probe_reports_both_ciphers_their_gap_and_the_prompt_only_ceiling(models):
    out = cipher_probe(models["llama"], Cipher(alphabet=10, length=2), torch.Generator().manual_seed(0), batch=64,
                       n_examples=4)
    assert out["gap"] == out["bijective"] - out["non_bijective"]
    assert all(0 <= out[k] <= 1 for k in ("bijective", "non_bijective"))
    assert out["decodable_bijective"] == 1.0  # every query symbol is in the demonstrations, consistently
    assert out["decodable_non_bijective"] < 0.5


def _zero_shot_batch(xs):
    from polytask.icl.discrete import layout
    x = torch.tensor(xs)[:, None, None]
    return layout(x, (x + 1) % 10)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_task_vector_diagnosis_columns_and_identities(models, name):
    model = models[name]
    test = _prompts(batch=8, n=4, seed=3)
    rows = task_vector_diagnosis(model, _prompts(batch=8, n=4, seed=4), test, n_avg=2)
    assert [r["task_vector"] for r in rows] == [r["task_vector"] for r in task_vector_sweep(model, test, n_avg=2)]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("dummy_answer", "mean_replace", "mean_add"))
    # A dev batch of one prompt repeated: its mean task vector is that prompt's task vector, so replacing by the
    # mean is Hendel et al.'s patch on the same prompts.
    one = TokenPrompts(test.tokens[:1].repeat(8, 1), test.answers[:1].repeat(8, 1), test.query[:1].repeat(8))
    same = task_vector_diagnosis(model, one, one, n_avg=1)
    assert [r["mean_replace"] for r in same] == [r["task_vector"] for r in same]
    # Demonstration-free dev prompts whose queries are all different: each dummy is another prompt's query, so the
    # mean "task vector" is the mean zero-shot state and the added shift is zero: zero-shot accuracy at every layer.
    bare = _zero_shot_batch(list(range(8)))
    plain = float((logits_at(model, bare.tokens, bare.query).argmax(-1) == bare.answers[:, 0]).float().mean())
    shifted = task_vector_diagnosis(model, bare, bare, n_avg=1)
    assert [r["mean_add"] for r in shifted] == [plain] * num_layers(model)


def test_probe_runs_every_measurement_and_is_deterministic(model_dirs):
    tasks = [Successor(alphabet=10), Copy(alphabet=10, length=1)]
    kwargs = dict(seed=0, batch=8, n_examples=3, ltv_steps=3, mixtures=[(1, 0), (0.5, 0.5)])
    out = probe(model_dirs["gpt2"], tasks, **kwargs)
    assert set(out["tasks"]) == {"successor", "copy"}
    row = out["tasks"]["successor"]
    assert len(row["test_sweep"]) == len(row["dev_sweep"]) == out["layers"] == 3
    assert row["task_vector"] == row["test_sweep"][row["best_layer"]]["task_vector"]
    assert 0 <= row["ltv"]["accuracy"] <= 1 and len(row["ltv"]["weights"]) == 3
    assert [m["counts"] for m in out["superposition"]] == [[3, 0], [2, 1]]
    assert json.loads(json.dumps(out)) == out
    assert probe(model_dirs["gpt2"], tasks, **kwargs) == out
    fixed = probe(model_dirs["gpt2"], [Cipher(alphabet=10, per_prompt=False)], batch=8, n_examples=3, ltv_steps=0)
    assert "cipher" not in fixed["tasks"]["cipher"] and "ltv" not in fixed["tasks"]["cipher"]
    per_prompt = probe(model_dirs["gpt2"], [Cipher(alphabet=10)], batch=8, n_examples=3, ltv_steps=0)
    assert set(per_prompt["tasks"]["cipher"]["cipher"]) == {"bijective", "non_bijective", "gap", "decodable_bijective",
                                                            "decodable_non_bijective"}
    with pytest.raises(ConfigError, match="twice"):
        probe(model_dirs["gpt2"], [Cipher(alphabet=10), Cipher(alphabet=10, per_prompt=False)], ltv_steps=0)
    with pytest.raises(ConfigError, match="needs a vocabulary"):
        probe(model_dirs["gpt2"], [Successor(alphabet=26)], ltv_steps=0)
    with pytest.raises(ConfigError, match="model_dir"):
        probe(model_dirs["gpt2"] / "missing", tasks)
