"""Shared test helpers."""


def tiny_config_yaml(out_dir, name="run", extra=""):
    """A run that trains in about a second: a small synthetic suite, a small MLP."""
    return f"""
seed: 3
suite:
  name: synthetic
  params: {{d: 8, groups: [2], unrelated: 1, conflicting_pairs: 0, n_train: 300, n_val: 100, n_test: 100}}
model:
  backbone: mlp
  backbone_params: {{hidden: [32, 16], dropout: 0.1}}
train:
  epochs: 3
  batch_size: 32
  checkpoint_every: 4
  scheduler: {{name: cosine}}
  optimizer: {{name: adam, lr: 0.01}}
methods: [equal, {{name: static, params: {{weights: {{g0_t0: 1.0, g0_t1: 0.5, u0: 2.0}}}}}}]
output: {{dir: {out_dir}, name: {name}}}
{extra}
"""


def assert_summing_aggregator_gives_summed_loss(model, sources, rows, tasks, mode="representation"):
    """An architecture's per-task gradients are exact: ``outputs(features(x))`` is its forward bit for bit (where it
    has features), and a summing aggregator over the per-task gradients (parameter Jacobian, or feature blocks
    pushed back) gives the gradient of the summed loss plus its ``aux_loss``."""
    import torch

    from polytask.aggregators.base import stateless
    from polytask.engine.loop import task_losses
    from polytask.engine.step import Method, train_step
    from polytask.weighting import StepContext

    feats = model.features(sources[0].x)
    if feats is not None:
        for a, b in zip(model.outputs(feats).values(), model(sources[0].x).values(), strict=True):
            assert torch.equal(a, b)
    summed = Method("sum", "aggregator", stateless(lambda g: torch.ones(g.shape[0], dtype=g.dtype), "gramian"),
                    mode=mode)
    train_step(model, summed, summed.init(), sources, rows, tasks, torch.optim.SGD(model.parameters(), lr=0.0),
               StepContext(0, 0), task_losses)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = task_losses(model, sources, rows, tasks).sum()
    aux = model.aux_loss()
    (total if aux is None else total + aux).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def three_task_batch(n=16, d=6, seed=0):
    """A batch for the tasks a (3 classes), b (regression), c (2 classes) on ``d`` features: (sources, rows)."""
    import torch

    from polytask.tasks import TaskData

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = {"a": torch.randint(0, 3, (n,), generator=g).float(), "b": torch.randn(n, generator=g),
         "c": torch.randint(0, 2, (n,), generator=g).float()}
    return [TaskData(x, y)], [torch.arange(n)]


def expert_by_hand(bank, e, x):
    """Expert ``e`` of a stacked expert bank (``models.experts.StackedExperts``), by hand: its Linear+ReLU layers one
    after the other."""
    import torch

    for w, b in zip(bank.weights, bank.biases, strict=True):
        x = torch.relu(x @ w[e] + b[e])
    return x


def tasks_reaching(model, x, names):
    """For every trainable parameter of ``model``, the tasks among ``names`` whose (random projection of the)
    output on ``x`` reaches it."""
    import torch

    out = model(x)
    g = torch.Generator().manual_seed(1)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    hits = {k: set() for k, _ in named}
    for n in names:
        loss = (out[n] * torch.randn(out[n].shape, generator=g)).sum()
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        for (k, _), gr in zip(named, grads, strict=True):
            if gr.abs().sum() > 0:
                hits[k].add(n)
    return hits


def assert_well_formed(page):
    """Every non-void element of the HTML ``page`` is closed, in order."""
    from html.parser import HTMLParser

    class Strict(HTMLParser):
        VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "path", "line", "circle", "rect", "polyline"})

        def __init__(self):
            super().__init__()
            self.stack = []

        def handle_starttag(self, tag, attrs):
            if tag not in self.VOID:
                self.stack.append(tag)

        def handle_startendtag(self, tag, attrs):
            pass

        def handle_endtag(self, tag):
            if tag in self.VOID:
                return
            assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> in {self.stack[-3:]}"
            self.stack.pop()

    parser = Strict()
    parser.feed(page)
    parser.close()
    assert parser.stack == []


def assert_is_float64_direction(d, j64, name, names, ctx, label):
    """``d`` (the engine's direction, float64) equals what aggregator ``name`` gives on the exact float64 Jacobian
    ``j64`` (K x P; Gramian aggregators get j64 j64^T and combine in float64): cosine > 1 - 1e-6, norm within 1e-4."""
    from polytask.aggregators import build_aggregator

    agg = build_aggregator(name, None, names)
    if agg.input == "gramian":
        ref = agg.update(agg.init(), j64 @ j64.T, ctx)[0] @ j64
    else:
        ref = agg.update(agg.init(), j64, ctx)[0]
    assert ref.norm() > 0, label
    cos = float(d @ ref / (d.norm() * ref.norm()))
    assert cos > 1 - 1e-6, (label, cos)
    assert abs(float(d.norm() / ref.norm()) - 1) < 1e-4, label
