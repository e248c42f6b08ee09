"""Function classes for in-context regression (Garg et al. 2022, "What can transformers learn in-context? A case
study of simple function classes", NeurIPS, Sec. 2 and their ``src/tasks.py`` / ``src/samplers.py``).

Each class draws a batch of functions (``draw``), Gaussian inputs x ~ N(0, I_d) (``gaussian_inputs``) and labels
(``apply`` plus ``label_noise``); ``sample`` composes the three and is a pure function of the ``torch.Generator``.
Splitting the draw of functions from the draw of inputs lets :class:`polytask.icl.evaluate.TaskPool` reuse a fixed
pool of functions (Raventós et al. 2023) and lets the out-of-distribution prompts of Garg et al.'s Sec. 4
(:func:`scaled_inputs`, :func:`orthant_shift`, :func:`noisy_labels`) change the inputs of the same functions.

Deliberate differences from Garg et al.'s code:

- every draw takes an explicit generator (theirs use the global RNG, or per-prompt seeds);
- parameters are drawn before inputs (the order inside one ``sample`` call; theirs draws inputs first);
- their ``renormalize_ys`` option of noisy linear regression and their quadratic / classification classes are left
  out;
- the opposite-orthant prompts come back as :class:`SplitPrompts` (context and query points of the same
  functions) instead of being built inside their evaluation loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.errors import ConfigError
from polytask.icl.prompts import Prompts
from polytask.registry import Registry

Params = dict[str, Tensor]
"""A batch of drawn functions: each tensor's first dimension is the batch."""


def active_dim(name: str, dim: int, requested: int | None) -> int:
    """The number of active input coordinates: ``requested`` (a curriculum's truncated dimension) or ``dim``."""
    if requested is None:
        return dim
    if not 1 <= requested <= dim:
        raise ConfigError(f"function class {name!r}: dim must be in 1..{dim}, got {requested}")
    return requested


def gaussian_inputs(generator: torch.Generator, batch: int, n_points: int, dim: int, active: int | None = None
                    ) -> Tensor:
    """x ~ N(0, I_dim), ``batch`` x ``n_points`` x ``dim``; coordinates from ``active`` on are zero (Garg et al.'s
    curriculum, ``GaussianSampler.sample_xs(n_dims_truncated=...)``)."""
    xs = torch.randn(batch, n_points, dim, generator=generator)
    if active is not None and active < dim:
        xs[:, :, active:] = 0.0
    return xs


class FunctionFamily:
    """A function class R^d -> R with Gaussian inputs (implements :class:`polytask.icl.prompts.FunctionClass`).

    Subclasses define ``draw`` (a batch of functions) and ``apply`` (their values); ``label_noise`` adds noise to
    the labels where the class has it."""

    name: str = ""
    dim: int = 1
    scale: float = 1.0

    def draw(self, generator: torch.Generator, batch: int, dim: int | None = None) -> Params:
        """``batch`` functions of the class (``dim``: a curriculum's active dimension, for classes that use it)."""
        raise NotImplementedError

    def apply(self, params: Params, xs: Tensor) -> Tensor:
        """The noiseless values f(x), B x n, of the functions ``params`` at ``xs`` (B x n x d)."""
        raise NotImplementedError

    def label_noise(self, generator: torch.Generator, ys: Tensor) -> Tensor:
        """The labels the prompt shows: ``ys`` itself unless the class is noisy."""
        return ys

    def weights(self, params: Params) -> Tensor | None:
        """The B x d weight vectors of linear classes (``Prompts.ws``); None for the others."""
        return None

    def labels(self, generator: torch.Generator, params: Params, xs: Tensor) -> Tensor:
        """The prompt's labels at ``xs``: values plus the class's label noise."""
        return self.label_noise(generator, self.apply(params, xs))

    def sample(self, generator: torch.Generator, batch: int, n_points: int, dim: int | None = None) -> Prompts:
        """``batch`` prompts of ``n_points`` points, each with its own function; ``dim`` < ``self.dim`` zeroes the
        inputs' last coordinates (the curriculum)."""
        active = active_dim(self.name, self.dim, dim)
        params = self.draw(generator, batch, active)
        xs = gaussian_inputs(generator, batch, n_points, self.dim, active)
        return Prompts(xs, self.labels(generator, params, xs), self.weights(params))

    def sample_split(self, generator: torch.Generator, batch: int, n_points: int, shift: InputShift,
                     dim: int | None = None) -> Prompts | SplitPrompts:
        """Prompts whose inputs ``shift`` moves out of distribution (Garg et al. Sec. 4): a plain :class:`Prompts`
        when the query points are the context points, else :class:`SplitPrompts` of the same functions."""
        active = active_dim(self.name, self.dim, dim)
        params = self.draw(generator, batch, active)
        context_xs, query_xs = shift(generator, gaussian_inputs(generator, batch, n_points, self.dim, active))
        context = Prompts(context_xs, self.labels(generator, params, context_xs), self.weights(params))
        if query_xs is None:
            return context
        return SplitPrompts(context, Prompts(query_xs, self.labels(generator, params, query_xs), context.ws))


# ---------------------------------------------------------------- the classes


@dataclass(frozen=True)
class LinearRegression(FunctionFamily):
    """f(x) = scale * w.x with w ~ N(0, I_d) (Garg et al. Sec. 2; ``tasks.py:LinearRegression``)."""

    dim: int = 20
    scale: float = 1.0
    name: str = "linear_regression"

    def draw(self, generator: torch.Generator, batch: int, dim: int | None = None) -> Params:
        """w ~ N(0, I_d) for each prompt (all d coordinates, as theirs, also under a curriculum)."""
        return {"w": torch.randn(batch, self.dim, generator=generator)}

    def apply(self, params: Params, xs: Tensor) -> Tensor:
        """scale * x.w for every point."""
        return self.scale * torch.einsum("bnd,bd->bn", xs, params["w"])

    def weights(self, params: Params) -> Tensor | None:
        """The drawn w (scaled, so that y = x.ws)."""
        return self.scale * params["w"]


@dataclass(frozen=True)
class SparseLinearRegression(LinearRegression):
    """Linear regression with ``sparsity`` nonzero coordinates of w, chosen uniformly among the active ones
    (``tasks.py:SparseLinearRegression``, whose ``valid_coords`` is the curriculum's dimension)."""

    sparsity: int = 3
    name: str = "sparse_linear_regression"

    def draw(self, generator: torch.Generator, batch: int, dim: int | None = None) -> Params:
        """w ~ N(0, I_d), then all but ``sparsity`` random coordinates among the first ``dim`` are zeroed."""
        valid = self.dim if dim is None else dim
        if not 1 <= self.sparsity <= valid:
            raise ConfigError(f"function class {self.name!r}: sparsity must be in 1..{valid} (the active "
                              f"dimension), got {self.sparsity}")
        w = torch.randn(batch, self.dim, generator=generator)
        order = torch.rand(batch, valid, generator=generator).argsort(dim=1)[:, :self.sparsity]
        keep = torch.zeros(batch, self.dim, dtype=torch.bool).scatter_(1, order, True)
        return {"w": torch.where(keep, w, torch.zeros_like(w))}


@dataclass(frozen=True)
class NoisyLinearRegression(LinearRegression):
    """Linear regression with Gaussian label noise of std ``noise_std`` (``tasks.py:NoisyLinearRegression``); the
    Bayes-optimal predictor is ridge with lambda = noise_std^2 (prior variance 1, :func:`baselines.ridge`)."""

    noise_std: float = 1.0
    name: str = "noisy_linear_regression"

    def label_noise(self, generator: torch.Generator, ys: Tensor) -> Tensor:
        """ys + noise_std * N(0, 1), fresh for every point."""
        return ys + self.noise_std * torch.randn(ys.shape, generator=generator)


@dataclass(frozen=True)
class Relu2nnRegression(FunctionFamily):
    """A 2-layer ReLU network f(x) = scale * sqrt(2 / h) * W2^T relu(W1^T x), W1 and W2 standard normal with
    ``hidden`` = h = 100 units (Garg et al. Sec. 2; ``tasks.py:Relu2nnRegression``: the sqrt(2/h) factor puts
    the labels on linear regression's scale)."""

    dim: int = 20
    hidden: int = 100
    scale: float = 1.0
    name: str = "relu_2nn_regression"

    def draw(self, generator: torch.Generator, batch: int, dim: int | None = None) -> Params:
        """W1 (B x d x h) and W2 (B x h), standard normal."""
        return {"w1": torch.randn(batch, self.dim, self.hidden, generator=generator),
                "w2": torch.randn(batch, self.hidden, generator=generator)}

    def apply(self, params: Params, xs: Tensor) -> Tensor:
        """scale * sqrt(2 / h) * relu(x W1) W2."""
        hidden = torch.relu(torch.bmm(xs, params["w1"]))
        return self.scale * math.sqrt(2.0 / self.hidden) * torch.einsum("bnh,bh->bn", hidden, params["w2"])


@dataclass(frozen=True)
class DecisionTree(FunctionFamily):
    """A full binary tree of ``depth`` 4 (Garg et al. Sec. 2; ``tasks.py:DecisionTree``): node j (heap order, root
    0, children 2j+1 and 2j+2) tests x[coord_j] > 0 for a uniform coordinate (over all d, as theirs, also under a
    curriculum) and goes right when true; the leaves hold N(0, 1) values."""

    dim: int = 20
    depth: int = 4
    scale: float = 1.0
    name: str = "decision_tree"

    def draw(self, generator: torch.Generator, batch: int, dim: int | None = None) -> Params:
        """A coordinate per node and a value per node (only the leaves' values are read)."""
        nodes = 2 ** (self.depth + 1) - 1
        return {"coords": torch.randint(0, self.dim, (batch, nodes), generator=generator),
                "values": torch.randn(batch, nodes, generator=generator)}

    def apply(self, params: Params, xs: Tensor) -> Tensor:
        """Walk every point down its prompt's tree (vectorised over the batch and the points)."""
        node = torch.zeros(xs.shape[:2], dtype=torch.long)
        for _ in range(self.depth):
            coord = params["coords"].gather(1, node)
            right = xs.gather(2, coord.unsqueeze(-1)).squeeze(-1) > 0
            node = 2 * node + 1 + right.long()
        return self.scale * params["values"].gather(1, node)


# ---------------------------------------------------------------- out-of-distribution prompts (Garg et al. Sec. 4)

InputShift = Callable[[torch.Generator, Tensor], tuple[Tensor, Tensor | None]]
"""Maps in-distribution inputs (B x n x d) to (context inputs, query inputs or None when they are the same)."""


@dataclass(frozen=True)
class SplitPrompts:
    """Prompts whose query points differ from their context points (same functions, same shapes): the prediction
    of y_i is read from the prompt ``context`` points 1..i-1 followed by ``query`` point i (:meth:`at`), as Garg et
    al.'s ``eval_batch`` with ``xs_p``."""

    context: Prompts
    query: Prompts

    def at(self, i: int) -> Prompts:
        """The prompt whose first ``i`` points are context points and the rest query points (position ``i`` is the
        one to read)."""
        c, q = self.context, self.query
        return Prompts(torch.cat([c.xs[:, :i], q.xs[:, i:]], 1), torch.cat([c.ys[:, :i], q.ys[:, i:]], 1), c.ws)


def standard_inputs() -> InputShift:
    """In-distribution inputs (the identity shift)."""
    return lambda generator, xs: (xs, None)


def scaled_inputs(factor: float) -> InputShift:
    """Every input multiplied by ``factor`` (Garg et al. Sec. 4 "scaled x"; theirs scales by a random rotation
    times ``factor``, which for an isotropic Gaussian has the same distribution as ``factor * x``)."""
    return lambda generator, xs: (xs * factor, None)


def orthant_shift() -> InputShift:
    """Context points in one random orthant per prompt, each query point in the opposite one (Garg et al. Sec. 4,
    ``eval.py:gen_opposite_quadrants``: context |x| * s, query -|x| * s for a random sign pattern s)."""

    def shift(generator: torch.Generator, xs: Tensor) -> tuple[Tensor, Tensor | None]:
        signs = torch.where(torch.rand(xs.shape[0], 1, xs.shape[2], generator=generator) < 0.5, -1.0, 1.0)
        context = xs.abs() * signs
        return context, -context

    return shift


def random_orthant() -> InputShift:
    """Context points in one random orthant per prompt, query points unchanged (``gen_random_quadrants``)."""

    def shift(generator: torch.Generator, xs: Tensor) -> tuple[Tensor, Tensor | None]:
        signs = torch.where(torch.rand(xs.shape[0], 1, xs.shape[2], generator=generator) < 0.5, -1.0, 1.0)
        return xs.abs() * signs, xs

    return shift


def noisy_labels(prompts: Prompts, generator: torch.Generator, std: float) -> Prompts:
    """The same prompts with N(0, std^2) noise added to every label (Garg et al. Sec. 4's noisy-label prompts; theirs
    also rescales the labels, ``renormalize_ys``, which is left out)."""
    return Prompts(prompts.xs, prompts.ys + std * torch.randn(prompts.ys.shape, generator=generator), prompts.ws)


SHIFTS: dict[str, Callable[..., InputShift]] = {"standard": standard_inputs, "scaled": scaled_inputs,
                                                "orthant": orthant_shift, "random_orthant": random_orthant}
"""The input shifts by name (``scaled`` takes the factor)."""


# ---------------------------------------------------------------- registry


class LinearParams(BaseModel):
    """Parameters of linear regression."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(20, ge=1, description="input dimension d")
    scale: float = Field(1.0, description="labels multiplied by this (Garg et al.'s scale)")


class SparseParams(LinearParams):
    """Parameters of sparse linear regression."""

    sparsity: int = Field(3, ge=1, description="nonzero coordinates of w")


class NoisyParams(LinearParams):
    """Parameters of noisy linear regression."""

    noise_std: float = Field(1.0, ge=0, description="label noise standard deviation")


class ReluParams(BaseModel):
    """Parameters of 2-layer ReLU networks."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(20, ge=1, description="input dimension d")
    hidden: int = Field(100, ge=1, description="hidden units h")
    scale: float = Field(1.0, description="labels multiplied by this")


class TreeParams(BaseModel):
    """Parameters of decision trees."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(20, ge=1, description="input dimension d")
    depth: int = Field(4, ge=1, le=12, description="tree depth")
    scale: float = Field(1.0, description="labels multiplied by this")


FUNCTION_CLASSES: Registry[Callable[[BaseModel], FunctionFamily]] = Registry("function class")
_GARG = "Garg et al. 2022, NeurIPS"

FUNCTION_CLASSES.register("linear_regression", params=LinearParams, summary="y = w.x, w ~ N(0, I)", paper=_GARG)(
    lambda p: LinearRegression(**p.model_dump()))
FUNCTION_CLASSES.register("sparse_linear_regression", params=SparseParams, summary="w with k nonzero coordinates",
                          paper=_GARG)(lambda p: SparseLinearRegression(**p.model_dump()))
FUNCTION_CLASSES.register("noisy_linear_regression", params=NoisyParams, summary="y = w.x + noise",
                          paper=_GARG)(lambda p: NoisyLinearRegression(**p.model_dump()))
FUNCTION_CLASSES.register("relu_2nn_regression", params=ReluParams, summary="2-layer ReLU networks",
                          paper=_GARG)(lambda p: Relu2nnRegression(**p.model_dump()))
FUNCTION_CLASSES.register("decision_tree", params=TreeParams, summary="depth-4 trees on sign tests",
                          paper=_GARG)(lambda p: DecisionTree(**p.model_dump()))


def build_function_class(name: str, params: dict | BaseModel | None = None, where: str = "") -> FunctionFamily:
    """The function class ``name`` with its validated ``params`` (errors name the key under ``where``)."""
    return FUNCTION_CLASSES.build(name, params, where=where)
