"""``JointStep``: any polytask method as one call in the user's own PyTorch loop.

The user runs their own forward and computes the K task losses; ``JointStep.backward`` puts the method's gradients
into ``.grad`` of the shared and task-specific parameters, and ``opt.step()`` follows as usual (torchjd's
``mtl_backward`` is the model). Per-task gradients come only from what is passed in (losses, features, parameter
lists), never from the model, so any architecture works. The method's state (learned task weights, EMA buffers,
step counter) lives in the object and round-trips through ``state_dict()`` / ``load_state_dict()`` (tensors and
JSON-able values, no pickles), so a user's checkpoint resumes the method exactly.

The math is the engine's own (:mod:`polytask.engine.step`): the same functions turn losses into per-task gradients
and per-task gradients into ``.grad``, so a method gives the same gradients here as in ``polytask run``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from polytask.config import MethodConfig
from polytask.engine.step import (
    Method,
    aggregated_backward,
    build_method,
    feature_task_grads,
    loss_task_grads,
    step_generator,
    weighted_backward,
)
from polytask.errors import CheckpointError, ConfigError
from polytask.jacobian import through
from polytask.registry import validate_model
from polytask.weighting.base import State, StepContext

Losses = Mapping[str, Tensor] | Sequence[Tensor] | Tensor
Params = nn.Module | Iterable[Tensor] | None
Features = Tensor | Sequence[Tensor] | Mapping[str, Tensor | Sequence[Tensor]]

FORMAT = 1


class JointStep:
    """One multi-task backward with a registered method (``polytask methods`` lists them), its state kept here.

    ``method``: a loss weighting or gradient aggregator by name; ``tasks``: the task names, in the order of the
    losses; ``mode``: ``params`` (aggregators see the exact per-task gradients of the shared parameters) or
    ``representation`` (of the shared features, per sample: cheaper); ``params``: the method's parameters;
    ``chunk_size``: tasks per batched backward pass (0: all); ``sam_rho``: F-MTL's sharpness-aware radius (params
    mode, needs ``closure=`` in :meth:`backward`); ``seed``: seeds the per-step draws of stochastic methods
    (RLW, PCGrad, GradDrop) as the engine does, so a run is reproducible and resumable.

    Use: ``opt.zero_grad(); mtl.backward(losses, features=z, shared=encoder, heads=heads); opt.step()``, plus
    ``mtl.after_step(new_losses)`` after ``opt.step()`` for methods that learn from the step's effect (FAMO) and
    ``val_losses=`` for methods that watch validation losses (CoBa).
    """

    def __init__(self, method: str, tasks: Sequence[str], mode: Literal["params", "representation"] = "params",
                 params: Mapping[str, Any] | None = None, *, chunk_size: int = 0, sam_rho: float = 0.0,
                 seed: int = 0) -> None:
        names = list(tasks)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"JointStep tasks: need distinct task names, got {names}")
        cfg = validate_model(MethodConfig, {"name": method, "params": dict(params or {}), "grad_mode": mode,
                                            "chunk_size": chunk_size, "sam_rho": sam_rho}, where="JointStep")
        self.config = cast(MethodConfig, cfg)
        self.tasks = names
        self.method: Method = build_method(self.config, names)
        self.seed = int(seed)
        self.step = 0
        self.epoch = 0
        self.state: State = self.method.init()
        self._pending_after = False
        self._ctx: StepContext | None = None

    def __repr__(self) -> str:
        return (f"JointStep({self.method.name!r}, tasks={self.tasks}, mode={self.method.mode!r}, "
                f"step={self.step})")

    @property
    def needs_val(self) -> bool:
        """Whether :meth:`backward` needs ``val_losses=`` (CoBa)."""
        return self.method.needs_val

    @property
    def needs_after_step(self) -> bool:
        """Whether :meth:`after_step` must follow ``opt.step()`` (FAMO)."""
        return self.method.kind == "weighting" and self.method.impl.after_step is not None

    def backward(self, losses: Losses, *, features: Features | None = None, shared: Params = None,
                 heads: Mapping[str, Params] | Sequence[Params] | None = None,
                 val_losses: Losses | Callable[[], Losses] | None = None,
                 closure: Callable[[], Losses] | None = None, epoch: int | None = None) -> Tensor | None:
        """Add the method's gradients into ``.grad`` (as ``loss.backward()`` does: zero them before, as usual).

        ``losses``: the K task losses (a dict by task name, a sequence in task order, or a K-vector; separate
        per-task losses are cheapest, as each task's pass then runs through its own head only). ``features``: the
        shared features the task heads read, a tensor, a sequence of tensors every task reads, or a dict task ->
        tensor(s) for architectures where tasks read different features; every dependence of the losses on
        ``shared`` must go through them. ``shared``: the shared parameters (a module or parameters; needed in
        params mode; in representation mode, where given, the only ones the direction reaches). ``heads``: each
        task's own parameters (dict or ``nn.ModuleDict`` by task, or a sequence in task order; a module or
        parameters each): they get their own task's gradient. Without ``features``, params mode differentiates
        the losses directly.
        ``val_losses``: K validation losses or a callable returning them (CoBa reads them every ``val_every``
        steps). ``closure``: recomputes the K losses (F-MTL). ``epoch``: the current epoch, for methods that
        average over epochs (DWA). Loss weightings backpropagate Σ w_k L_k into every parameter, as
        ``loss.backward()``. Returns the K task weights used (None for per-coordinate methods, e.g. GradDrop).
        """
        m = self.method
        if self._pending_after:
            raise ConfigError(f"method {m.name!r} learns from the losses after each optimiser step: call "
                              "JointStep.after_step(losses) after opt.step(), before the next backward")
        if m.needs_val and val_losses is None:
            raise ConfigError(f"method {m.name!r} reads validation losses: pass val_losses= (the K losses on a "
                              "validation batch, or a function returning them) to JointStep.backward")
        if epoch is not None:
            self.epoch = int(epoch)
        loss_list = self._losses(losses, "losses")
        ctx = StepContext(self.step, self.epoch, None, self._val(val_losses), 1, step_generator(self.seed, self.step))
        if m.kind == "weighting":
            weights, state = weighted_backward(m, self.state, torch.stack(loss_list), ctx)
        else:
            weights, state = self._aggregated(loss_list, ctx, features, shared, heads, closure)
        self.state, self._ctx = state, ctx
        self.step += 1
        self._pending_after = self.needs_after_step
        return None if weights is None else weights.detach()

    def after_step(self, losses: Losses) -> None:
        """Give the method the K losses recomputed on the same batch after ``opt.step()`` (FAMO learns its task
        logits from how much each loss fell); a no-op for methods that do not use them."""
        if not self.needs_after_step:
            return
        if self._ctx is None:
            raise ConfigError("JointStep.after_step: call backward (then opt.step()) first")
        new = torch.stack(self._losses(losses, "after_step losses")).detach()
        self.state = self.method.impl.after_step(self.state, new, self._ctx)
        self._pending_after = False

    def state_dict(self) -> dict[str, Any]:
        """The method's state and position: nested dicts/lists of tensors and JSON-able values (no pickles), for
        ``torch.save`` or :func:`polytask.engine.checkpoint.save`."""
        return {"format": FORMAT, "method": self.method.name, "tasks": list(self.tasks), "mode": self.method.mode,
                "step": self.step, "epoch": self.epoch, "after_step_pending": self._pending_after,
                "state": _clone(self.state)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the method, tasks and mode must be this object's."""
        for key, own in (("method", self.method.name), ("tasks", self.tasks), ("mode", self.method.mode)):
            if key not in state_dict:
                raise CheckpointError(f"JointStep.load_state_dict: state_dict has no {key!r}")
            saved = list(state_dict[key]) if key == "tasks" else state_dict[key]
            if saved != own:
                raise CheckpointError(f"JointStep.load_state_dict: state_dict[{key!r}] is {state_dict[key]!r}, "
                                      f"this JointStep has {own!r}")
        self.step = int(state_dict["step"])
        self.epoch = int(state_dict["epoch"])
        self._pending_after = bool(state_dict.get("after_step_pending", False))
        self.state = _clone(state_dict["state"])
        self._ctx = StepContext(max(self.step - 1, 0), self.epoch, None, None, 1,
                                step_generator(self.seed, max(self.step - 1, 0)))

    # ------------------------------------------------------------ inputs

    def _aggregated(self, loss_list: list[Tensor], ctx: StepContext, features: Features | None, shared: Params,
                    heads: Mapping[str, Params] | Sequence[Params] | None,
                    closure: Callable[[], Losses] | None) -> tuple[Tensor | None, State]:
        m = self.method
        shared_list = _params(shared)
        head_lists = self._heads(heads)
        _check_disjoint(shared_list, head_lists, self.tasks)
        if m.mode == "params" and not shared_list:
            raise ConfigError(f"JointStep({m.name!r}, mode='params'): pass shared= (the shared parameters or "
                              "module) to backward")
        fn = None if closure is None else (lambda: torch.stack(self._losses(closure(), "closure()")))
        if features is None:
            if m.mode == "representation":
                raise ConfigError(f"JointStep({m.name!r}, mode='representation') aggregates the gradients of the "
                                  "shared features: pass features= to backward")
            tg, blocks = loss_task_grads(torch.stack(loss_list), shared_list, head_lists, m.chunk)
        else:
            zs, reads = self._features(features)
            tg = feature_task_grads(loss_list, zs, zs, reads, head_lists)
            blocks = through(tg.zs, shared_list, tg.z_blocks, m.chunk) if m.mode == "params" else None
        return aggregated_backward(m, self.state, tg, blocks, shared_list, ctx, fn, below=shared_list or None)

    def _losses(self, losses: Losses, what: str) -> list[Tensor]:
        k = len(self.tasks)
        if isinstance(losses, Mapping):
            missing = [t for t in self.tasks if t not in losses]
            unknown = [n for n in losses if n not in self.tasks]
            if missing or unknown:
                raise ConfigError(f"JointStep {what}: " + "; ".join(
                    ([f"no loss for task(s) {missing}"] if missing else [])
                    + ([f"unknown task(s) {unknown} (tasks: {self.tasks})"] if unknown else [])))
            items = [losses[t] for t in self.tasks]
        elif isinstance(losses, Tensor):
            if losses.dim() != 1 or losses.shape[0] != k:
                raise ConfigError(f"JointStep {what}: expected {k} losses (tasks {self.tasks}), got a tensor of "
                                  f"shape {tuple(losses.shape)}")
            items = list(losses.unbind())
        else:
            items = list(losses)
            if len(items) != k:
                raise ConfigError(f"JointStep {what}: expected {k} losses (tasks {self.tasks}), got {len(items)}")
        for t, loss in zip(self.tasks, items, strict=True):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ConfigError(f"JointStep {what}: the loss of task {t!r} must be a scalar tensor, got {shape}")
        return [loss if loss.dim() == 0 else loss.reshape(()) for loss in items]

    def _val(self, val_losses: Losses | Callable[[], Losses] | None) -> Callable[[], Tensor] | None:
        if val_losses is None:
            return None
        if callable(val_losses) and not isinstance(val_losses, Tensor):
            fn = val_losses
            return lambda: torch.stack(self._losses(fn(), "val_losses()")).detach()
        fixed = torch.stack(self._losses(val_losses, "val_losses")).detach()
        return lambda: fixed

    def _heads(self, heads: Mapping[str, Params] | Sequence[Params] | None) -> list[list[Tensor]]:
        if heads is None:
            return [[] for _ in self.tasks]
        if isinstance(heads, (Mapping, nn.ModuleDict)):
            unknown = [n for n in heads if n not in self.tasks]
            if unknown:
                raise ConfigError(f"JointStep heads: unknown task(s) {unknown} (tasks: {self.tasks})")
            return [_params(heads[t]) if t in heads else [] for t in self.tasks]
        items = list(heads)
        if len(items) != len(self.tasks):
            raise ConfigError(f"JointStep heads: expected one entry per task {self.tasks}, got {len(items)}")
        return [_params(h) for h in items]

    def _features(self, features: Features) -> tuple[list[Tensor], list[list[int]]]:
        """The distinct feature tensors and, per task, the indices of those it reads."""
        zs: list[Tensor] = []
        index: dict[int, int] = {}

        def ids(ts: Tensor | Sequence[Tensor], where: str) -> list[int]:
            out = []
            for z in [ts] if isinstance(ts, Tensor) else list(ts):
                if not isinstance(z, Tensor) or not z.requires_grad:
                    raise ConfigError(f"JointStep features{where}: expected tensors that require grad (the output "
                                      "of the shared part, not detached or computed under no_grad), got "
                                      f"{type(z).__name__ if not isinstance(z, Tensor) else 'a tensor without grad'}")
                if id(z) not in index:
                    index[id(z)] = len(zs)
                    zs.append(z)
                if index[id(z)] not in out:
                    out.append(index[id(z)])
            return out

        if isinstance(features, Mapping):
            missing = [t for t in self.tasks if t not in features]
            unknown = [n for n in features if n not in self.tasks]
            if missing or unknown:
                raise ConfigError("JointStep features: " + "; ".join(
                    ([f"no entry for task(s) {missing} (map every task to the features it reads)"] if missing else [])
                    + ([f"unknown task(s) {unknown} (tasks: {self.tasks})"] if unknown else [])))
            return zs, [ids(features[t], f"[{t!r}]") for t in self.tasks]
        shared = ids(features, "")
        return zs, [list(shared) for _ in self.tasks]


def _params(p: Params) -> list[Tensor]:
    """The trainable parameters of a module, a tensor or an iterable of tensors (frozen ones are left out, as
    ``loss.backward()`` leaves their ``.grad`` alone)."""
    if p is None:
        return []
    items = p.parameters() if isinstance(p, nn.Module) else [p] if isinstance(p, Tensor) else p
    return [t for t in items if t.requires_grad]


def _check_disjoint(shared: list[Tensor], heads: list[list[Tensor]], tasks: list[str]) -> None:
    """A parameter is shared or belongs to one task: else its gradient would be ambiguous."""
    seen = {id(p): "shared" for p in shared}
    for t, group in zip(tasks, heads, strict=True):
        for p in group:
            where = seen.setdefault(id(p), f"heads[{t!r}]")
            if where != f"heads[{t!r}]":
                raise ConfigError(f"JointStep: a parameter of shape {tuple(p.shape)} is in both {where} and "
                                  f"heads[{t!r}]; a parameter is either shared or one task's own")


def _clone(tree: Any) -> Any:
    """A copy of a state tree whose tensors are detached clones (so later steps never alias a saved state)."""
    if isinstance(tree, Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree
