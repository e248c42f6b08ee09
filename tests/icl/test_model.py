"""The in-context models: shapes, causality (a prediction never reads later points), the Hugging Face directory."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from polytask.icl.model import FunctionModel, TokenModel, interleave, pack, predict_answers

torch.set_num_threads(1)


def tiny_function_model(families=("linear", "sparse"), dim=4, max_points=8):
    torch.manual_seed(0)
    return FunctionModel(list(families), dim, max_points, n_embd=32, n_layer=2, n_head=2).eval()


def test_interleave_is_gargs_combine():
    xs = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    ys = -torch.arange(6, dtype=torch.float32).reshape(2, 3) - 1
    z = interleave(xs, ys)
    assert z.shape == (2, 6, 4)
    assert torch.equal(z[:, ::2], xs)
    assert torch.equal(z[:, 1::2, 0], ys) and not z[:, 1::2, 1:].any()


def test_function_model_gives_one_prediction_per_point_and_family():
    model = tiny_function_model()
    x = pack(torch.randn(5, 7, 3), torch.randn(5, 7), 4)  # a family of lower dimension, zero-padded
    assert x.shape == (5, 7, 5) and not x[..., 3].any()
    out = model(x)
    assert set(out) == {"linear", "sparse"} and all(o.shape == (5, 7) for o in out.values())
    assert set(model(x, ["sparse"])) == {"sparse"}
    shared = {id(p) for p in model.shared_parameters()}
    heads = {id(p) for t in model.task_names for p in model.task_parameters(t)}
    assert not shared & heads and shared | heads == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in model.parameters() if not p.requires_grad} == {id(model.backbone.wte.weight)}
    out["sparse"].square().mean().backward()  # every shared parameter is read: aggregators get full per-task rows
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters())


@settings(max_examples=8, deadline=None)
@given(i=st.integers(0, 6), seed=st.integers(0, 1000))
def test_a_prediction_does_not_depend_on_later_points(i, seed):
    """Changing x_j, y_j for j > i leaves the prediction at point i unchanged (and changing y_i too: the model
    predicts y_i before reading it); changing an earlier point changes it."""
    model = tiny_function_model()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, 5, generator=g)
    later = x.clone()
    later[:, i + 1:] = torch.randn(later[:, i + 1:].shape, generator=g)
    later[:, i, -1] = 123.0
    with torch.no_grad():
        a, b = model(x)["linear"], model(later)["linear"]
    torch.testing.assert_close(a[:, :i + 1], b[:, :i + 1], rtol=1e-5, atol=1e-5)
    if i + 1 < 8:
        assert not torch.allclose(a[:, i + 1:], b[:, i + 1:])
    earlier = x.clone()
    earlier[:, 0, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(earlier)["linear"][:, max(i, 1)], a[:, max(i, 1)])


def test_token_model_reads_the_final_arrow_and_saves_a_hugging_face_directory(tmp_path):
    torch.manual_seed(0)
    model = TokenModel(["successor", "copy"], vocab_size=13, n_positions=16, n_embd=32, n_layer=2, n_head=2).eval()
    tokens = torch.randint(3, 13, (4, 9))
    out = model(tokens)
    assert set(out) == {"successor", "copy"} and out["copy"].shape == (4, 13)
    torch.testing.assert_close(out["copy"], model.logits(tokens)[:, -1])
    assert list(model.task_parameters("copy")) == []
    model.save_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "config.json").is_file() and (tmp_path / "lm" / "model.safetensors").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, model.logits(tokens))
    back = TokenModel.from_pretrained(tmp_path / "lm", ["successor", "copy"]).eval()
    torch.testing.assert_close(back(tokens)["copy"], out["copy"])


def test_multi_token_answers_are_teacher_forced_and_decoded_greedily():
    torch.manual_seed(0)
    model = TokenModel(["reverse"], vocab_size=11, n_positions=16, answer_tokens=3, n_embd=32, n_layer=2,
                       n_head=2).eval()
    prompt = torch.randint(3, 11, (2, 6))
    answers = predict_answers(model, prompt, 3)
    assert answers.shape == (2, 3)
    with torch.no_grad():
        logits = model(torch.cat([prompt, answers[:, :2]], 1))["reverse"]
    assert logits.shape == (2, 11, 3)
    assert torch.equal(logits.argmax(1), answers)  # greedy decoding agrees with the teacher-forced logits
