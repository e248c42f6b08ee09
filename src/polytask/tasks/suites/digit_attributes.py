"""``digit-attributes``: several attributes of one scikit-learn 8x8 digit (multi-target).

Every task reads the same image, so the tasks are related by construction and their relations are
known: ``digit`` determines all others, ``even``/``mod3`` and ``loop``/``ge5`` share little.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.tasks.registry import SUITES
from polytask.tasks.suites._digits import sklearn_digits, stratified_split
from polytask.tasks.task import Task, TaskData, TaskSuite

ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "digit": tuple(range(10)),
    "even": tuple(int(d % 2 == 0) for d in range(10)),
    "ge5": tuple(int(d >= 5) for d in range(10)),
    "prime": tuple(int(d in (2, 3, 5, 7)) for d in range(10)),
    "loop": tuple(int(d in (0, 6, 8, 9)) for d in range(10)),
    "mod3": tuple(d % 3 for d in range(10)),
}
"""Each attribute as a lookup table from the digit class to the attribute's class."""

TASKS = tuple(
    Task(name, "classification", max(table) + 1) for name, table in ATTRIBUTES.items()
)


class DigitAttributesParams(BaseModel):
    """Parameters of the ``digit-attributes`` suite."""

    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of images in validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of images in test")
    noise: float = Field(0.0, ge=0, le=1, description="std of Gaussian pixel noise (then clipped)")

    @model_validator(mode="after")
    def _check(self) -> DigitAttributesParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


@SUITES.register(
    "digit-attributes",
    params=DigitAttributesParams,
    summary="one 8x8 scikit-learn digit; tasks: digit, even, ge5, prime, loop, mod3",
)
def build(params: DigitAttributesParams, seed: int) -> TaskSuite:
    """Stratified train/val/test split of the 1,797 digits, all six attributes on every row."""
    images, labels = sklearn_digits()
    split_rng, noise_rng = np.random.default_rng(seed).spawn(2)
    fractions = (1 - params.val_fraction - params.test_fraction, params.val_fraction,
                 params.test_fraction)
    x = images
    if params.noise > 0:
        x = np.clip(x + params.noise * noise_rng.standard_normal(x.shape), 0, 1)
    x = torch.tensor(x[:, None], dtype=torch.float32)
    y = {name: torch.tensor(table, dtype=torch.float32)[torch.tensor(labels)]
         for name, table in ATTRIBUTES.items()}
    full = TaskData(x, y, torch.arange(len(labels), dtype=torch.int64))
    rows = stratified_split(labels, fractions, split_rng)
    splits = {s: (full.take(torch.from_numpy(r)),)
              for s, r in zip(("train", "val", "test"), rows, strict=True)}
    info = {
        "params": params.model_dump(mode="json"),
        "source": "sklearn.datasets.load_digits",
        "attributes": {name: list(table) for name, table in ATTRIBUTES.items()},
    }
    return TaskSuite("digit-attributes", TASKS, splits, info)
