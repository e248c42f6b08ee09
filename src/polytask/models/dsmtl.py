"""DSMTL: Deep Safe Multi-Task Learning (Yue, Ye, Zhang, Liang & Tsang, "Deep Safe Multi-Task Learning",
arXiv:2111.10601v2, 2022; its first version: Guo, Ye & Zhang, "Safe Multi-Task Learning", arXiv:2111.10601v1, 2021).

A public encoder f_S shared by every task, one private encoder f_t per task, one gate per task and one private
decoder (head) h_t per task. The gate mixes the two representations and the task's head reads the mixture:

    y_t = h_t(z_t),   z_t = alpha_t f_S(x) + (1 - alpha_t) f_t(x),   alpha_t in [0, 1] learned.

Why it is "safe": at alpha_t = 0 task t's prediction is h_t(f_t(x)), exactly a single-task network of the same
encoder architecture; so for whatever public representation the other tasks shape, task t's own parts (private
encoder, gate, head) can always represent its single-task model, and at a minimum of task t's training loss over
them it is no larger than the single-task model's (no negative sharing on the training loss; the paper's exact
definitions of safeness could not be read, see below; the soft gate reaches alpha_t = 0 only in the limit
a_t -> -inf, the hard gate exactly). That is a statement about optima of the training loss, not about test loss
nor about what a few epochs of SGD reach:
``benchmarks/dsmtl_safety.py`` measures it against the single-task baselines of ``flow: compare``. Measured there
(synthetic: a group of 3 related tasks, 2 unrelated, an opposed pair; MLP [32]; Adam 1e-3; seeds 0-2; test MSE):
hard sharing is worse than single-task on all 7 tasks in every seed (Δm% +38..+40 at 10 epochs, +13 at 30); DSMTL:
Δm% -2.9 (equal) / -3.0 (UPGrad, representation mode) at 10 epochs and -1.7 / -2.0 at 30, with 0-3 of the 7 tasks
still worse than single-task per seed, by at most +15 % at 10 epochs and +4 % at 30: the same size as the change a
second set of single-task models (another initialisation, same data) shows against the first (up to +13 % at 10
epochs, +8 % at 30). So "no worse" holds within the spread of single-task training itself, not strictly per task.

Sources, and what could be read (a deliberate limit, stated so nobody mistakes the reconstruction for the paper):
the v2 paper's body (equation numbers, the exact learning objectives of individual and joint learning, the
architecture-learning extension DSMTL-AL) could not be read here, only its abstract; the model above, the gate's
parametrisation and initialisation and the "lite" hard gate come from the authors' public code of v1
(github.com/Pengxin-Guo/SMTL, ``SMTL`` in ``office/backbone.py`` and ``nyu/backbone.py``). Variants built:

- ``strategy: joint`` (default; DSMTL-JL): every part trains together under the configured joint method (the sum
  of the task losses, or any weighting/aggregation of them). Chosen as the default because it is the one that
  trains in one run; which variant the paper recommends could not be read.
- ``strategy: individual`` (DSMTL-IL, reconstructed from the abstract's "individual learning"): the public encoder
  is fixed (frozen: its parameters do not train and it stays in eval mode) and each task's own parts learn from
  its loss alone, so the tasks decouple into single-task problems over a function class that contains each one's
  single-task model. The public encoder must come trained: a pretrained backbone, or, from Python, the encoder of
  a finished multi-task model passed as ``encoder``; with a freshly initialised backbone it is a fixed random
  feature map.
- ``gate: soft`` (default): alpha_t = sigmoid(a_t), a_t a learned scalar, initialised at logit(``gate_init``)
  (the authors' default is 0.5 public / 0.5 private).
- ``gate: hard``: the v1 paper's "lite" version, which picks either the public or the private representation:
  in training alpha_t is a straight-through Gumbel-softmax sample (temperature ``tau``, the authors' 0.1) of the
  two-way choice with probabilities (sigmoid(a_t), 1 - sigmoid(a_t)); in eval alpha_t = 1 when sigmoid(a_t) > 0.5
  else 0 (the authors' code picks private at a tie). Its samples are drawn from torch's global generator.
- DSMTL-AL (learning a compact architecture) is not built.

Deliberate differences from the authors' code:
- the gate is one logit per task (alpha_t = sigmoid(a_t)); the v1 code's default keeps two logits per task and a
  softmax over them (alpha_S + alpha_t = 1), the same family of mixtures with one redundant degree of freedom (its
  gradient steps on the logit difference are twice as large under plain SGD);
- the logit is a_t = ``gate_scale`` x theta_t with theta_t the trained scalar (default 10; the authors' code: 1, one
  Adam optimiser for every weight, lr 1e-4 in its NYUv2 script). Under Adam the gate then moves 10x faster than
  the other weights, so it can close within the few epochs polytask runs usually train: measured with
  ``benchmarks/dsmtl_safety.py`` (synthetic, 7 tasks, MLP [32], 10 epochs, seeds 0-2), gate_scale 1 left every
  alpha_t within 0.45-0.51 and gave Δm% +3.8 (equal) / +3.1 (UPGrad, representation mode) against single-task,
  gate_scale 10 brought most alpha_t to about 0.2 and gave -2.9 / -3.0;
- the public and private encoders are the configured backbone (any encoder), not ResNet-50 + a hidden layer, and
  the heads are the tasks' heads (``task.head``) rather than one linear classifier per task;
- ``private_init: reset`` (default) re-initialises every copied module that has ``reset_parameters`` and only
  trainable weights of its own (PyTorch's default initialisation, drawn from torch's global generator as the rest
  of the build), so each private encoder starts as a fresh single-task network would; frozen weights (a frozen
  pretrained part) are kept as copied; a module with trainable weights of its own and no ``reset_parameters`` keeps
  the copied values (a LoRA adapter's zero-initialised B is re-drawn by ``nn.Linear``'s reset, so it is not zero
  in the copies). ``private_init: copy`` starts every private encoder from the public encoder's weights, as the
  authors' code does with its pretrained ResNets.

Engine seam: ``features(x) = [f_S(x), f_1(x), ..., f_K(x)]`` and task t (t-th in the model's task order) reads
features ``[0, t + 1]``. The private encoders read the input, so they sit below the features and are listed in
``shared_parameters()``: the engine pushes the aggregated direction back through every feature, and task t's
private feature has a nonzero gradient only from task t's loss, so for every aggregator whose direction is a
weighted sum of the task gradients (UPGrad, MGDA, IMTL-G, Nash-MTL, sum, mean, ...) f_t receives exactly w_t times
its own task's gradient, as if it were task t's own parameter scaled by its weight (tested); PCGrad's projections
scale it by some factor; a method acting per coordinate (GradDrop) may mask parts of it. Loss weightings backward
sum_k w_k L_k, which gives the same w_t times task t's gradient. In the Gramian the private features add to each
task's own squared norm (the diagonal) and never to the cross terms. The gate logit a_t and the head h_t are task
t's own parameters (``task_parameters``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.tasks.task import Task


class DSMTLParams(BaseModel):
    """Parameters of ``dsmtl`` (Yue et al. 2022, arXiv:2111.10601)."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["joint", "individual"] = Field(
        "joint", description="joint (DSMTL-JL): every part trains under the joint method; individual (DSMTL-IL, "
        "reconstructed): the public encoder is fixed and each task's private encoder, gate and head learn from its "
        "loss alone (give a trained or pretrained encoder)")
    gate: Literal["soft", "hard"] = Field(
        "soft", description="soft: alpha_t = sigmoid(a_t) mixes public and private representations; hard: the "
        "'lite' gate that picks one of them (straight-through Gumbel-softmax in training, the likelier in eval)")
    gate_init: float = Field(0.5, gt=0.0, lt=1.0, description="initial weight alpha_t of the public representation "
                             "(the authors' 0.5)")
    gate_scale: float = Field(10.0, gt=0.0, le=1000.0, description="the gate logit is gate_scale x a learned "
                              "scalar, so under Adam the gate moves gate_scale times faster than the other weights "
                              "(1: the authors' code)")
    tau: float = Field(0.1, gt=0.0, le=100.0, description="temperature of the hard gate's Gumbel-softmax (the "
                       "authors' 0.1); unused by the soft gate")
    private_init: Literal["reset", "copy"] = Field(
        "reset", description="reset: every private encoder is the encoder's architecture with freshly drawn "
        "weights; copy: it starts from the encoder's weights (use for pretrained encoders)")


def gate_mix(shared: Tensor, private: Tensor, alpha: Tensor) -> Tensor:
    """The DSMTL gate's combination alpha * shared + (1 - alpha) * private (Yue et al. 2022, arXiv:2111.10601; the
    ``SMTL`` forward of the authors' code). At alpha = 1 it is ``shared`` and at alpha = 0 ``private``, exactly (for
    finite inputs)."""
    return alpha * shared + (1 - alpha) * private


def hard_gate(logit: Tensor, tau: float, training: bool) -> Tensor:
    """The 'lite' gate's alpha in {0, 1} from the public logit a (Guo, Ye & Zhang 2021, arXiv:2111.10601v1; the
    authors' ``--version v3``): training, a straight-through Gumbel-softmax sample over the logits (a, 0), i.e.
    probabilities (sigmoid(a), 1 - sigmoid(a)), drawn from torch's global generator; eval, 1 when a > 0 else 0."""
    if not training:
        return (logit > 0).to(logit.dtype)
    return F.gumbel_softmax(torch.stack([logit, torch.zeros_like(logit)]), tau=tau, hard=True)[0]


def fresh_copy(encoder: nn.Module) -> nn.Module:
    """A deep copy of ``encoder`` whose modules with ``reset_parameters`` and only trainable weights of their own are
    re-initialised (PyTorch's default initialisation, from torch's global generator); frozen weights and modules
    without ``reset_parameters`` keep the copied values."""
    out = copy.deepcopy(encoder)
    for module in out.modules():
        own = list(module.parameters(recurse=False))
        if own and all(p.requires_grad for p in own) and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return out


class DSMTL(MultiTaskModel):
    """Deep Safe Multi-Task Learning (Yue, Ye, Zhang, Liang & Tsang 2022, arXiv:2111.10601): a public encoder, one
    private encoder, gate and head per task; y_t = h_t(alpha_t f_S(x) + (1 - alpha_t) f_t(x)). See the module
    docstring for the variants, the guarantee and every difference from the paper and the authors' code."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: DSMTLParams) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.strategy = params.strategy
        self.gate = params.gate
        self.tau = params.tau
        self.gate_scale = params.gate_scale
        make = fresh_copy if params.private_init == "reset" else copy.deepcopy
        self.private = nn.ModuleDict({t.name: make(encoder) for t in tasks})
        self.encoder = encoder
        if params.strategy == "individual":
            encoder.requires_grad_(False)
            encoder.eval()
        logit = math.log(params.gate_init / (1 - params.gate_init))
        self.gates = nn.ParameterDict({t.name: nn.Parameter(torch.tensor(logit / params.gate_scale)) for t in tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, rep_dim) for t in tasks})

    def train(self, mode: bool = True) -> DSMTL:
        """Train/eval mode; with ``strategy: individual`` the fixed public encoder stays in eval mode."""
        super().train(mode)
        if self.strategy == "individual":
            self.encoder.eval()
        return self

    def alpha(self, task: str) -> Tensor:
        """Task ``task``'s gate: the weight alpha_t of the public representation (soft: sigmoid(a_t); hard: 0 or
        1, sampled in training)."""
        logit = self.gate_scale * self.gates[task]
        if self.gate == "hard":
            return hard_gate(logit, self.tau, self.training)
        return torch.sigmoid(logit)

    def features(self, x: Tensor) -> list[Tensor]:
        """``[f_S(x), f_1(x), ..., f_K(x)]``: the public representation, then every task's private one."""
        return [self.encoder(x), *(self.private[t](x) for t in self.task_names)]

    def reads(self, task: str) -> Sequence[int]:
        """The public representation (0) and the task's own private one (its index in the task order + 1)."""
        return [0, self.task_names.index(task) + 1]

    def _output(self, task: str, public: Tensor, private: Tensor) -> Tensor:
        return self.heads[task](gate_mix(public, private, self.alpha(task)))

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """y_t = h_t(alpha_t features[0] + (1 - alpha_t) features[t + 1]) for each task t asked for."""
        return {t: self._output(t, features[0], features[self.task_names.index(t) + 1])
                for t in tasks or self.task_names}

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The outputs of the tasks asked for, running only their private encoders."""
        public = self.encoder(x)
        return {t: self._output(t, public, self.private[t](x)) for t in tasks or self.task_names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters below the features: the public encoder's (none with ``strategy: individual``)
        and every private encoder's (each reached by its own task's gradient only; see the module docstring)."""
        for module in (self.encoder, *self.private.values()):
            yield from (p for p in module.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Task ``task``'s gate logit and head."""
        yield self.gates[task]
        yield from self.heads[task].parameters()


@ARCHITECTURES.register("dsmtl", params=DSMTLParams,
                        summary="deep safe MTL: a public encoder, one private encoder, gate and head per task; the "
                                "gate mixes public and private representations (private alone = single-task)",
                        paper="Yue, Ye, Zhang, Liang & Tsang 2022, arXiv:2111.10601")
def _dsmtl(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: DSMTLParams) -> MultiTaskModel:
    return DSMTL(encoder, rep_dim, tasks, params)
