"""``multidigits``: two scikit-learn 8x8 digits overlaid, a small offline Multi-MNIST.

The layout follows Multi-MNIST (Sabour et al., 2017; Sener & Koltun, 2018). The 1,797 digits are
split into train/val/test pools first and pairs are drawn within a pool, so no test digit is ever
seen in a training pair.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.tasks.registry import SUITES
from polytask.tasks.suites._digits import PAIR_TASKS, pair_data, sklearn_digits, stratified_split
from polytask.tasks.task import TaskSuite


class MultiDigitsParams(BaseModel):
    """Parameters of the ``multidigits`` suite."""

    model_config = ConfigDict(extra="forbid")

    canvas: int = Field(12, ge=8, le=64, description="side of the square canvas in pixels")
    jitter: int = Field(1, ge=0, le=8, description="largest random inward shift of each digit")
    n_train: int = Field(6000, ge=1, description="number of training pairs")
    n_val: int = Field(1000, ge=1, description="number of validation pairs")
    n_test: int = Field(2000, ge=1, description="number of test pairs")
    train_fraction: float = Field(0.6, gt=0, lt=1, description="share of digits in the train pool")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of digits in the val pool")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of digits in the test pool")

    @model_validator(mode="after")
    def _check(self) -> MultiDigitsParams:
        if self.canvas < 8 + self.jitter:
            raise ValueError(f"canvas {self.canvas} is below 8 + jitter = {8 + self.jitter}")
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train/val/test fractions must sum to 1, got {total:g}")
        return self


@SUITES.register(
    "multidigits",
    params=MultiDigitsParams,
    summary="two 8x8 scikit-learn digits overlaid; tasks: left and right digit class",
    paper="Sabour et al. 2017; Sener & Koltun 2018 (Multi-MNIST layout)",
)
def build(params: MultiDigitsParams, seed: int) -> TaskSuite:
    """Pools split stratified by class, then ``n_*`` pairs drawn within each pool."""
    images, labels = sklearn_digits()
    pool_rng, *pair_rngs = np.random.default_rng(seed).spawn(4)
    pools = stratified_split(
        labels, (params.train_fraction, params.val_fraction, params.test_fraction), pool_rng
    )
    sizes = (params.n_train, params.n_val, params.n_test)
    splits = {
        split: (pair_data(images, labels, pool, n, params.canvas, params.jitter, rng,
                          f"multidigits {split} pool"),)
        for split, pool, n, rng in zip(("train", "val", "test"), pools, sizes, pair_rngs,
                                       strict=True)
    }
    info = {
        "params": params.model_dump(mode="json"),
        "source": "sklearn.datasets.load_digits",
        "pool_sizes": {s: len(p) for s, p in zip(("train", "val", "test"), pools, strict=True)},
    }
    return TaskSuite("multidigits", PAIR_TASKS, splits, info)
