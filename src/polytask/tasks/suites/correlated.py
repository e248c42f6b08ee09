"""``correlated``: the synthetic regression pair with a controlled task correlation of Ma et al., "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018, Section 3.2 (Eqs. 2-4).

Their recipe, steps (1)-(5):

1. two orthogonal unit vectors u1, u2 in R^d;
2. for a scale c and a correlation -1 <= p <= 1: w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2) (Eq. 2), so
   cos(w1, w2) = p;
3. inputs x ~ N(0, I_d);
4. targets y_i = w_i^T x + sum_{j=1..m} sin(alpha_j w_i^T x + beta_j) + eps_i (Eqs. 3-4), eps_i ~ N(0, 0.01) i.i.d.;
5. repeat 3-4 for every row.

In the linear case (m = 0, no noise) the label Pearson correlation is exactly p; with the sine terms it is a function
of p, not p itself (their Figure 2). What the population gives (Mehler's expansion in Hermite polynomials: both labels
are f(z) + noise with z = w_i^T x ~ N(0, c^2), so Cov(y1, y2) = sum_{k>=1} a_k^2 p^k / k! with f's Hermite
coefficients a_k): the label correlation rises with p on [0, 1], from 0 at p = 0 to Var f / (Var f + noise^2) at
p = 1, but on [-1, 0] the even terms may win, so a negative p can give a positive or non-monotone label correlation.
What this module measured (``info``; defaults d=100, c=1, m=10, n_train=10000): the Pearson correlation of the linear
parts w1^T x, w2^T x equals p up to sampling error (|r - p| <= 0.011 over p in {1, 0.9, 0.5, 0, -0.5} and seeds 0-2;
in the population it is exactly p, as Cov = c^2 p and Var = c^2); the label correlation, for p = 1 / 0.9 / 0.5 / 0 /
-0.5: 0.998 / 0.804 / 0.399 / 0.003 / -0.402 with seed 0, 0.994 / 0.696 / 0.166 / -0.007 / +0.137 with seed 1 (the
sine parameters alpha, beta set how far below p it falls). Over a 0.05 grid of p in [0, 1] (d=16, n_train=2000, seeds
0-29) it rose at every step but the first (p 0 -> 0.05) of two seeds, whose slope at 0 is flat, so sampling noise
of 0.001 shows.

Deliberate differences from the paper, which leaves these free (the values are ours):
- d defaults to 100 (their Section 5.1 input dimension); c = 1 and m = 10 are defaults the paper does not state;
  alpha_j, beta_j ~ N(0, 1), drawn once per suite from the seed and shared by both tasks, as Eqs. 3-4 share them.
- N(0, 0.01) is read as variance 0.01: ``noise`` is the standard deviation, default 0.1.
- One seed fixes u1, u2, alpha, beta, the inputs and the noise, and ``correlation`` only mixes u2 into w2: two suites
  with the same seed and different correlations differ in nothing else (common random numbers for the study; the
  paper regenerates everything per dataset, so repeat over seeds for its "hundreds of runs").
- Targets are not standardised (the paper trains on the raw values).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from polytask.tasks.registry import SUITES
from polytask.tasks.task import SPLITS, Task, TaskData, TaskSuite

TASKS = ("y1", "y2")


class CorrelatedParams(BaseModel):
    """Parameters of the ``correlated`` suite (Ma et al. 2018, Section 3.2)."""

    model_config = ConfigDict(extra="forbid")

    correlation: float = Field(0.5, ge=-1, le=1, description="task correlation p = cos(w1, w2), in [-1, 1]")
    d: int = Field(100, ge=2, le=100_000, description="input dimension (2 at least: u1 and u2 are orthogonal)")
    c: float = Field(1.0, gt=0, le=1e6, description="scale of the weight vectors")
    m: int = Field(10, ge=0, le=10_000, description="number of sine terms in each target")
    noise: float = Field(0.1, ge=0, le=1e6, description="std of the target noise (the paper's N(0, 0.01): 0.1)")
    n_train: int = Field(10000, ge=2, description="number of training rows")
    n_val: int = Field(2000, ge=1, description="number of validation rows")
    n_test: int = Field(2000, ge=1, description="number of test rows")


def orthonormal_pair(d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two orthogonal unit vectors in R^d, uniformly distributed (QR of a Gaussian d x 2 matrix with the signs of R's
    diagonal made positive): step (1) of the recipe."""
    q, r = np.linalg.qr(rng.standard_normal((d, 2)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return q[:, 0], q[:, 1]


def task_weights(u1: np.ndarray, u2: np.ndarray, c: float, p: float) -> np.ndarray:
    """w1 = c u1 and w2 = c (p u1 + sqrt(1 - p^2) u2) as the rows of a 2 x d array (Ma et al. 2018, Eq. 2)."""
    return np.stack([c * u1, c * (p * u1 + np.sqrt(1.0 - p * p) * u2)])


def sine_targets(linear: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """z + sum_j sin(alpha_j z + beta_j) of the linear parts ``z`` (any shape), without noise (Eqs. 3-4)."""
    return linear + np.sin(linear[..., None] * alpha + beta).sum(-1)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """The Pearson correlation of two equally long vectors (0 when one is constant)."""
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


@SUITES.register(
    "correlated",
    params=CorrelatedParams,
    summary="two sine-sum regression tasks whose weight vectors have cosine `correlation` (MMoE synthetic data)",
    paper="Ma et al. 2018 (KDD), Section 3.2",
)
def build(params: CorrelatedParams, seed: int) -> TaskSuite:
    """Rows of x ~ N(0, I_d) with the two targets of Eqs. 3-4; ``info`` holds w1, w2, alpha, beta, cos(w1, w2) and
    the measured Pearson correlations of the linear parts and of the labels on the training rows."""
    weight_rng, sine_rng, x_rng, noise_rng = np.random.default_rng(seed).spawn(4)
    u1, u2 = orthonormal_pair(params.d, weight_rng)
    w = task_weights(u1, u2, params.c, params.correlation)
    alpha, beta = sine_rng.standard_normal((2, params.m))
    sizes = {"train": params.n_train, "val": params.n_val, "test": params.n_test}
    total = sum(sizes.values())
    x = x_rng.standard_normal((total, params.d))
    linear = x @ w.T  # (rows, 2): w_i^T x
    y = sine_targets(linear, alpha, beta) + params.noise * noise_rng.standard_normal((total, 2))
    splits: dict[str, tuple[TaskData, ...]] = {}
    start = 0
    for split in SPLITS:
        rows = slice(start, start + sizes[split])
        splits[split] = (TaskData(
            torch.from_numpy(x[rows].astype(np.float32)),
            {name: torch.from_numpy(y[rows, i].astype(np.float32)) for i, name in enumerate(TASKS)},
            torch.arange(start, start + sizes[split], dtype=torch.int64),
        ),)
        start += sizes[split]
    train = slice(0, params.n_train)
    info = {
        "params": params.model_dump(mode="json"),
        "weights": w.tolist(),
        "alpha": alpha.tolist(),
        "beta": beta.tolist(),
        "cosine": float(w[0] @ w[1] / (np.linalg.norm(w[0]) * np.linalg.norm(w[1]))),
        "linear_correlation": pearson(linear[train, 0], linear[train, 1]),
        "label_correlation": pearson(y[train, 0], y[train, 1]),
    }
    return TaskSuite("correlated", tuple(Task(name, "regression", 1) for name in TASKS), splits, info)
