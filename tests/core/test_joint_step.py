"""JointStep (one call in the user's own loop): for every registered method and both gradient modes it sets the
gradients the engine's step sets on the same model and batch, step after step; per-task features given as a dict
give the exact per-task Jacobian; its state round-trips through a safetensors checkpoint and resumes exactly;
inputs it cannot use are errors naming the argument; `import polytask` stays free of torch; the example runs."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import polytask
from polytask.aggregators import aggregate
from polytask.config import MethodConfig
from polytask.engine import checkpoint
from polytask.engine.loop import task_losses
from polytask.engine.step import build_method, masked_loss, step_generator, train_step
from polytask.errors import CheckpointError, ConfigError
from polytask.methods import load_all
from polytask.models import build_model
from polytask.tasks import Task, TaskData
from polytask.weighting import StepContext

ROOT = Path(__file__).resolve().parents[2]
METHODS = [n for n in load_all().names() if not load_all().get(n).extra.get("pareto")]  # ensembles: run only
TASKS = [Task("a", "classification", 3), Task("b", "regression", 1), Task("c", "classification", 2)]
NAMES = [t.name for t in TASKS]
# parameters that make a method act within three steps (CoBa adjusts after warm-up; static needs its weights)
PARAMS = {"static": {"weights": {"a": 1.0, "b": 2.0, "c": 0.5}}, "coba": {"warmup_steps": 0, "window": 2}}
SEED, LR, STEPS = 5, 0.05, 3


def batch(two_sources: bool):
    """Training sources (c's labels partly missing; with two sources, task c lives in the second) and a
    validation source."""
    g = torch.Generator().manual_seed(1)

    def labels(n, names):
        y = {"a": torch.randint(0, 3, (n,), generator=g).float(), "b": torch.randn(n, generator=g),
             "c": torch.randint(0, 2, (n,), generator=g).float()}
        y["c"][:3] = float("nan")
        return {k: v for k, v in y.items() if k in names}

    if two_sources:
        train = [TaskData(torch.randn(12, 6, generator=g), labels(12, "ab")),
                 TaskData(torch.randn(10, 6, generator=g), labels(10, "c"))]
    else:
        train = [TaskData(torch.randn(16, 6, generator=g), labels(16, "abc"))]
    return train, [TaskData(torch.randn(8, 6, generator=g), labels(8, "abc"))]


def fresh_model():
    torch.manual_seed(0)
    return build_model(TASKS, (6,), "mlp", {"hidden": [8, 5]})


def all_rows(sources):
    return [torch.arange(len(s)) for s in sources]


def engine_run(name, mode, two_sources, **kw):
    """Gradients and weights the engine's step sets, step by step (the loop's ctx: seed, step, val losses)."""
    model, (train, val) = fresh_model(), batch(two_sources)
    rows, opt = all_rows(train), torch.optim.SGD(model.parameters(), lr=LR)
    method = build_method(MethodConfig(name=name, grad_mode=mode, params=PARAMS.get(name, {}), **kw), NAMES)
    state, out = method.init(), []

    def val_losses():
        with torch.no_grad():
            return task_losses(model, val, all_rows(val), TASKS)

    for i in range(STEPS):
        ctx = StepContext(i, 0, None, val_losses if method.needs_val else None, 1, step_generator(SEED, i))
        _, w, state = train_step(model, method, state, train, rows, TASKS, opt, ctx, task_losses)
        out.append(({n: p.grad.clone() for n, p in model.named_parameters()}, w))
    return out


def user_losses(model, sources):
    """The user's own forward: encoder, then each task's head on the features of its source."""
    feats, losses = {}, {}
    for src in sources:
        z = model.encoder(src.x)
        for t in TASKS:
            if t.name in src.y:
                feats[t.name] = z
                losses[t.name] = masked_loss(t, model.heads[t.name](z), src.y[t.name])
    return feats, losses


def joint_step_run(name, mode, two_sources, use_features=True, **kw):
    model, (train, val) = fresh_model(), batch(two_sources)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mtl = polytask.JointStep(name, NAMES, mode=mode, params=PARAMS.get(name), seed=SEED, **kw)
    out = []

    def val_losses():
        return user_losses(model, val)[1]

    def closure():
        return user_losses(model, train)[1]

    for _ in range(STEPS):
        opt.zero_grad()
        feats, losses = user_losses(model, train)
        features = (feats if two_sources else feats["a"]) if use_features else None
        w = mtl.backward(losses, features=features, shared=model.encoder, heads=model.heads,
                         val_losses=val_losses if mtl.needs_val else None, closure=closure)
        out.append(({n: p.grad.clone() for n, p in model.named_parameters()}, w))
        opt.step()
        with torch.no_grad():
            mtl.after_step(user_losses(model, train)[1])
    return out


def assert_same(got, want, label, rtol=1e-5, atol=1e-7):
    for step, ((g, wg), (e, we)) in enumerate(zip(got, want, strict=True)):
        for n in e:
            torch.testing.assert_close(g[n], e[n], rtol=rtol, atol=atol, msg=f"{label} step {step}: {n}")
        assert (wg is None) == (we is None), label
        if we is not None:
            torch.testing.assert_close(wg.double(), we.double(), rtol=rtol, atol=atol, msg=f"{label} step {step}")


@pytest.mark.parametrize("two_sources", [False, True], ids=["one_features", "features_by_task"])
@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("name", METHODS)
def test_same_gradients_as_the_engine_step(name, mode, two_sources):
    want = engine_run(name, mode, two_sources)
    assert_same(joint_step_run(name, mode, two_sources), want, f"{name}/{mode}")


@pytest.mark.parametrize("name", METHODS)
def test_params_mode_without_features_gives_the_engine_gradients(name):
    # the per-task Jacobian straight from the losses (one batched VJP through the whole model): same gradients,
    # up to the rounding of another order of operations
    want = engine_run(name, "params", False)
    assert_same(joint_step_run(name, "params", False, use_features=False), want, name, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", [{"sam_rho": 0.05}, {"chunk_size": 1}, {"chunk_size": 2, "sam_rho": 0.1}])
def test_fmtl_and_chunks_as_the_engine(kw):
    for name in ("mean", "upgrad"):
        assert_same(joint_step_run(name, "params", False, **kw), engine_run(name, "params", False, **kw), name)


class TwoGates(nn.Module):
    """MMoE-like: two experts mixed by per-task gates, so each task reads its own features."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 5), nn.Linear(4, 5)])
        self.gates = nn.Parameter(torch.tensor([[0.3, 0.7], [0.8, 0.2]]))

    def forward(self, x):
        e = [torch.tanh(m(x)) for m in self.experts]
        return {t: self.gates[i, 0] * e[0] + self.gates[i, 1] * e[1] for i, t in enumerate("ab")}


@pytest.mark.parametrize("name", ["mean", "upgrad", "mgda"])
def test_features_by_task_give_the_exact_per_task_jacobian(name):
    torch.manual_seed(0)
    shared, heads = TwoGates(), nn.ModuleDict({"a": nn.Linear(5, 1), "b": nn.Linear(5, 1)})
    x, y = torch.randn(9, 4), torch.randn(9, 1)

    def losses():
        z = shared(x)
        return z, {t: ((heads[t](z[t]) - y * (i + 1)) ** 2).mean() for i, t in enumerate("ab")}

    z, ls = losses()
    params = list(shared.parameters())
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(ls[t], params, retain_graph=True)])
                       for t in "ab"])
    want, _ = aggregate(name, jac)
    w = polytask.JointStep(name, ["a", "b"]).backward(ls, features=z, shared=shared, heads=heads)
    got = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    scaled = load_all().get(name).extra.get("weights_heads", False)
    for k, t in enumerate("ab"):  # each head gets its own task's gradient (times its weight where the method says)
        own = torch.autograd.grad(losses()[1][t], list(heads[t].parameters()))
        for p, g in zip(heads[t].parameters(), own, strict=True):
            torch.testing.assert_close(p.grad, g * float(w[k]) if scaled else g)


def stepper(name, mode):
    model, (train, val) = fresh_model(), batch(False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mtl = polytask.JointStep(name, NAMES, mode=mode, params=PARAMS.get(name), seed=SEED)

    def one(epoch):
        opt.zero_grad()
        feats, losses = user_losses(model, train)
        mtl.backward(losses, features=feats["a"], shared=model.encoder, heads=model.heads, epoch=epoch,
                     val_losses=lambda: user_losses(model, val)[1])
        opt.step()
        with torch.no_grad():
            mtl.after_step(user_losses(model, train)[1])
    return model, opt, mtl, one


@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("name", METHODS)
def test_state_dict_through_a_checkpoint_resumes_exactly(name, mode, tmp_path):
    epochs = [0, 0, 1, 1, 2, 2]  # DWA needs completed epochs
    model, _, _, one = stepper(name, mode)
    for e in epochs:
        one(e)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, mtl, one = stepper(name, mode)
    for e in epochs[:3]:
        one(e)
    sd = mtl.state_dict()
    checkpoint.save(tmp_path / "ckpt.safetensors", {"model": model.state_dict(), "opt": opt.state_dict(), "mtl": sd})
    model, opt, mtl, one = stepper(name, mode)
    saved = checkpoint.load(tmp_path / "ckpt.safetensors")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    mtl.load_state_dict(saved["mtl"])
    for e in epochs[3:]:
        one(e)
    for a, b in zip(straight, model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_leaves_are_tensors_or_json_values():
    def leaves(tree):
        if isinstance(tree, dict):
            assert all(isinstance(k, str) for k in tree)
            return [x for v in tree.values() for x in leaves(v)]
        if isinstance(tree, (list, tuple)):
            return [x for v in tree for x in leaves(v)]
        return [tree]

    for name in METHODS:
        _, _, mtl, one = stepper(name, "params")
        one(0)
        for leaf in leaves(mtl.state_dict()):
            assert leaf is None or isinstance(leaf, (torch.Tensor, bool, int, float, str)), (name, type(leaf))


def simple():
    torch.manual_seed(0)
    enc, heads = nn.Linear(3, 4), nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    z = enc(torch.randn(5, 3))
    return enc, heads, z, {t: heads[t](z).pow(2).mean() for t in "ab"}


def test_inputs_it_cannot_use_are_errors_naming_the_argument():
    enc, heads, z, losses = simple()
    with pytest.raises(ConfigError, match=r"no loss for task\(s\) \['b'\]"):
        polytask.JointStep("upgrad", ["a", "b"]).backward({"a": losses["a"]}, features=z, shared=enc)
    with pytest.raises(ConfigError, match="pass shared="):
        polytask.JointStep("upgrad", ["a", "b"]).backward(losses, features=z)
    with pytest.raises(ConfigError, match="pass features="):
        polytask.JointStep("upgrad", ["a", "b"], mode="representation").backward(losses, shared=enc)
    with pytest.raises(ConfigError, match=r"no entry for task\(s\) \['b'\]"):
        polytask.JointStep("upgrad", ["a", "b"]).backward(losses, features={"a": z}, shared=enc)
    with pytest.raises(ConfigError, match="require grad"):
        polytask.JointStep("upgrad", ["a", "b"]).backward(losses, features=z.detach(), shared=enc)
    with pytest.raises(ConfigError, match=r"both shared and heads\['a'\]"):
        polytask.JointStep("upgrad", ["a", "b"]).backward(losses, features=z, shared=enc, heads={"a": enc})
    with pytest.raises(ConfigError, match="val_losses="):
        polytask.JointStep("coba", ["a", "b"]).backward(losses)
    with pytest.raises(ConfigError, match="closure="):
        polytask.JointStep("mean", ["a", "b"], sam_rho=0.1).backward(losses, features=z, shared=enc, heads=heads)
    with pytest.raises(ConfigError, match=r"JointStep.grad_mode"):
        polytask.JointStep("upgrad", ["a", "b"], mode="rep")
    with pytest.raises(ConfigError, match="did you mean 'upgrad'"):
        polytask.JointStep("upgrd", ["a", "b"])


def test_famo_must_be_told_the_losses_after_the_step():
    *_, losses = simple()
    mtl = polytask.JointStep("famo", ["a", "b"])
    assert mtl.needs_after_step and not polytask.JointStep("upgrad", ["a", "b"]).needs_after_step
    mtl.backward(losses)
    _, _, _, again = simple()
    with pytest.raises(ConfigError, match=r"call JointStep.after_step\(losses\) after opt.step\(\)"):
        mtl.backward(again)
    xi = mtl.state["xi"].clone()
    mtl.after_step({t: v.detach() * 0.5 for t, v in again.items()})
    assert not torch.equal(mtl.state["xi"], xi)
    mtl.backward(again)


def test_load_state_dict_of_another_method_or_tasks_is_refused():
    sd = polytask.JointStep("upgrad", ["a", "b"]).state_dict()
    with pytest.raises(CheckpointError, match=r"state_dict\['method'\] is 'upgrad', this JointStep has 'mgda'"):
        polytask.JointStep("mgda", ["a", "b"]).load_state_dict(sd)
    with pytest.raises(CheckpointError, match=r"state_dict\['tasks'\]"):
        polytask.JointStep("upgrad", ["b", "a"]).load_state_dict(sd)


def test_gradients_add_up_like_loss_backward():
    enc, heads, _, _ = simple()
    x = torch.randn(5, 3)
    once = None
    for _ in range(2):  # two identical micro-batches: the gradients add up
        z = enc(x)
        polytask.JointStep("upgrad", ["a", "b"]).backward({t: heads[t](z).pow(2).mean() for t in "ab"}, features=z,
                                                          shared=enc, heads=heads)
        once = once or [p.grad.clone() for p in [*enc.parameters(), *heads.parameters()]]
    for g, p in zip(once, [*enc.parameters(), *heads.parameters()], strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_import_polytask_stays_free_of_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import polytask; polytask.__version__"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "import time:" in line}
    assert "torch" not in names
    assert "JointStep" in dir(polytask) and polytask.JointStep.__module__ == "polytask.joint_step"


def test_example_joint_step_loop_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = ROOT / "examples" / "joint_step_loop.py"
    assert len(script.read_text().splitlines()) <= 40
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    first, last = (json.loads(line) for line in (out.splitlines()[0], out.splitlines()[-1]))
    assert last["loss"] < first["loss"]  # the user's loop trains


def test_a_weight_ensemble_method_is_refused_outside_a_run():
    """PaMaL wraps the job's model and sets its losses, which only a run's jobs do: JointStep and fit say so
    instead of silently training its inner weighting."""
    from polytask import JointStep
    from polytask.errors import ConfigError

    pareto = [n for n in load_all().names() if load_all().get(n).extra.get("pareto")]
    assert pareto
    for name in pareto:
        with pytest.raises(ConfigError, match=f"{name} trains a weight ensemble"):
            JointStep(name, ["a", "b"])
