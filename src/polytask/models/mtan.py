"""Multi-Task Attention Network, MTAN (Liu, Johns & Davison 2019, CVPR, "End-to-End Multi-Task Learning with
Attention"; reference code github.com/lorenmt/mtan, ``im2im_pred/model_segnet_mtan.py``, read for the shape of the
attention blocks).

One shared network (the encoder, a global feature pool) and, per task, a soft-attention module at every stage j of
it. With p^(j) the shared network's output of stage j and u^(j) the feature the mask is computed from:

    â_t^(j) = a_t^(j) ⊙ p^(j)                                             (Eq. 1)
    a_t^(1) = h_t^(1)(g_t^(1)(u^(1))),
    a_t^(j) = h_t^(j)(g_t^(j)([u^(j); f_t^(j)(â_t^(j-1))])),   j ≥ 2      (Eq. 2)

g: a 1x1 conv (C_in -> C_j), batch norm, ReLU; h: a 1x1 conv (C_j -> C_j), batch norm, sigmoid (the paper's
[1x1] conv blocks); f: the block that brings â^(j-1) to stage j's resolution and width. Task t's head reads
â_t^(J) of the last stage (J). On stages with a vector output (an ``mlp`` encoder, or ``lenet``'s dense stage) the
1x1 convs are Linear layers (a 1x1 conv on a 1x1 map), with BatchNorm1d.

Stages: see :mod:`polytask.models.stages` (the encoder must be an ``nn.Sequential``, as ``lenet`` and ``mlp`` are,
or such a backbone behind embedded categorical inputs, whose embeddings then open the first stage; another encoder is
a ConfigError naming ``model.backbone``). ``lenet`` gives one stage per conv block (conv, max-pool, ReLU)
and one for the dense layer; ``mlp`` one per hidden layer.

Shared and task-specific parameters: the shared features are the stage outputs [p^(1), ..., p^(J)], which every
task reads; the encoder lies below them and is the only shared part. Everything above them (g_t, h_t, f_t and the
head) is task t's own.

Deliberate differences from the paper and its code:
- f^(j) is one module per task, not shared between tasks: it acts on task t's attended features, so a shared f
  would be a shared parameter above the shared features, which representation-mode aggregation cannot reach
  exactly (every parameter above the features must be one task's). f_t^(j) is a copy of the encoder's stage j
  (its initial weights; for ``lenet`` a 5x5 conv + 2x2 max-pool + ReLU, where the paper uses a 3x3 conv + batch
  norm + ReLU + 2x2 max-pool), which maps stage j-1's output shape to stage j's for any sequential encoder.
- u^(j) = p^(j): the paper's blocks have several conv layers, u^(j) the first one's output and p^(j) the last
  one's; a stage here may have one parametrised layer, so both are the stage's output. The mask is applied to the
  stage's output after its pooling (the reference code attends before pooling and pools after f).
- A conv or Linear followed by batch norm has no bias (the norm's shift replaces it; in training the bias would
  have no effect); ``batch_norm: false`` drops the norms and keeps the biases. PyTorch's default initialisation
  (the reference code uses Xavier-normal). Keep the norms: without them the early stages' masks get vanishing
  gradients on small encoders (on the shared test suite's lenet, a gradient norm of about 1e-7 for the first
  stage's mask against 1e-2 with the norms).
- f_t^(j) trains even where the given encoder is frozen (it is a task's own module, the paper trains it).
- The decoder attention of the paper's SegNet (image-to-image tasks) is absent: the encoder's output is flat and
  the heads are the tasks' own (``polytask.models.sharing.make_head``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.sharing import ARCHITECTURES, MultiTaskModel, make_head
from polytask.models.stages import Stage, run_stage, split_stages, stage_channels, stage_layers
from polytask.tasks.task import Task

_KEY = "model.backbone"


class MTANParams(BaseModel):
    """``model.architecture_params`` of ``mtan``."""

    model_config = ConfigDict(extra="forbid")
    batch_norm: bool = Field(True, description="batch norm after each 1x1 conv (or Linear) of the attention "
                             "modules, as in the paper")


def _pointwise(c_in: int, c_out: int, spatial: int, batch_norm: bool) -> list[nn.Module]:
    """A 1x1 conv over ``spatial`` dims (a Linear on vectors), then batch norm when asked."""
    if spatial == 0:
        layers: list[nn.Module] = [nn.Linear(c_in, c_out, bias=not batch_norm)]
        norm: type[nn.Module] = nn.BatchNorm1d
    else:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial]
        layers = [conv(c_in, c_out, 1, bias=not batch_norm)]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial]
    return layers + ([norm(c_out)] if batch_norm else [])


def attention_block(c_in: int, c: int, spatial: int, batch_norm: bool = True) -> nn.Sequential:
    """h(g(·)) of Eq. (2): g = 1x1 conv (c_in -> c) + BN + ReLU, h = 1x1 conv (c -> c) + BN + sigmoid."""
    return nn.Sequential(*_pointwise(c_in, c, spatial, batch_norm), nn.ReLU(),
                         *_pointwise(c, c, spatial, batch_norm), nn.Sigmoid())


def attend(masks: nn.ModuleList, extract: nn.ModuleList, shared: Sequence[Tensor]) -> Tensor:
    """One task's attended output of the last stage, â^(J), from the shared stage outputs (Eq. 1-2, u = p):
    ``masks[j]`` is h^(j)∘g^(j), ``extract[j - 1]`` is f^(j)."""
    attended: Tensor | None = None
    for j, p in enumerate(shared):
        inp = p if attended is None else torch.cat([p, extract[j - 1](attended)], 1)
        attended = masks[j](inp) * p
    assert attended is not None
    return attended


class MTAN(MultiTaskModel):
    """Multi-Task Attention Network (Liu, Johns & Davison 2019, CVPR): a shared sequential encoder, per task a soft
    attention mask over every stage's output, each task's head on its attended last stage; see the module docstring
    for the equations, the parameter split and every difference from the paper."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], batch_norm: bool = True) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.stages: list[Stage] = split_stages(encoder, rep_dim, "mtan")
        self.encoder = encoder
        widths = [stage_channels(s, j, "mtan", _KEY) for j, s in enumerate(self.stages)]
        spatial = [s.spatial for s in self.stages]
        for j, (s, d) in enumerate(zip(self.stages, spatial, strict=True)):
            if d is None or d > 3:
                raise ConfigError(f"{_KEY}: mtan cannot tell whether stage {j} (layers {s.start}:{s.stop}) of the "
                                  "encoder outputs vectors or 1-3D maps")
        self.masks = nn.ModuleDict({t: nn.ModuleList([
            attention_block(c if j == 0 else 2 * c, c, d, batch_norm)  # type: ignore[arg-type]
            for j, (c, d) in enumerate(zip(widths, spatial, strict=True))]) for t in self.task_names})
        self.extract = nn.ModuleDict({t: nn.ModuleList([copy.deepcopy(stage_layers(encoder, s))
                                                        for s in self.stages[1:]]) for t in self.task_names})
        self.extract.requires_grad_(True)  # a task's own blocks train even where the encoder is frozen
        self.heads = nn.ModuleDict({t.name: make_head(t, rep_dim) for t in tasks})

    def features(self, x: Tensor) -> list[Tensor]:
        """The shared encoder's output of every stage, [p^(1), ..., p^(J)] (p^(J) is the encoder's output)."""
        out = []
        for stage in self.stages:
            x = run_stage(self.encoder, stage, x)
            out.append(x)
        return out

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Each task's head on its attended last stage (Eq. 1-2)."""
        return {t: self.heads[t](attend(self.masks[t], self.extract[t], features)) for t in tasks or self.task_names}

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.outputs(self.features(x), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's trainable parameters (the only part below the shared features)."""
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Task ``task``'s attention modules (g, h and f at every stage) and its head."""
        yield from self.masks[task].parameters()
        yield from self.extract[task].parameters()
        yield from self.heads[task].parameters()


@ARCHITECTURES.register("mtan", params=MTANParams,
                        summary="shared encoder with a per-task soft-attention mask over every stage's features",
                        paper="Liu, Johns & Davison 2019, CVPR")
def _mtan(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: MTANParams) -> MultiTaskModel:
    return MTAN(encoder, rep_dim, tasks, params.batch_norm)
