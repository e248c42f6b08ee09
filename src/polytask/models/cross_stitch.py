"""Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert 2016, CVPR, "Cross-stitch Networks for Multi-task
Learning").

One column per task, each a copy of the encoder; after every stage of the columns a cross-stitch unit replaces the
K column activations by linear combinations of them (Eq. 1, at every location):

    x̃_t = Σ_s α_ts x_s      (α: K x K per unit; or one K x K matrix per channel, ``per_channel``)

and task t's head reads its own combination after the last stage. Eq. (2), the unit's gradient, is what autograd
computes. Units sit where the encoder's stages end (after each activation/pooling layer, see
:mod:`polytask.models.stages`): for ``lenet`` after each conv block and after the dense layer, like the paper's
units after pool1, pool2, pool5, fc6 and fc7 of AlexNet; for ``mlp`` after each hidden layer. The encoder must be an
``nn.Sequential`` or such a backbone behind embedded categorical inputs (each column then has its own copy of the
embeddings, in its first stage); another encoder is a ConfigError naming ``model.backbone``.

Shared and task-specific parameters (what the engine's aggregators need): every column feeds every task through
the units, so all columns and every unit but the last are shared. The last unit's row t (α_t·, after the last
stage) is read by task t only, so it is task t's own, with t's head. The shared features are the K columns'
outputs of the last stage, stacked (N, K, ...): every shared parameter lies below them, and above them each task
reads them through its own row and head only.

Deliberate differences from the paper:
- The columns are K copies of the given encoder (the same initial weights, pretrained or fresh); the paper starts
  them from networks fine-tuned on each task separately (its Sec. 4.2 ablation also trains from scratch). The copies
  diverge through the task heads and the units.
- The units are initialised as the paper's convex combination generalised to K tasks: α_self on the diagonal
  (default 0.9, the paper's best (α_S, α_D) = (0.9, 0.1)) and (1 - α_self)/(K - 1) elsewhere; with one task the
  unit is 1.
- The paper scales the units' learning rate up (10^2-10^3 times); here the optimiser is the engine's and the units
  train at its learning rate.
- ``per_channel`` (one K x K matrix per channel of the stage's output) follows the per-channel units of Vandenhende
  et al.'s PyTorch re-implementation (2021, TPAMI survey); the paper's units are one matrix per layer (the default).
- The columns are run one after another (a loop over the K columns, each on the whole batch): they are copies of
  arbitrary layers, so they are not stacked; the units are one einsum each.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.models.stages import Stage, run_stage, split_stages, stage_channels
from polytask.tasks.task import Task


class CrossStitchParams(BaseModel):
    """``model.architecture_params`` of ``cross_stitch``."""

    model_config = ConfigDict(extra="forbid")
    alpha_self: float = Field(0.9, ge=0.0, le=1.0, description="initial weight of a column's own activation in "
                              "each unit (the paper's best α_S = 0.9); the others share 1 - alpha_self equally")
    per_channel: bool = Field(False, description="one K x K unit per channel of each stage's output instead of one "
                              "per stage")


def stitch_init(k: int, alpha_self: float) -> Tensor:
    """The initial K x K unit: ``alpha_self`` on the diagonal, ``(1 - alpha_self) / (K - 1)`` elsewhere (each row a
    convex combination, Misra et al. 2016 Sec. 4.1); the 1 x 1 unit is 1."""
    if k == 1:
        return torch.ones(1, 1)
    off = (1.0 - alpha_self) / (k - 1)
    return torch.full((k, k), off) + (alpha_self - off) * torch.eye(k)


def cross_stitch(alpha: Tensor, x: Tensor) -> Tensor:
    """Eq. (1) of Misra et al. (2016) at every location: ``out[:, t] = Σ_s alpha[t, s] x[:, s]``.

    ``x``: (N, K, C, ...) the K columns' activations; ``alpha``: (T, K), or (C, T, K) per channel. Returns
    (N, T, C, ...)."""
    if alpha.dim() == 2:
        return torch.einsum("ts,ns...->nt...", alpha, x)
    n, k, c = x.shape[:3]
    out = torch.einsum("cts,nscp->ntcp", alpha, x.reshape(n, k, c, -1))
    return out.reshape(n, alpha.shape[1], *x.shape[2:])


class CrossStitch(MultiTaskModel):
    """Cross-stitch network (Misra et al. 2016, CVPR): K columns (copies of a sequential encoder) mixed by
    cross-stitch units after every stage, one head per task on its own mix of the last stage; see the module
    docstring for the equations, the parameter split and every difference from the paper."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], alpha_self: float = 0.9,
                 per_channel: bool = False) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.stages: list[Stage] = split_stages(encoder, rep_dim, "cross_stitch")
        k = len(tasks)
        self.columns = nn.ModuleList([copy.deepcopy(encoder) for _ in tasks])
        units = []
        for j, stage in enumerate(self.stages):
            unit = stitch_init(k, alpha_self)
            if per_channel:
                c = stage_channels(stage, j, "cross_stitch", "model.architecture_params.per_channel")
                unit = unit.expand(c, k, k).clone()
            units.append(unit)
        self.alphas = nn.ParameterList([nn.Parameter(u) for u in units[:-1]])
        last = units[-1]  # (K, K) or (C, K, K): row t is task t's own
        self.last_alpha = nn.ParameterDict({t: nn.Parameter(last[..., i, :].clone())
                                            for i, t in enumerate(self.task_names)})
        self.heads = nn.ModuleDict({t.name: make_head(t, rep_dim) for t in tasks})

    def features(self, x: Tensor) -> list[Tensor]:
        """The K columns' outputs of the last stage, stacked (N, K, ...), after the units of the earlier stages."""
        h = [x] * len(self.columns)
        for j, stage in enumerate(self.stages):
            out = torch.stack([run_stage(col, stage, hk) for col, hk in zip(self.columns, h, strict=True)], 1)
            if j == len(self.stages) - 1:
                return [out]
            h = list(cross_stitch(self.alphas[j], out).unbind(1))
        raise AssertionError("unreachable: an encoder has at least one stage")

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Task t's head on its row of the last unit applied to the stacked columns (Eq. 1 for one output)."""
        out = {}
        for t in tasks or self.task_names:
            alpha = self.last_alpha[t]
            row = alpha.unsqueeze(-2)  # (1, K) or (C, 1, K)
            out[t] = self.heads[t](cross_stitch(row, features[0]).squeeze(1))
        return out

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Every column's trainable parameters and every unit but the last: each feeds every task."""
        yield from (p for p in self.columns.parameters() if p.requires_grad)
        yield from self.alphas

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Task ``task``'s row of the last unit and its head: no other task reads them."""
        yield self.last_alpha[task]
        yield from self.heads[task].parameters()


@ARCHITECTURES.register("cross_stitch", params=CrossStitchParams,
                        summary="one encoder copy per task, mixed by learned cross-stitch units after every stage",
                        paper="Misra, Shrivastava, Gupta & Hebert 2016, CVPR")
def _cross_stitch(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: CrossStitchParams
                  ) -> MultiTaskModel:
    return CrossStitch(encoder, rep_dim, tasks, params.alpha_self, params.per_channel)
