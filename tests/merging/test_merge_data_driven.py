"""Data-driven merging: each method does what its paper's objective says, on small real models."""

import pytest
import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.merging import merge_encoders
from polytask.merging.data_driven import (
    TaskModels,
    diagonal_fisher,
    entropy,
    fisher_average,
    js_divergence,
    linear_inputs_gram,
    regmean_weight,
)
from polytask.tasks.task import Task


def _objective(ctx, state, fn):
    total = 0.0
    for k in range(len(ctx.tasks)):
        from torch.func import functional_call

        logits = ctx.heads[k](functional_call(ctx.encoder, state, (ctx.inputs[k],)))
        total += float(fn(k, logits).mean())
    return total


def test_adamerging_lowers_prediction_entropy(task_models):
    ctx = task_models(3)
    start = merge_encoders("adamerging", {"steps": 0}, ctx)
    learned = merge_encoders("adamerging", {"steps": 60, "lr": 0.05}, ctx)
    assert _objective(ctx, learned, lambda k, lg: entropy(lg)) < _objective(ctx, start, lambda k, lg: entropy(lg))


def test_divmerge_lowers_js_divergence_to_the_task_models(task_models):
    from torch.func import functional_call

    ctx = task_models(3)
    targets = [ctx.heads[k](functional_call(ctx.encoder, ctx.encoders[k], (ctx.inputs[k],))) for k in range(3)]
    start = merge_encoders("divmerge", {"steps": 0, "granularity": "task"}, ctx)
    learned = merge_encoders("divmerge", {"steps": 60, "lr": 0.05, "granularity": "task"}, ctx)
    js = lambda k, lg: js_divergence(lg, targets[k])  # noqa: E731
    assert _objective(ctx, learned, js) < 0.9 * _objective(ctx, start, js)


def test_js_divergence_is_symmetric_bounded_and_zero_on_equal_inputs():
    p, q = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(js_divergence(p, q), js_divergence(q, p), atol=1e-6)
    assert (js_divergence(p, q) <= torch.log(torch.tensor(2.0)) + 1e-6).all()
    assert torch.allclose(js_divergence(p, p), torch.zeros(5), atol=1e-6)


def test_regmean_is_the_least_squares_merge_of_a_linear_layer():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(30, 4, generator=g) for _ in range(2)]
    ws = [torch.randn(3, 4, generator=g) for _ in range(2)]
    merged = regmean_weight(ws, [x.T.double() @ x.double() for x in xs], alpha=1.0)
    # argmin_W sum_k ||X_k W^T - X_k W_k^T||^2, solved directly
    X = torch.cat(xs).double()
    Y = torch.cat([x.double() @ w.double().T for x, w in zip(xs, ws, strict=True)])
    want = torch.linalg.lstsq(X, Y).solution.T
    assert torch.allclose(merged.double(), want, atol=1e-5)
    # alpha = 0 keeps only the diagonals: a per-input-feature weighted average
    d = [torch.diagonal(x.T @ x) for x in xs]
    avg = regmean_weight(ws, [x.T @ x for x in xs], alpha=0.0)
    assert torch.allclose(avg, (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1]), atol=1e-5)


def test_gram_matrices_cover_every_linear_layer():
    enc = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(10, 3)
    grams = linear_inputs_gram(enc, enc.state_dict(), x)
    assert set(grams) == {"0", "2"}
    assert torch.allclose(grams["0"], (x.T @ x).double(), atol=1e-5)


def test_fisher_weights_parameters_by_their_fisher():
    states = [{"w": torch.tensor([0.0, 10.0])}, {"w": torch.tensor([4.0, 0.0])}]
    fishers = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}]
    out = fisher_average(states, fishers, [1.0, 1.0], epsilon=0.0)
    assert out["w"].tolist() == pytest.approx([3.0, 7.5])
    out = fisher_average(states, fishers, [3.0, 1.0], epsilon=0.0)  # model weights multiply the Fisher
    assert out["w"][0].item() == pytest.approx(12 / 6)


def test_diagonal_fisher_matches_a_loop_over_examples():
    torch.manual_seed(0)
    enc, head = nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    got = diagonal_fisher(enc, head, enc.state_dict(), x, y, batch_size=4)
    want = {n: torch.zeros_like(p) for n, p in enc.named_parameters()}
    for i in range(6):
        enc.zero_grad()
        torch.log_softmax(head(enc(x[i:i + 1])), -1)[0, y[i]].backward()
        for n, p in enc.named_parameters():
            want[n] += p.grad ** 2 / 6
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6), n


def test_data_methods_refuse_regression_tasks(task_models):
    ctx = task_models(2)
    ctx = TaskModels(ctx.encoder, ctx.pretrained, ctx.encoders, ctx.heads,
                     [Task("r0", "regression", 3), Task("r1", "regression", 3)], ctx.inputs, ctx.train_inputs,
                     ctx.train_targets)
    for name in ("fisher", "adamerging", "divmerge"):
        with pytest.raises(ConfigError, match="needs classification tasks"):
            merge_encoders(name, {}, ctx)


def test_data_free_methods_run_on_task_models_too(task_models):
    ctx = task_models(3)
    merged = merge_encoders("ties", {"density": 0.5}, ctx)
    assert set(merged) == set(ctx.pretrained)


def test_regmean_a_feature_one_task_never_activates_is_decided_by_the_others():
    # the minimal case: feature 0 is dead for task A (a ReLU that never fires), alive for task B
    xa = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, -1.0]])
    xb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    wa, wb = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    merged = regmean_weight([wa, wb], [xa.T.double() @ xa.double(), xb.T.double() @ xb.double()], alpha=1.0)

    def objective(w):
        return float(((xa @ w.T - xa @ wa.T) ** 2).sum() + ((xb @ w.T - xb @ wb.T) ** 2).sum())

    exact = torch.linalg.lstsq(torch.cat([xa, xb]).double(), torch.cat([xa @ wa.T, xb @ wb.T]).double()).solution.T
    assert merged.tolist()[0] == pytest.approx([2.7447, 2.4681], abs=1e-4)
    assert torch.allclose(merged.double(), exact, atol=1e-6)
    assert objective(merged) == pytest.approx(5.6170, abs=1e-4)  # the per-task term gave 5.9954


def test_regmean_a_feature_no_task_activates_gets_the_plain_average():
    xa, xb = torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([[0.0, 3.0], [0.0, -1.0]])
    wa, wb = torch.tensor([[1.0, 2.0], [5.0, 1.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    merged = regmean_weight([wa, wb], [xa.T @ xa, xb.T @ xb], alpha=1.0)
    assert merged[:, 0].tolist() == pytest.approx([2.0, 3.0])  # column 0 never matters: the mean of the columns
    # column 1 is the least-squares fit over both tasks' rows: (5 * [2, 1] + 10 * [4, 1]) / 15
    assert merged[:, 1].tolist() == pytest.approx([50 / 15, 1.0])


def test_regmean_gram_mean_weighs_every_task_the_same(task_models):
    ctx = task_models(2)
    few = TaskModels(ctx.encoder, ctx.pretrained, ctx.encoders, ctx.heads, ctx.tasks, ctx.inputs,
                     [ctx.train_inputs[0][:5], ctx.train_inputs[1]], ctx.train_targets)
    summed = merge_encoders("regmean", {"alpha": 1.0}, few)
    mean = merge_encoders("regmean", {"alpha": 1.0, "gram": "mean"}, few)
    grams = [linear_inputs_gram(ctx.encoder, e, x) for e, x in zip(few.encoders, few.train_inputs, strict=True)]
    name = "0.weight"
    want_sum = regmean_weight([e[name] for e in few.encoders], [g["0"] for g in grams], 1.0)
    want_mean = regmean_weight([e[name] for e in few.encoders], [grams[0]["0"] / 5, grams[1]["0"] / 40], 1.0)
    assert torch.allclose(summed[name], want_sum, atol=1e-5) and torch.allclose(mean[name], want_mean, atol=1e-5)
    assert not torch.allclose(summed[name], mean[name], atol=1e-3)


def test_fisher_expected_is_the_exact_expectation_over_classes():
    torch.manual_seed(0)
    enc, head = nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 3)
    x = torch.randn(5, 3)
    got = diagonal_fisher(enc, head, enc.state_dict(), x, expected=True, batch_size=2)
    want = {n: torch.zeros_like(p) for n, p in enc.named_parameters()}
    for i in range(5):
        logp = torch.log_softmax(head(enc(x[i:i + 1])), -1)[0]
        for c in range(3):
            grads = torch.autograd.grad(logp[c], list(enc.parameters()), retain_graph=True)
            for (n, _), g in zip(enc.named_parameters(), grads, strict=True):
                want[n] += logp[c].exp().detach() * g ** 2 / 5
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6), n


def test_fisher_defaults_to_the_exact_expectation(task_models):
    ctx = task_models(2)
    default = merge_encoders("fisher", {"n_examples": 16}, ctx)
    expected = merge_encoders("fisher", {"n_examples": 16, "labels": "expected"}, ctx)
    sampled = merge_encoders("fisher", {"n_examples": 16, "labels": "sample"}, ctx)
    assert all(torch.equal(default[n], expected[n]) for n in default)
    assert any(not torch.allclose(default[n], sampled[n]) for n in default)


def test_adamerging_clamps_in_the_forward_pass_only_by_default(task_models):
    from polytask.merging.data_driven import AdaMergingParams, _learn, combine, entropy

    ctx = task_models(2)
    names = [n for n, t in ctx.pretrained.items() if t.is_floating_point()]
    taus = [{n: e[n] - ctx.pretrained[n] for n in names} for e in ctx.encoders]

    def loss(k, merged, x, rows):
        from torch.func import functional_call

        return entropy(ctx.heads[k](functional_call(ctx.encoder, merged, (x,)))).mean()

    runs = {}
    for mode in ("forward", "project"):
        p = AdaMergingParams(steps=40, lr=0.5, granularity="task", clamp=mode)
        runs[mode] = _learn(ctx, p, 0.9, p.clamp, 0, loss)
    state, _, coef = runs["forward"]
    assert AdaMergingParams().clamp == "forward"
    assert ((coef < 0) | (coef > 1)).any()  # the raw coefficient left [0, 1] (the official code's behaviour) ...
    want = combine(ctx.pretrained, taus, coef.clamp(0, 1), names)  # ... and the model uses it clamped
    assert all(torch.allclose(state[n], want[n], atol=1e-6) for n in names)
    assert ((runs["project"][2] >= 0) & (runs["project"][2] <= 1)).all()  # projected: always inside
