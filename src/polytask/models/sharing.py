"""Multi-task architectures. Every one is a :class:`MultiTaskModel`: ``forward(x, tasks)`` returns a dict
of per-task outputs, and it says which parameters are shared and which belong to one task, so weighting
and aggregation methods never need to know the architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from pydantic import BaseModel
from torch import Tensor, nn

from polytask.models.backbones import _mlp_layers, build_backbone
from polytask.registry import Registry
from polytask.tasks.task import Task


class MultiTaskModel(nn.Module):
    """Base of the architectures: ``forward(x, tasks)`` gives per-task outputs, and the model says which parameters
    are shared and which are a task's own.

    An architecture with shared features also says what they are (``features``), which of them each task reads
    (``reads``) and how each task's output is computed from them (``outputs``): representation-mode aggregators
    differentiate the task losses with respect to those features and push the aggregated direction back through
    them, so the engine never needs to know the architecture (hard sharing: one tensor read by every task)."""

    task_names: list[str]

    def __init__(self) -> None:
        super().__init__()
        self._register_load_state_dict_pre_hook(_former_names, with_module=True)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters every task trains (per-task gradients and the aggregated direction are taken over these)."""
        raise NotImplementedError

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters only ``task`` trains (its head): no other task's gradient reaches them."""
        raise NotImplementedError

    def features(self, x: Tensor) -> list[Tensor] | None:
        """The shared features of ``x`` (graph attached) that the task outputs are computed from; None when the
        architecture has none (only ``params``-mode aggregation applies then)."""
        return None

    def reads(self, task: str) -> Sequence[int] | None:
        """Indices of the ``features`` that ``task``'s output reads; None: all of them."""
        return None

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-task outputs computed from ``features`` (what ``features`` returned, or detached copies of it)."""
        raise NotImplementedError(f"{type(self).__name__} has no shared features")

    def linear_head(self, task: str) -> nn.Linear | None:
        """The ``nn.Linear`` that alone makes ``task``'s output from its one feature (``outputs`` is then exactly
        ``head(feature)``), or None. Representation mode then keeps the task's feature gradient in factors (the
        gradient of the head's output times the head's weight, :class:`polytask.jacobian.Factored`)."""
        return None

    def aux_loss(self) -> Tensor | None:
        """An auxiliary loss of the architecture itself (e.g. a mixture-of-experts load-balancing term), added to
        the step's loss after the method's weighting or aggregation; None: none. It is computed from the
        parameters when called (the engine calls it once per step, after the task gradients, when the forward's
        graph may be gone), never from a forward's activations."""
        return None


def _former_names(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    """Read tensors saved by polytask 0.1.0 before two layout changes under their present names: a head without
    hidden layers was an ``nn.Sequential`` around its ``Linear`` (``heads.<t>.0.weight``, now ``heads.<t>.weight``),
    and the ``mlp`` backbone began with a ``Flatten`` on vector inputs too (its layers numbered from 1, now from 0).
    Only a tensor that the model has, the state dict lacks and the model does not have under the former name is
    renamed; anything else is left to ``load_state_dict``'s own check."""
    own = module.state_dict(keep_vars=True)
    if all(prefix + k in state_dict for k in own):
        return
    unflattened = [name + "." for name, m in module.named_modules()
                   if name and isinstance(m, nn.Sequential) and len(m) and not isinstance(m[0], nn.Flatten)]
    for key in own:
        if prefix + key in state_dict:
            continue
        parts = key.split(".")
        former = [f"heads.{parts[1]}.0.{parts[2]}"] if len(parts) == 3 and parts[0] == "heads" else []
        for seq in unflattened:
            index, _, rest = key[len(seq):].partition(".")
            if key.startswith(seq) and index.isdigit() and rest:
                former.append(f"{seq}{int(index) + 1}.{rest}")
        old = next((f for f in former if prefix + f in state_dict and f not in own), None)
        if old is not None:
            state_dict[prefix + key] = state_dict.pop(prefix + old)


def make_head(task: Task, in_dim: int) -> nn.Module:
    """A task's head: the linear output layer itself (``heads.<task>.weight``), or, with hidden layers, an
    ``nn.Sequential`` of Linear+ReLU layers and the output layer."""
    if not task.head.hidden:
        return nn.Linear(in_dim, task.n_outputs)
    layers = _mlp_layers(in_dim, list(task.head.hidden), 0.0)
    return nn.Sequential(*layers, nn.Linear(task.head.hidden[-1], task.n_outputs))


class HardSharing(MultiTaskModel):
    """Hard parameter sharing (Caruana 1997): one shared encoder, one head per task."""

    def __init__(self, encoder: nn.Module, rep_dim: int, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({t.name: make_head(t, rep_dim) for t in tasks})
        self.task_names = [t.name for t in tasks]

    def features(self, x: Tensor) -> list[Tensor]:
        """The encoder's output: one representation read by every head."""
        return [self.encoder(x)]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {t: self.heads[t](features[0]) for t in (tasks or self.task_names)}

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        # ``outputs(features(x))`` inlined: the forward of every step (a subclass that changes either overrides it)
        z, heads = self.encoder(x), self.heads._modules
        return {t: heads[t](z) for t in (tasks or self.task_names)}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters that train (a frozen pretrained encoder has none): per-task gradients and
        aggregated directions are computed for these only."""
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()

    def linear_head(self, task: str) -> nn.Linear | None:
        """The head when it is one plain ``nn.Linear`` (no hook or parametrisation changes what it computes)."""
        head = self.heads[task]
        parts = [head] if type(head) is nn.Linear else [head, head[0]] if isinstance(head, nn.Sequential) and \
            len(head) == 1 and type(head[0]) is nn.Linear else None
        return parts[-1] if parts and not any(m._forward_hooks or m._forward_pre_hooks for m in parts) else None


Architecture = Callable[[nn.Module, int, Sequence[Task], BaseModel], MultiTaskModel]
ARCHITECTURES: Registry[Architecture] = Registry("architecture")


@ARCHITECTURES.register("hard", summary="hard parameter sharing: shared encoder, one head per task",
                        paper="Caruana 1997")
def _hard(encoder: nn.Module, rep_dim: int, tasks: Sequence[Task], params: BaseModel) -> MultiTaskModel:
    return HardSharing(encoder, rep_dim, tasks)


def build_model(
    tasks: Sequence[Task],
    input_shape: tuple[int, ...],
    backbone: str = "mlp",
    backbone_params: dict | BaseModel | None = None,
    architecture: str = "hard",
    architecture_params: dict | BaseModel | None = None,
    categorical: Mapping[int, int] | None = None,
    embedding_dim: int | None = None,
) -> MultiTaskModel:
    """Build a multi-task model for ``tasks`` on inputs of ``input_shape``. A ``backbone`` named
    ``package.module:function`` is the user's whole model (``model.factory``): called with ``tasks``,
    ``input_shape`` and ``backbone_params`` as keywords, its module replaces backbone and architecture.

    ``categorical`` (``TaskSuite.categorical``: input column -> number of codes) puts an
    :class:`~polytask.models.embedding.Embedded` front in the encoder: the backbone is built for the embedded width
    and the architecture receives embeddings + backbone as its (shared) encoder; ``embedding_dim`` is every
    column's embedding width (None: a width by the column's codes). A user's whole model reads the codes as they
    are (it is given ``input_shape``, and ``categorical`` is not applied)."""
    from polytask.config import import_factory, is_import_path

    if is_import_path(backbone):
        from polytask.models.user import as_multitask

        kwargs = backbone_params.model_dump() if isinstance(backbone_params, BaseModel) else backbone_params or {}
        return as_multitask(import_factory(backbone, "model.factory")(list(tasks), tuple(input_shape), **kwargs),
                            tasks)
    if categorical:
        from polytask.models.embedding import Embedded, embedded_width
        from polytask.tasks.task import check_categorical

        check_categorical(dict(categorical), input_shape, "model")
        width = embedded_width(input_shape[0], categorical, embedding_dim)
        backbone_module, rep_dim = build_backbone(backbone, backbone_params or {}, (width,))
        encoder: nn.Module = Embedded(backbone_module, input_shape[0], categorical, embedding_dim)
    else:
        encoder, rep_dim = build_backbone(backbone, backbone_params or {}, input_shape)
    params = ARCHITECTURES.params_for(architecture, architecture_params, "model.architecture_params")
    return ARCHITECTURES.get(architecture).build(encoder, rep_dim, tasks, params)
