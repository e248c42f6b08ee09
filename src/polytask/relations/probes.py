"""Affinity estimators that ride on a joint training run.

A probe looks at the run every ``every`` steps (before the optimiser step, on the step's batch) or at
the end of every epoch, keeps explicit state, and turns it into an affinity matrix at the end. Probes run
in eval mode and draw no random numbers, so the training run they ride on is unchanged by them.

- ``grad_cosine``: cosine similarity of the per-task gradients of the shared parameters, averaged.
- ``lookahead``: TAG inter-task affinity (Fifty et al. 2021): a virtual update of the shared parameters on
  task i's gradient alone, then Z(i->j) = 1 - L_j(after) / L_j(before) on the same batch, averaged over the
  probed steps. By default the paper's step (Eq. 2: theta - lr * grad L_i, plain SGD at the run's current
  learning rate, no optimiser state); ``update="optimizer"`` steps with the run's own optimiser rule instead
  (momentum buffers and Adam moments included).
- ``datamap``: data maps (Swayamdipta et al. 2020) per task, the features of STG-MTL task grouping: per
  training sample, the mean and the variability (std) across epochs of the model's confidence in the gold
  label (softmax probability; for regression exp(-squared error)).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from polytask.engine.hooks import Hook, Run, StepView
from polytask.errors import ConfigError, DataError
from polytask.models import MultiTaskModel
from polytask.models.mode import evaluating
from polytask.tasks.task import Task, TaskData

State = dict[str, Any]


def sgd_update(opt: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor],
               lr: float | None = None) -> list[Tensor]:
    """TAG's lookahead step (Fifty et al. 2021, Eq. 2): theta - lr * grad, with no optimiser state.

    ``lr`` defaults to each parameter's current learning rate in ``opt``. Unlike the official Taskonomy code
    (google-research/tag, ``tag.patch``: ``lookahead``), it adds no weight-decay term; that code reads the momentum
    buffer from the param-group dict, where it never is, so its step uses no momentum either. A grad may carry
    extra leading dimensions (one row per task): the result then has them too."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = []
    for p, g in zip(params, grads, strict=True):
        g = g.reshape(*g.shape[:g.dim() - p.dim()], *p.shape).to(p.dtype)
        out.append(p.detach() - (group_of[id(p)]["lr"] if lr is None else lr) * g)
    return out


def virtual_update(opt: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                   grads: Sequence[Tensor]) -> list[Tensor]:
    """The parameters ``opt.step()`` would produce from ``grads``, leaving ``opt`` and ``params`` untouched.

    Supports SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW, as torch implements them.
    A grad may carry extra leading dimensions (e.g. one row per task): the result then has them too."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = []
    for p, g in zip(params, grads, strict=True):
        group, state = group_of[id(p)], opt.state.get(p, {})
        g = g.reshape(*g.shape[:g.dim() - p.dim()], *p.shape).to(p.dtype)
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        if isinstance(opt, torch.optim.SGD):
            d = g + wd * p if wd else g
            mu = group["momentum"]
            if mu:
                buf = state.get("momentum_buffer")
                buf = d.clone() if buf is None else buf * mu + (1 - group["dampening"]) * d
                d = d + mu * buf if group["nesterov"] else buf
            out.append(p.detach() - lr * d)
        elif isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            if group.get("amsgrad"):
                raise ConfigError("lookahead affinity: amsgrad is not supported")
            b1, b2 = group["betas"]
            theta = p.detach()
            if isinstance(opt, torch.optim.AdamW):
                theta = theta * (1 - lr * wd)
            elif wd:
                g = g + wd * p
            t = float(state["step"]) + 1 if "step" in state else 1.0
            m = torch.add(state["exp_avg"] * b1, g, alpha=1 - b1) if "exp_avg" in state else g * (1 - b1)
            v = torch.addcmul(state["exp_avg_sq"] * b2 if "exp_avg_sq" in state else torch.zeros_like(p), g, g,
                              value=1 - b2)
            denom = v.sqrt_().div_(math.sqrt(1 - b2**t)).add_(group["eps"])
            out.append(torch.addcdiv(theta, m, denom, value=-lr / (1 - b1**t)))
        else:
            raise ConfigError(f"lookahead affinity: optimiser {type(opt).__name__} is not supported (sgd, adam, adamw)")
    return out


@dataclass
class ProbeBatch:
    """One probed step: the batch, and its per-task shared-parameter gradients computed once on demand."""

    model: MultiTaskModel
    opt: torch.optim.Optimizer
    sources: Sequence[TaskData]
    rows: Sequence[Tensor]
    tasks: Sequence[Task]
    _cache: dict[str, Any] = field(default_factory=dict)

    clock: Callable[[], float] = time.perf_counter
    grad_seconds: float = 0.0  # time spent computing the per-task gradients (once per probed step)
    used_grads: bool = False  # set when a probe asks for the gradients (reset by ProbeSet before each probe)

    def grads(self) -> tuple[Tensor, list[Tensor]]:
        """(K losses, per-task gradient blocks of the shared parameters)."""
        self.used_grads = True
        if "grads" not in self._cache and next(iter(self.model.shared_parameters()), None) is None:
            raise ConfigError("relate: the gradient probes (lookahead, grad_cosine) compare the tasks' gradients of "
                              "the shared parameters, and none trains (a frozen encoder, e.g. model.backbone_params."
                              "train: none); let some train (train: 1, lora) or use logme, leep, hscore or nce")
        if "grads" not in self._cache:
            from polytask.engine.loop import task_losses
            from polytask.engine.step import parameter_grads

            t0 = self.clock()
            tg, blocks = parameter_grads(self.model, self.sources, self.rows, self.tasks, task_losses, 0)
            self._cache["grads"] = (tg.losses.detach(), [b.detach() for b in blocks])
            self.grad_seconds = self.clock() - t0
        return self._cache["grads"]

    def losses_with(self, shared: Sequence[Tensor]) -> Tensor:
        """Task losses on this batch with the shared parameters replaced by ``shared``, each of which has a
        leading dimension of n candidate values: returns n x K, all candidates in one vectorised forward."""
        from polytask.engine.loop import task_losses

        names = {id(p): n for n, p in self.model.named_parameters()}
        keys = [names[id(p)] for p in self.model.shared_parameters()]

        def losses(*values: Tensor) -> Tensor:
            params = dict(zip(keys, values, strict=True))

            def swapped(x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
                return functional_call(self.model, params, (x, tasks))

            return task_losses(swapped, self.sources, self.rows, self.tasks)  # type: ignore[arg-type]

        with torch.no_grad():
            return torch.func.vmap(losses)(*shared)


class Probe:
    """Base: ``every`` > 0 probes steps; ``on_epoch`` probes epoch ends. Subclasses fill in the math."""

    name = ""
    every = 0
    on_epoch = False

    def init(self, k: int) -> State:
        return {}

    def step(self, state: State, batch: ProbeBatch) -> State:
        return state

    def epoch(self, state: State, model: MultiTaskModel, train: Sequence[TaskData], tasks: Sequence[Task]) -> State:
        return state

    def result(self, state: State) -> Tensor:
        raise NotImplementedError


class AveragedProbe(Probe):
    """A K x K matrix computed every ``every`` steps and averaged over the run (kept on the host)."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def init(self, k: int) -> State:
        return {"sum": torch.zeros(k, k, dtype=torch.float64), "n": 0}

    def matrix(self, batch: ProbeBatch) -> Tensor:
        raise NotImplementedError

    def step(self, state: State, batch: ProbeBatch) -> State:
        return {"sum": state["sum"] + self.matrix(batch).double().cpu(), "n": state["n"] + 1}

    def result(self, state: State) -> Tensor:
        return state["sum"] / max(state["n"], 1)


class GradCosine(AveragedProbe):
    """Pairwise cosine similarity of the tasks' shared-parameter gradients."""

    name = "grad_cosine"

    def matrix(self, batch: ProbeBatch) -> Tensor:
        from polytask.jacobian import gramian

        g = gramian(batch.grads()[1])
        norms = g.diagonal().clamp_min(0).sqrt()
        return g / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(torch.float64).tiny)


LOOKAHEAD_UPDATES = ("sgd", "optimizer")


class Lookahead(AveragedProbe):
    """TAG (Fifty et al. 2021, Eq. 3): Z(i->j) = 1 - L_j(θ_s - Δ_i) / L_j(θ_s), with Δ_i a step on task i's
    gradient alone.

    ``update="sgd"`` (default): the paper's Δ_i = lr * grad L_i (Eq. 2) at the run's current learning rate, or
    ``lr``. ``update="optimizer"``: the step the run's optimiser would take on that gradient from its current
    state (momentum buffers, Adam moments). The second lets the shared momentum dominate the matrix (synthetic
    suite: the target column explains 83 % of the off-diagonal variance, 4 % with the paper's step;
    ``benchmarks/relations_proof.py``), so it is an option only. The official code divides Z by the learning
    rate; a constant factor, left out here."""

    name = "lookahead"

    def __init__(self, every: int = 10, update: str = "sgd", lr: float | None = None) -> None:
        super().__init__(every)
        if update not in LOOKAHEAD_UPDATES:
            raise ConfigError(f"lookahead affinity: update must be one of {LOOKAHEAD_UPDATES}, got {update!r}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"lookahead affinity: lr must be > 0, got {lr!r}")
        self.update = update
        self.lr = lr

    def matrix(self, batch: ProbeBatch) -> Tensor:
        before, blocks = batch.grads()
        shared = list(batch.model.shared_parameters())
        if self.update == "optimizer":
            moved = virtual_update(batch.opt, shared, blocks)
        else:
            moved = sgd_update(batch.opt, shared, blocks, self.lr)
        after = batch.losses_with(moved)  # row i: all losses after the step on task i
        return 1 - after.double() / before.double().clamp_min(1e-12)


class DataMap(Probe):
    """Per task and training sample: running sum and sum of squares of the gold-label confidence."""

    name = "datamap"
    on_epoch = True

    def init(self, k: int) -> State:
        return {"sum": None, "sumsq": None, "n": 0}

    def epoch(self, state: State, model: MultiTaskModel, train: Sequence[TaskData], tasks: Sequence[Task]) -> State:
        if len(train) != 1:
            raise DataError("data maps need one shared input for every task (a multi-target suite)")
        conf = confidences(model, train[0], tasks).cpu()
        if state["sum"] is None:
            return {"sum": conf.double(), "sumsq": conf.double() ** 2, "n": 1}
        return {"sum": state["sum"] + conf, "sumsq": state["sumsq"] + conf.double() ** 2, "n": state["n"] + 1}

    def result(self, state: State) -> Tensor:
        """K x 2N task features: [mean confidence per sample, variability per sample]; NaN where unlabelled."""
        mean = state["sum"] / state["n"]
        var = (state["sumsq"] / state["n"] - mean**2).clamp_min(0)
        return torch.cat([mean, var.sqrt()], dim=1)


@torch.no_grad()
def confidences(model: MultiTaskModel, data: TaskData, tasks: Sequence[Task], batch_size: int = 2048) -> Tensor:
    """K x N gold-label confidence of every task on every sample (NaN where the label is missing)."""
    names = [t.name for t in tasks]
    outs: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(0, len(data), batch_size):
        for n, o in model(data.x[i:i + batch_size], names).items():
            outs[n].append(o)
    rows = []
    for t in tasks:
        out, y = torch.cat(outs[t.name]), data.y[t.name]
        mask = Task.mask(y)
        if t.kind == "classification":
            gold = torch.where(mask, y, torch.zeros_like(y)).long()
            c = out.softmax(-1).gather(1, gold[:, None]).squeeze(1)
        else:
            c = torch.exp(-((out.reshape(y.shape) - y) ** 2).reshape(len(y), -1).mean(1))
        rows.append(torch.where(mask, c, torch.full_like(c, float("nan"))))
    return torch.stack(rows)


PROBES: dict[str, type[Probe]] = {"grad_cosine": GradCosine, "lookahead": Lookahead, "datamap": DataMap}


@dataclass
class ProbeSet(Hook):
    """The probes riding on one training job (a hook named ``probes``), their states and the time each took.

    ``seconds`` is the time of all probes together (what the run spent probing). Per probe, ``timings`` keeps its
    own time and, apart, the time of the per-task gradients it read: probes due at the same step share one
    gradient computation, and each is charged all of it, which is what it would cost run alone. The states are
    checkpointed with the job; the times go beside the checkpoint (``timing``), so identical runs write identical
    checkpoints."""

    probes: list[Probe]
    states: dict[str, State] = field(default_factory=dict)
    seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter
    name = "probes"

    def start(self, k: int) -> None:
        for p in self.probes:
            self.states.setdefault(p.name, p.init(k))
            self.calls.setdefault(p.name, 0)
            self.timings.setdefault(p.name, {"own_s": 0.0, "gradients_s": 0.0})

    def cost(self, name: str) -> dict[str, float]:
        """Seconds of probe ``name``: its own work, the gradients it read, and their sum (its cost alone)."""
        t = self.timings.get(name, {"own_s": 0.0, "gradients_s": 0.0})
        return {"own_time_s": t["own_s"], "gradient_time_s": t["gradients_s"],
                "probe_time_s": t["own_s"] + t["gradients_s"]}

    def _run(self, p: Probe, call: Callable[[], State], batch: ProbeBatch | None) -> None:
        grad_before = batch.grad_seconds if batch is not None else 0.0
        if batch is not None:
            batch.used_grads = False
        t0 = self.clock()
        self.states[p.name] = call()
        spent = self.clock() - t0
        t = self.timings[p.name]
        if batch is not None:
            spent -= batch.grad_seconds - grad_before  # computed inside this call: booked as gradients
            if batch.used_grads:
                t["gradients_s"] += batch.grad_seconds
        t["own_s"] += spent
        self.calls[p.name] += 1

    def init(self, run: Run) -> None:
        self.start(len(run.tasks))

    def on_step(self, run: Run, step: StepView) -> None:
        self.probe(step.global_step, run.model, run.optimizer, step.batch.sources, step.batch.rows, run.tasks)

    def on_epoch(self, run: Run, epoch: int) -> None:
        self.probe_epoch(run.model, run.data.split("train"), run.tasks)

    def probe(self, step: int, model: MultiTaskModel, opt: torch.optim.Optimizer, sources: Sequence[TaskData],
              rows: Sequence[Tensor], tasks: Sequence[Task]) -> None:
        """Run the probes due at global step ``step`` on its batch (before the optimiser step)."""
        due = [p for p in self.probes if p.every and step % p.every == 0]
        if not due:
            return
        t0 = self.clock()
        batch = ProbeBatch(model, opt, sources, rows, tasks, clock=self.clock)
        with evaluating(model):
            for p in due:
                self._run(p, lambda p=p: p.step(self.states[p.name], batch), batch)
        self.seconds += self.clock() - t0

    def probe_epoch(self, model: MultiTaskModel, train: Sequence[TaskData], tasks: Sequence[Task]) -> None:
        """Run the probes that look at epoch ends (data maps) on the training data."""
        due = [p for p in self.probes if p.on_epoch]
        if not due:
            return
        t0 = self.clock()
        with evaluating(model):
            for p in due:
                self._run(p, lambda p=p: p.epoch(self.states[p.name], model, train, tasks), None)
        self.seconds += self.clock() - t0

    def state_dict(self) -> State:
        """What the checkpoint holds: states and call counts (wall times are kept apart, in ``timing``)."""
        return {"states": self.states, "calls": self.calls}

    def load_state_dict(self, state: State) -> None:
        self.states, self.calls = state["states"], state["calls"]

    def timing(self) -> dict[str, Any]:
        """The measured times so far (JSON), resumed with ``load_timing``."""
        return {"seconds": self.seconds, "timing": self.timings}

    def load_timing(self, timing: dict[str, Any]) -> None:
        self.seconds = timing.get("seconds", 0.0)
        self.timings = {**self.timings, **timing.get("timing", {})}
