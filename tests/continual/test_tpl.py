"""HAT (hard attention masks) and TPL (likelihood-ratio task prediction): the masks' math, earlier tasks' outputs kept
exactly under binary masks, the task-prediction scores on synthetic Gaussians, and TPL against naive and replay on
split-digits (class-incremental; its accuracy against naive and replay is measured outside the tests)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance

from polytask.config import MethodConfig
from polytask.continual import build_strategy, build_stream
from polytask.continual.config import ContinualConfig
from polytask.continual.strategies.hat import anneal, compensation, mask_regulariser, weight_factor
from polytask.continual.strategies.tpl import (
    FLOOR,
    calibrate,
    class_log_probs,
    class_statistics,
    knn_distance,
    md_score,
    normalise,
    positive_scale,
    tpl_score,
)
from polytask.engine import checkpoint
from polytask.engine.data import batch_source
from polytask.engine.loop import train_job
from polytask.engine.optim import optimizer
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.state import seed_everything
from polytask.engine.step import build_method
from polytask.errors import ConfigError
from polytask.flows.continual import continual
from polytask.models import build_model

# ---------------------------------------------------------------- HAT's math


def test_hat_anneal_masks_regulariser_and_compensation_follow_the_paper():
    smax = 400.0
    assert anneal(0, 10, smax) == pytest.approx(1 / smax) and anneal(9, 10, smax) == smax  # Eq. 3, b = 1 and B
    assert anneal(1, 1, smax) == smax and anneal(4, 9, smax) == pytest.approx(1 / smax + (smax - 1 / smax) / 2)
    out, inp = torch.tensor([1.0, 0.0, 0.3]), torch.tensor([0.2, 1.0])
    want = torch.tensor([[0.8, 0.0], [1.0, 1.0], [0.8, 0.7]])  # 1 - min(a_out[i], a_in[j]) (Eq. 2)
    assert torch.allclose(weight_factor(out, inp), want)
    assert torch.equal(weight_factor(out, None), (1 - out)[:, None])
    masks, none = [torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0, 1.0])], [torch.zeros(2), torch.zeros(3)]
    assert float(mask_regulariser(masks, none, 0.75)) == pytest.approx(0.75 * 3.5 / 5)  # first task: c · mean
    used = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0, 0.5])]
    assert float(mask_regulariser(masks, used, 0.75)) == pytest.approx(0.75 * (1.0 + 0.5) / 2.5)  # Eq. 5
    full = [torch.ones(2), torch.ones(3)]
    assert float(mask_regulariser(masks, full, 0.75)) == 0.0
    e = torch.tensor([0.1, -2.0])
    want = smax / 4 * (torch.cosh(torch.clamp(4 * e, -50, 50)) + 1) / (torch.cosh(e) + 1)
    assert torch.allclose(compensation(e, 4.0, smax, 50), want)
    # the compensated gradient of σ(s e) is smax/s (cosh(s e)+1)/(cosh(e)+1) times it: the gradient of σ(smax e')
    # at e' = e scaled so that the slope's change does not shrink the step (a finite, positive factor)
    assert bool((compensation(e, 1 / smax, smax, 50) > 0).all())


def _train(strategy, model, stream, i, tmp_path, epochs, opt="sgd", end=True):
    """Experience ``i`` trained as the continual flow trains it (fresh optimiser, the strategy as the hook)."""
    strategy.begin(stream, i)
    suite = strategy.train_suite(stream, i)
    params = {"lr": 0.1, "momentum": 0.9} if opt == "sgd" else {"lr": 0.01}
    spec = TrainSpec(name=f"e{i}", tasks=suite.tasks, model=model, optimizer=optimizer(opt, params),
                     method=build_method(MethodConfig(name="equal"), [t.name for t in suite.tasks]),
                     data=batch_source(suite.splits, 32), epochs=epochs, seed=i, hooks=(strategy,), select="last",
                     checkpoint=CheckpointPolicy(tmp_path / f"e{i}"))
    train_job(spec)
    if end:
        strategy.end(model, stream, i, torch.device("cpu"))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_hat_binary_masks_keep_earlier_tasks_outputs_bit_identical(tmp_path, opt):
    """With task 0's gates exactly 0 or 1 (embeddings at ±thres_emb: σ(400·6) is 1 in float32), training task 1
    moves shared weights but leaves every output of task 0 bit for bit (Eq. 2 blocks what task 0 uses, and what it
    does not use is multiplied by an exact 0)."""
    stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    strategy = build_strategy("hat", {}, "test")
    seed_everything(0)
    model = strategy.wrap(build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": [32, 16]}), stream)
    _train(strategy, model, stream, 0, tmp_path, 1, opt, end=False)
    with torch.no_grad():
        for e in model.encoder.embeddings:
            e[0] = torch.where(e[0] >= 0, 6.0, -6.0)
    strategy.end(model, stream, 0, torch.device("cpu"))
    assert all(set(u.unique().tolist()) <= {0.0, 1.0} for u in model.encoder.used)
    x = stream.experiences[0].suite.splits["test"][0].x
    model.eval()
    with torch.no_grad():
        before = model(x, ["e0"])["e0"].clone()
    weights = [lin.weight.detach().clone() for lin in model.encoder.linears]
    _train(strategy, model, stream, 1, tmp_path, 2, opt)
    model.eval()
    with torch.no_grad():
        after = model(x, ["e0"])["e0"]
    assert torch.equal(before, after)
    assert any(not torch.equal(w, lin.weight) for w, lin in zip(weights, model.encoder.linears, strict=True))


def test_hat_in_the_flow_keeps_earlier_tasks(tmp_path):
    """hat on task-incremental split-digits (MLP [64], 3 epochs): the masks learnt with smax = 400 are close to
    binary, so the accuracy of earlier tasks stays where it was while every task is learnt."""
    cfg = {"seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": "task"}},
           "model": {"backbone": "mlp", "backbone_params": {"hidden": [64]}},
           "train": {"epochs": 3, "batch_size": 32, "checkpoint_every": 0,
                     "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
           "strategies": ["hat"], "output": {"dir": str(tmp_path), "name": "hat"}}
    _, summary = continual(ContinualConfig.model_validate(cfg))
    (hat,) = summary["results"]["hat"]
    r = np.asarray(hat["accuracy"])
    assert np.all(np.diag(r) > 0.8)
    assert hat["metrics"]["forgetting"] <= 0.02


# ---------------------------------------------------------------- TPL's scores


def test_class_statistics_match_sklearn_empirical_covariance():
    """The shared precision is that of the authors' code: sklearn's EmpiricalCovariance on class-centred features."""
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    h[:, 4] = h[:, 0] + h[:, 1]  # a singular covariance: the pseudo-inverse
    means, precision = class_statistics(h, y, [0, 1, 2])
    centred = torch.cat([h[y == c] - h[y == c].mean(0) for c in range(3)]).double().numpy()
    ref = EmpiricalCovariance(assume_centered=False).fit(centred)
    assert np.allclose(precision.numpy(), ref.precision_, atol=1e-6)
    assert torch.allclose(means[1], h[y == 1].double().mean(0))


def test_knn_distance_is_the_kth_nearest_squared_distance():
    g = torch.Generator().manual_seed(1)
    h, bank = torch.randn(7, 4, generator=g), normalise(torch.randn(9, 4, generator=g))
    brute = ((normalise(h)[:, None] - bank[None]) ** 2).sum(-1).sort(1).values
    assert torch.allclose(knn_distance(h, bank, 3), brute[:, 2], atol=1e-6)
    assert torch.allclose(knn_distance(h, bank, 50), brute[:, -1], atol=1e-6)  # fewer rows than k: the farthest
    assert torch.equal(knn_distance(h, bank[:0], 3), torch.zeros(7))


def _gaussian_tasks(n_tasks=3, per_class=(100, 50), dim=8, seed=0):
    """Well-separated Gaussian classes, two per task: (train, test) features and labels, class c in task c // 2."""
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(2 * n_tasks, dim, generator=g)
    out = []
    for n in per_class:
        y = torch.arange(2 * n_tasks).repeat_interleave(n)
        out.append((centres[y] + torch.randn(len(y), dim, generator=g), y))
    return out


def test_likelihood_ratio_task_prediction_recovers_the_task_on_separated_gaussians():
    """Each task's in-task (Mahalanobis) and out-of-task (KNN over a small sample of the other tasks) scores, and
    the full TPL score with the maximum logit, pick the task a test row came from; the calibration fitted on the
    buffer sample does not lose that."""
    (xtr, ytr), (xte, yte) = _gaussian_tasks()
    n_tasks = 3
    buffer = torch.cat([torch.nonzero(ytr == c).flatten()[:10] for c in range(2 * n_tasks)])
    lr_scores, tpl_scores, buffer_scores = [], [], []
    for t in range(n_tasks):
        classes = [2 * t, 2 * t + 1]
        own = torch.isin(ytr, torch.tensor(classes))
        means, precision = class_statistics(xtr[own], ytr[own], classes)
        bank = normalise(xtr[buffer][ytr[buffer] // 2 != t])

        def logits(h, means=means, precision=precision):  # a within-task linear (LDA) head
            p = precision.float()
            m = means.float()
            return h @ p @ m.T - 0.5 * ((m @ p) * m).sum(1) + 50

        mds, mls = positive_scale(md_score(xtr[own], means, precision).mean()), positive_scale(
            logits(xtr[own]).max(1).values.mean())

        def score(h, mds=mds, mls=mls, means=means, precision=precision, bank=bank, logits=logits):
            md = md_score(h, means, precision).float()
            return md / mds + knn_distance(h, bank, 5), tpl_score(md, knn_distance(h, bank, 5),
                                                                  logits(h).max(1).values, mds, mls)

        a, b = score(xte)
        lr_scores.append(a)
        tpl_scores.append(b)
        buffer_scores.append(score(xtr[buffer])[1])
    task = yte // 2
    assert (torch.stack(lr_scores, 1).argmax(1) == task).float().mean() > 0.97
    s = torch.stack(tpl_scores, 1)
    assert (s.argmax(1) == task).float().mean() > 0.97
    w, b = calibrate(torch.stack(buffer_scores, 1), ytr[buffer] // 2, 100, 0.01, 0.8)
    assert ((s * w + b).argmax(1) == task).float().mean() > 0.97
    before = F.cross_entropy(torch.stack(buffer_scores, 1), ytr[buffer] // 2)
    assert F.cross_entropy(torch.stack(buffer_scores, 1) * w + b, ytr[buffer] // 2) <= before


def test_class_log_probs_are_the_joint_distribution():
    """``log Σ_t P(c|x,t) P(t|x)``: a distribution over the classes the learnt tasks own (a class two tasks own sums
    both), FLOOR for the rest."""
    member = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 2, 5, generator=g)
    within = torch.log_softmax(z.masked_fill(~member[None], -torch.inf), 2)
    task = torch.log_softmax(torch.randn(4, 2, generator=g), 1)
    out = class_log_probs(within, task, member)
    assert torch.allclose(out[:, :4].exp().sum(1), torch.ones(4)) and bool((out[:, 4] == FLOOR).all())
    assert torch.allclose(out[:, 2], within[:, 1, 2] + task[:, 1])
    shared = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    within = torch.log_softmax(torch.randn(4, 2, 3, generator=g).masked_fill(~shared[None], -torch.inf), 2)
    out = class_log_probs(within, task, shared)
    assert torch.allclose(out[:, 1].exp(), (within[:, 0, 1] + task[:, 0]).exp() + (within[:, 1, 1] + task[:, 1]).exp())
    assert torch.allclose(out.exp().sum(1), torch.ones(4))


# ---------------------------------------------------------------- TPL on split-digits


def digits_config(tmp_path, strategies, epochs=5, name="run", **train):
    return {"seeds": [0], "stream": {"name": "split-digits", "params": {"scenario": "class"}},
            "model": {"backbone": "mlp", "backbone_params": {"hidden": [64]}},
            "train": {"epochs": epochs, "batch_size": 16, "checkpoint_every": 0,
                      "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, **train},
            "strategies": strategies, "output": {"dir": str(tmp_path), "name": name}}


def test_tpl_beats_naive_on_split_digits(tmp_path):
    """Class-incremental split-digits (5 experiences of 2 classes, MLP [64], 5 epochs of batches of 16): TPL's average
    accuracy is far above naive's (measured: 0.89 against 0.20) with little forgetting; every state the model holds
    has its final shape from the start, so the last experience's checkpoint loads into a freshly wrapped model and
    evaluates the same."""
    cfg = digits_config(tmp_path, ["naive", "tpl"])
    run_dir, summary = continual(ContinualConfig.model_validate(cfg))
    acc = {k: v[0]["metrics"]["average_accuracy"] for k, v in summary["results"].items()}
    assert acc["tpl"] > 0.8 and acc["tpl"] > acc["naive"] + 0.5, acc
    assert summary["results"]["tpl"][0]["metrics"]["forgetting"] < 0.1
    stream = build_stream("split-digits", {"scenario": "class"}, seed=0)
    strategy = build_strategy("tpl", {}, "test")
    fresh = strategy.wrap(build_model(stream.tasks, stream.input_shape, "mlp", {"hidden": [64]}), stream)
    saved = checkpoint.load(run_dir / "jobs" / "tpl-s0" / "e4" / "end.safetensors")
    fresh.load_state_dict(saved["model"])
    fresh.eval()
    test = stream.experiences[0].suite.splits["test"][0]
    with torch.no_grad():
        pred = fresh(test.x, ["class"])["class"].argmax(1)
    assert float((pred == test.y["class"].long()).float().mean()) == pytest.approx(
        summary["results"]["tpl"][0]["accuracy"][-1][0])
    assert int(fresh.live) == 5 and not torch.equal(fresh.calib_w, torch.ones(5))  # calibrated


def test_tpl_and_hat_refuse_what_they_cannot_run(tmp_path):
    task_stream = build_stream("split-digits", {"scenario": "task"}, seed=0)
    with pytest.raises(ConfigError, match="does not apply to a task-incremental stream"):
        build_strategy("tpl", {}, "tpl").check(task_stream, "tpl")
    class_stream = build_stream("split-digits", {"scenario": "class"}, seed=0)
    with pytest.raises(ConfigError, match="does not apply to a class-incremental stream"):
        build_strategy("hat", {}, "hat").check(class_stream, "hat")
    no_hidden = build_model(class_stream.tasks, class_stream.input_shape, "mlp", {"hidden": []})
    with pytest.raises(ConfigError, match=r"model\.backbone: mlp with at least one hidden layer"):
        build_strategy("tpl", {}, "tpl").wrap(no_hidden, class_stream)
    with pytest.raises(ConfigError, match="update"):
        build_strategy("tpl", {"update": "step"}, "tpl")
    cfg = digits_config(tmp_path, ["tpl"], epochs=1, name="wd")
    cfg["train"]["optimizer"]["weight_decay"] = 1e-4
    with pytest.raises(ConfigError, match=r"train\.optimizer\.weight_decay"):
        continual(ContinualConfig.model_validate(cfg))
