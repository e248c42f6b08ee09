"""Pareto Manifold Learning (PaMaL): one run trains a line (2 tasks) or simplex (K tasks) of networks in weight
space whose task trade-off is chosen at inference by a weighting ``alpha``.

Dimitriadis, Frossard & Fleuret 2023 (ICML), "Pareto Manifold Learning: Tackling multiple tasks via ensembles of
single-task models"; official code github.com/nik-dim/pamal (``src/ll/weight_ensemble.py``,
``src/ll/subspace_modules.py``, ``src/trainer/multi_forward_ensemble_trainer.py``). The method:

- K anchor networks theta_1..theta_K, one per task, and the network at a weighting alpha on the simplex is their
  combination theta(alpha) = sum_m alpha_m theta_m (:class:`ParetoEnsemble`, :func:`interpolate`);
- each step draws W weightings alpha_1..alpha_W ~ Dir(p) (the paper's "window"; :func:`sample_alphas`), runs
  the batch through theta(alpha_j) for each, and minimises sum_j sum_k alpha_jk L_k(theta(alpha_j)) (linear
  scalarisation, the code's ``ls`` inner method) plus lambda R, the multi-forward regulariser
  (:func:`multi_forward_penalty`), which penalises a task's loss growing with the task's weight;
- after training, the front is read off a grid of alphas (segment for 2 tasks, simplex grid for 3;
  :func:`front_grid`).

Wiring: the loss is a loss function of the engine (``TrainSpec.losses``, :func:`pamal_losses`) returning the K
per-task terms ``L_k = sum_j alpha_jk L_k(theta(alpha_j)) + lambda R_k``, so the method's own weighting (``inner``,
default ``equal``: weights 1, so the objective is exactly the code's ``total_loss``) or an aggregator applies on
top. It is a *method* (``methods: [{name: pamal, params: {...}}]``), not a model option, because it is one point of
a comparison: the run trains it beside the other methods on the same model config, and ``flows/jobs.py`` wraps
that job's model and sets its loss function (a registry entry with ``pareto=True``). Outside a run
(:class:`polytask.JointStep`, ``polytask.fit``) the name builds only the inner weighting: the caller computes the
PaMaL losses with :class:`ParetoEnsemble` and :func:`pamal_losses` and passes them in.

Deliberate differences from the paper and the official code:

- every alpha sees the whole batch (as the official trainer does: W forward passes of the same batch; the
  regulariser compares task losses across alphas on the same rows); the cost is W forwards and backwards a step;
- ``regulariser: paper`` (default) penalises, for each task t and consecutive weightings in decreasing alpha_t,
  ``relu(L_t(larger alpha_t) - L_t(smaller alpha_t))``: a wrong ordering, as the paper describes the term
  (sum_t log mean_edges exp(T [L_i - L_j]_+)). The official code sorts by decreasing alpha_t and takes
  ``relu(diff)``, i.e. ``relu(L_t(smaller) - L_t(larger))``, which penalises the expected ordering; ``official``
  reproduces it, together with the code's rule of adding lambda R only when lambda R < the scalarised loss (the
  paper states no such rule). Ties between sampled alphas (probability 0) keep their draw order (the code keys
  its losses by alpha and would overwrite one);
- BatchNorm: the code interpolates the affine weights and keeps one set of running statistics, updated by every
  forward whatever its alpha; here every trainable parameter is interpolated and every buffer (running statistics)
  is the inner model's single copy, which is the same thing. Frozen parameters (``requires_grad=False``, e.g. a
  frozen pretrained encoder) are one shared copy, not K;
- initialisation: ``independent`` (the code's ``reinit_flag: true``) builds each anchor with the model factory
  (or, given a module, copies it and calls ``reset_parameters`` on every submodule that has one: parameters of a
  module without it keep the given values); ``same`` starts every anchor from one initialisation;
- the code's inner balancing schemes (``rwa``, ``gradnorm``) are not ported: any polytask weighting or aggregator
  is the inner method instead;
- the multi-forward losses ``L_k`` are what the run records as training losses (the task losses weighted by the
  drawn alphas, summed over the W draws), not the loss of one network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.methods import METHODS
from polytask.models.sharing import MultiTaskModel
from polytask.tasks.task import Task, TaskData

PAPER = "Dimitriadis, Frossard & Fleuret 2023 (ICML), Pareto Manifold Learning"
LossFn = Callable[[MultiTaskModel, Sequence[TaskData], Sequence[Tensor], Sequence[Task]], Tensor]


# ---------------------------------------------------------------- the math


def interpolate(alpha: Tensor, stacked: Tensor) -> Tensor:
    """theta(alpha) = sum_m alpha_m theta_m for one parameter, its K anchors stacked on dim 0 (the paper's Eq. 1;
    the code's ``get_weight``). Exact at a vertex: 1 * theta_k + 0 * theta_m is theta_k."""
    return torch.tensordot(alpha.to(stacked.dtype), stacked, dims=1)


def sample_alphas(samples: int, k: int, concentration: float, device: torch.device | str = "cpu") -> Tensor:
    """W x K weightings drawn from Dir(p 1_K) with torch's global generator (which the engine checkpoints, so a
    resumed run draws the same), on the CPU, then moved to ``device`` (the code's ``sample_alpha``)."""
    dist = torch.distributions.Dirichlet(torch.full((k,), float(concentration)))
    return dist.sample((samples,)).to(device)


def multi_forward_penalty(alphas: Tensor, losses: Tensor, temperature: float = 1.0,
                          form: str = "paper") -> Tensor:
    """The multi-forward regulariser per task, R_t = log( 1/(W-1) sum_i exp(T relu(d_ti)) ), over the W - 1
    consecutive pairs of the weightings sorted by decreasing alpha_t (W x K ``alphas``, W x K task ``losses``).

    ``paper``: d = L_t(larger alpha_t) - L_t(smaller alpha_t), a penalty on the wrong ordering (a task's loss
    should fall as its weight grows). ``official``: the official code's sign, d = L_t(smaller) - L_t(larger).
    Zero for every task when W = 1; R_t >= 0, and R_t = 0 when no pair is penalised."""
    w, k = losses.shape
    if w < 2:
        return losses.new_zeros(k)
    order = torch.argsort(alphas.detach(), dim=0, descending=True, stable=True)  # W x K, per task
    ranked = torch.gather(losses, 0, order)
    diff = ranked[:-1] - ranked[1:] if form == "paper" else ranked[1:] - ranked[:-1]
    return torch.logsumexp(temperature * torch.relu(diff), dim=0) - float(np.log(w - 1))


def pamal_objective(alphas: Tensor, losses: Tensor, coefficient: float = 0.0, temperature: float = 1.0,
                    form: str = "paper") -> Tensor:
    """The K per-task terms of one PaMaL step from W x K ``alphas`` and W x K task ``losses`` (row j: the task
    losses of theta(alpha_j)): ``L_k = sum_j alpha_jk losses_jk + coefficient * R_k`` (R:
    :func:`multi_forward_penalty`), so that their sum is the official code's ``total_loss`` (its linear
    scalarisation summed over the W forwards, plus lambda R). ``official`` adds the regulariser only when
    lambda sum_k R_k < sum_jk alpha_jk losses_jk, as the code does."""
    scalarised = (alphas.to(losses.dtype) * losses).sum(0)
    if not coefficient or losses.shape[0] < 2:
        return scalarised
    reg = coefficient * multi_forward_penalty(alphas, losses, temperature, form)
    if form == "official" and not bool(reg.detach().sum() < scalarised.detach().sum()):
        return scalarised
    return scalarised + reg


def front_grid(k: int, seed: int = 0) -> list[tuple[float, ...]]:
    """The weightings a trained ensemble is evaluated at: K = 2, the segment in steps of 0.1 (11 points, from
    (1, 0) to (0, 1)); K = 3, the simplex grid of step 0.1 (66 points); K > 3, the K vertices, the centre and
    2K points drawn from Dir(1) with ``seed``; K = 1, the one network."""
    if k < 1:
        raise ConfigError(f"a Pareto front needs at least one task, got {k}")
    if k == 1:
        return [(1.0,)]
    if k == 2:
        return [(round(1 - i / 10, 10), round(i / 10, 10)) for i in range(11)]
    if k == 3:
        return [(round(i / 10, 10), round(j / 10, 10), round((10 - i - j) / 10, 10))
                for i in range(10, -1, -1) for j in range(10 - i, -1, -1)]
    vertices = [tuple(float(i == m) for i in range(k)) for m in range(k)]
    drawn = np.random.default_rng(seed).dirichlet(np.ones(k), 2 * k)
    return vertices + [tuple([1.0 / k] * k)] + [tuple(float(v) for v in row) for row in drawn]


# ---------------------------------------------------------------- the weight ensemble


class _Call(nn.Module):
    """Runs one method of the inner model as ``forward``, so ``torch.func.functional_call`` can bind the
    interpolated parameters for it (the architecture's ``aux_loss``)."""

    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner, self.method = inner, method

    def forward(self, *args: Any) -> Any:
        return getattr(self.inner, self.method)(*args)


def _key(name: str) -> str:
    return name.replace(".", "/")


def _reset(module: nn.Module) -> nn.Module:
    """A fresh initialisation of a copy of ``module``: ``reset_parameters`` of every submodule that has one."""
    fresh = copy.deepcopy(module)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def _trainable(model: nn.Module) -> dict[int, list[str]]:
    """Every trainable parameter by identity, with all the names it has (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
    return names


class ParetoEnsemble(MultiTaskModel):
    """K anchor copies of a multi-task model's trainable parameters; the model runs at theta(alpha) =
    sum_m alpha_m theta_m (Dimitriadis et al. 2023, Eq. 1), ``alpha`` a buffer on the simplex (default its centre,
    set with :meth:`at`).

    ``model``: a :class:`MultiTaskModel`, or a function building one (called K times for ``independent`` anchors,
    so each is a fresh initialisation: the official code's ``reinit_flag``); ``anchors``: K (PaMaL: one per task);
    ``init``: ``independent`` or ``same`` (every anchor a copy of the first). The first model built carries the
    architecture: its trainable parameters are removed and supplied at every call by ``torch.func.functional_call``,
    its buffers (BatchNorm running statistics) and frozen parameters stay one shared copy. The partition follows
    the inner model's: the K anchors of a shared parameter are shared, those of task t's parameter are task t's.
    ``features`` is None, so every method differentiates the step's losses (``params`` mode), which is how the
    PaMaL loss function (:func:`pamal_losses`) reaches the aggregators."""

    def __init__(self, model: MultiTaskModel | Callable[[], MultiTaskModel], anchors: int,
                 init: Literal["independent", "same"] = "independent") -> None:
        super().__init__()
        if anchors < 1:
            raise ConfigError(f"ParetoEnsemble anchors: need at least 1, got {anchors}")
        if init not in ("independent", "same"):
            raise ConfigError(f"ParetoEnsemble init: {init!r} is not 'independent' or 'same'")
        factory = model if not isinstance(model, nn.Module) else None
        first = factory() if factory is not None else model
        if not isinstance(first, MultiTaskModel):
            raise ConfigError(f"ParetoEnsemble: the model must be a MultiTaskModel, got {type(first).__name__}")
        names = _trainable(first)
        params = {id(p): p for p in first.parameters()}
        shared = {id(p) for p in first.shared_parameters()}
        owned = {t: {id(p) for p in first.task_parameters(t)} for t in first.task_names}
        copies: list[nn.Module] = [first]
        for _ in range(anchors - 1):
            if init == "same":
                copies.append(copy.deepcopy(first))
            else:
                copies.append(factory() if factory is not None else _reset(first))
        self.task_names = list(first.task_names)
        self.n_anchors = anchors
        self._aliases: dict[str, list[str]] = {}  # parameter key -> every name it has in the inner model
        self._shared: list[str] = []
        self._owned: dict[str, list[str]] = {t: [] for t in self.task_names}
        self.anchors = nn.ParameterDict()
        for pid, aliases in names.items():
            key = _key(aliases[0])
            members = []
            for c in copies:
                found = dict(c.named_parameters(remove_duplicate=False)).get(aliases[0])
                if found is None or found.shape != params[pid].shape:
                    raise ConfigError(f"ParetoEnsemble: the models built for the anchors differ at parameter "
                                      f"{aliases[0]!r}; the factory must build the same architecture each time")
                members.append(found.detach().clone())
            self.anchors[key] = nn.Parameter(torch.stack(members))
            self._aliases[key] = aliases
            if pid in shared:
                self._shared.append(key)
            for t, ids in owned.items():
                if pid in ids:
                    self._owned[t].append(key)
        for aliases in self._aliases.values():
            for name in aliases:
                module, _, leaf = name.rpartition(".")
                first.get_submodule(module)._parameters.pop(leaf, None)  # a module under two names: once
        self.inner = first
        self.register_buffer("alpha", torch.full((anchors,), 1.0 / anchors), persistent=False)

    def centre(self) -> Tensor:
        """The simplex's centre, 1/K each: the default weighting and the one a run reports."""
        return torch.full((self.n_anchors,), 1.0 / self.n_anchors)

    def check_alpha(self, alpha: Sequence[float] | Tensor) -> Tensor:
        """``alpha`` as a K-vector on the simplex (non-negative, summing to 1 within 1e-4); a ConfigError naming
        the value otherwise."""
        a = torch.as_tensor(alpha, dtype=torch.float32).detach().reshape(-1)
        if a.numel() != self.n_anchors or not bool(torch.isfinite(a).all()) or bool((a < 0).any()) \
                or abs(float(a.sum()) - 1.0) > 1e-4:
            shown = [round(v, 6) for v in a.tolist()]
            raise ConfigError(f"alpha {shown}: need {self.n_anchors} non-negative weights summing to 1 (a point of "
                              "the simplex)")
        return a

    @contextmanager
    def at(self, alpha: Sequence[float] | Tensor) -> Iterator[ParetoEnsemble]:
        """Run the model at ``alpha`` inside the block (evaluation, or one of a step's draws); the previous
        weighting comes back after it. The buffer is replaced, never written in place, so graphs built at one
        alpha stay valid."""
        previous = self.alpha
        self.alpha = self.check_alpha(alpha).to(previous.device, previous.dtype)
        try:
            yield self
        finally:
            self.alpha = previous

    def weights(self, alpha: Tensor | None = None) -> dict[str, Tensor]:
        """theta(alpha) by the inner model's parameter names (every name of a tied weight), graph attached."""
        a = self.alpha if alpha is None else alpha
        out: dict[str, Tensor] = {}
        for key, stacked in self.anchors.items():
            theta = interpolate(a, stacked)
            for name in self._aliases[key]:
                out[name] = theta
        return out

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return torch.func.functional_call(self.inner, self.weights(), (x, tasks))

    def aux_loss(self) -> Tensor | None:
        """The inner architecture's auxiliary loss at the current alpha (None when it has none)."""
        if type(self.inner).aux_loss is MultiTaskModel.aux_loss:
            return None
        bound = {f"inner.{k}": v for k, v in self.weights().items()}
        return torch.func.functional_call(_Call(self.inner, "aux_loss"), bound, ())

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The K anchors of every shared parameter of the inner model."""
        return (self.anchors[k] for k in self._shared)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The K anchors of every parameter of ``task``'s own in the inner model."""
        return (self.anchors[k] for k in self._owned[task])

    def network(self, alpha: Sequence[float] | Tensor | None = None) -> MultiTaskModel:
        """A standalone copy of the inner model with the weights theta(alpha) (default the current alpha), e.g.
        to serve one trade-off; it shares nothing with the ensemble."""
        a = self.alpha if alpha is None else self.check_alpha(alpha).to(self.alpha.device)
        net = copy.deepcopy(self.inner)
        with torch.no_grad():
            for key, stacked in self.anchors.items():
                p = nn.Parameter(interpolate(a, stacked).detach().clone())
                for name in self._aliases[key]:
                    module, _, leaf = name.rpartition(".")
                    net.get_submodule(module).register_parameter(leaf, p)
        return net


# ---------------------------------------------------------------- the training loss


def pamal_losses(base: LossFn, samples: int = 2, concentration: float = 1.0, coefficient: float = 0.0,
                 temperature: float = 1.0, form: str = "paper") -> LossFn:
    """The engine loss function (``TrainSpec.losses``) of a PaMaL step on a :class:`ParetoEnsemble`: draw W =
    ``samples`` weightings from Dir(``concentration``) (:func:`sample_alphas`), compute the K task losses with
    ``base`` (the engine's ``task_losses``) at each theta(alpha_j) on the whole batch, and return
    :func:`pamal_objective` (the K terms, multi-forward regulariser included). The ensemble's alpha is back at
    its previous value (the centre) when it returns."""

    def losses(model: MultiTaskModel, sources: Sequence[TaskData], rows: Sequence[Tensor],
               tasks: Sequence[Task]) -> Tensor:
        if not isinstance(model, ParetoEnsemble):
            raise ConfigError(f"the PaMaL loss trains a ParetoEnsemble; got {type(model).__name__}")
        if model.n_anchors != len(tasks):
            raise ConfigError(f"PaMaL needs one anchor per task: {model.n_anchors} anchors for {len(tasks)} tasks "
                              f"({', '.join(t.name for t in tasks)})")
        alphas = sample_alphas(samples, len(tasks), concentration, model.alpha.device)
        per_draw = []
        for a in alphas:
            with model.at(a):
                per_draw.append(base(model, sources, rows, tasks))
        return pamal_objective(alphas, torch.stack(per_draw), coefficient, temperature, form)

    return losses


# ---------------------------------------------------------------- the method entry


class PamalParams(BaseModel):
    """Parameters of ``pamal`` (names of the official configs in brackets)."""

    model_config = ConfigDict(extra="forbid")

    alpha_dirichlet: float = Field(1.0, gt=0, le=1000, description="p: the weightings are drawn from Dir(p)")
    samples: int = Field(2, ge=1, le=64, description="W (num, the paper's window): weightings drawn per batch, "
                         "each a forward and backward pass of the whole batch")
    reg_coefficient: float = Field(1.0, ge=0, description="lambda of the multi-forward regulariser (0: off; the "
                                   "official configs use 0 to 5)")
    temperature: float = Field(1.0, gt=0, description="T of the multi-forward regulariser")
    regulariser: Literal["paper", "official"] = Field(
        "paper", description="paper: penalise a task's loss rising with its weight; official: the official "
        "code's sign and its rule of adding lambda R only when it is below the scalarised loss")
    init: Literal["independent", "same"] = Field(
        "independent", description="independent: each anchor its own initialisation (reinit_flag); same: one")
    inner: str = Field("equal", description="the method applied to the K PaMaL losses: equal (the paper's linear "
                       "scalarisation) or any other registered weighting or aggregator")
    inner_params: dict[str, Any] = Field(default_factory=dict, description="the inner method's parameters")

    @model_validator(mode="after")
    def _inner_is_a_method(self) -> PamalParams:
        from polytask.methods import load_all

        registry = load_all()
        if registry.get(self.inner).extra.get("pareto"):  # an unknown name: the registry's error, with a suggestion
            raise ValueError(f"inner: {self.inner!r} trains a weight ensemble itself; name a weighting or "
                             "aggregator (e.g. equal)")
        registry.params_for(self.inner, self.inner_params, "inner_params")
        return self


@METHODS.register("pamal", params=PamalParams, kind="weighting", pareto=True,
                  summary="Pareto Manifold Learning: K anchor networks, one run trains the whole line/simplex of "
                  "trade-offs; front evaluated on a grid of alphas", paper=PAPER)
def _pamal(params: PamalParams, task_names: Sequence[str]) -> Any:
    """Outside a run (JointStep, fit) ``pamal`` is its inner weighting, to be applied to PaMaL losses the caller
    computes (:class:`ParetoEnsemble`, :func:`pamal_losses`); a run wraps the model and sets the loss itself."""
    from polytask.methods import load_all

    registry = load_all()
    if registry.get(params.inner).extra.get("kind") != "weighting":
        raise ConfigError(f"pamal inner {params.inner!r} is a gradient aggregator: it runs inside `polytask run` "
                          "only; from Python compute the losses with ParetoEnsemble and pamal_losses and give them "
                          f"to JointStep({params.inner!r})")
    return registry.build(params.inner, params.inner_params, list(task_names), where="pamal.inner_params")
