"""``recommender``: a generated, seeded recommender-style table with related tasks and really missing labels.

Each row is one impression: four categorical features (user ``segment``, item ``category``, ``device``, ``hour`` of
day) and ``numeric`` numeric features, with three tasks in the shape of click-through / conversion / dwell-time
models (as in the ESMM setting of Ma et al., SIGIR 2018, "Entire Space Multi-Task Model", where conversion is
observed only after a click):

- ``click`` (binary): whether the impression was clicked;
- ``conversion`` (binary): whether the click converted, observed only where ``click`` is 1 (NaN elsewhere: the label
  does not exist, it is not hidden);
- ``dwell`` (regression): the log-normal dwell time after a click, observed only where ``click`` is 1; the target is
  its logarithm (``dwell: log``, default) or the seconds themselves (``dwell: seconds``), standardised on the training
  rows for the loss, metrics in the target's units.

The generator (all draws from the seed; the design is ours, not a published one). Feature values: segment and
category with Zipf-like popularity (weights 1/rank^0.8 and 1/rank, ranks shuffled), device desktop/mobile/tablet with
probabilities 0.35/0.55/0.10, hour with a daily profile 1 + 0.8 cos(2 pi (h - 20) / 24), numeric features N(0, 1).
Four latent factors, each a sum of N(0, 1) random effects standardised to mean 0 and variance 1 over the rows:

- shared s (user-item affinity): segment + category + a rank-4 segment x category interaction + numeric;
- click's own c: device + hour + numeric;
- conversion's own v: category (price level) + segment (purchasing power) + numeric;
- dwell's own w: device + category + numeric.

Then, with r = ``shared`` (the share of conversion's and dwell's latent variance that is the click's shared factor)
and sigma(z) = 1 / (1 + e^-z):
click ~ Bernoulli(sigma(b_c + k (sqrt(1/2) s + sqrt(1/2) c))); where clicked, conversion ~ Bernoulli(sigma(b_v +
k (sqrt(r) s + sqrt(1 - r) v))) and log dwell = log(30) + 0.8 (sqrt(r) s + sqrt(1 - r) w) + ``dwell_noise`` eps; k =
``strength``. The intercepts b_c, b_v are set by bisection so that the mean click probability over all rows is
``click_rate`` and the mean conversion probability over the clicked rows is ``conversion_rate`` (the realised rates
differ by sampling noise; ``info["rates"]`` holds them per split). So the tasks are related through s (r = 1:
conversion and dwell follow the click's affinity; r = 0: only through who clicks) but never identical.

Inputs: column j of x is [segment, category, device, hour, num0, ...]; a categorical column holds its code (1 + the
value's position among the sorted value names ``s00``..., ``c00``..., ``desktop``/``mobile``/``tablet``, ``h00``...;
0 is the unknown code, never generated), and ``TaskSuite.categorical`` gives each column's number of codes, so a
model embeds them (:class:`polytask.models.embedding.Embedded`); ``info`` holds the feature names and categories as
the ``table`` suite does, so ``polytask predict`` reads a table of such rows. Numeric features are not rescaled.
``click`` and ``conversion`` are scored by ROC AUC (accuracy says little at a 15 % rate), ``dwell`` by MSE and MAE.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from polytask.tasks.registry import SUITES
from polytask.tasks.task import AUC, SPLITS, Standardizer, Task, TaskData, TaskSuite

DEVICES = ("desktop", "mobile", "tablet")
DEVICE_P = (0.35, 0.55, 0.10)
HOURS = 24
RANK = 4
DWELL_MEDIAN_S = 30.0
DWELL_SCALE = 0.8


class RecommenderParams(BaseModel):
    """Parameters of the ``recommender`` suite."""

    model_config = ConfigDict(extra="forbid")

    n_train: int = Field(20000, ge=10, description="number of training rows (impressions)")
    n_val: int = Field(4000, ge=10, description="number of validation rows")
    n_test: int = Field(4000, ge=10, description="number of test rows")
    segments: int = Field(20, ge=2, le=100_000, description="user segments (a categorical feature)")
    categories: int = Field(30, ge=2, le=100_000, description="item categories (a categorical feature)")
    numeric: int = Field(8, ge=1, le=1000, description="numeric features")
    click_rate: float = Field(0.15, gt=0, lt=1, description="mean click probability over all rows")
    conversion_rate: float = Field(0.2, gt=0, lt=1, description="mean conversion probability over the clicked rows")
    shared: float = Field(0.5, ge=0, le=1, description="share of conversion's and dwell's latent variance that is "
                          "the click's shared affinity factor (1: same factor, 0: own factors only)")
    strength: float = Field(1.5, ge=0, le=20, description="std of the click and conversion logits around their "
                            "intercepts (higher: easier tasks)")
    dwell_noise: float = Field(0.5, ge=0, le=10, description="std of the log dwell time's noise")
    dwell: Literal["log", "seconds"] = Field("log", description="the dwell target: log seconds or seconds")




def _popularity(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities of ``n`` values with weights 1 / rank^exponent, the ranks shuffled among the values."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    p = weights[rng.permutation(n)]
    return p / p.sum()


def _standard(z: np.ndarray) -> np.ndarray:
    """``z`` shifted and scaled to mean 0 and variance 1 (unchanged when constant)."""
    std = z.std()
    return (z - z.mean()) / (std if std > 0 else 1.0)


def _intercept(z: np.ndarray, rate: float) -> float:
    """The b with mean(sigma(b + z)) = ``rate`` (bisection; the mean is increasing in b)."""
    lo, hi = -50.0 - float(z.max()), 50.0 - float(z.min())
    for _ in range(100):
        mid = (lo + hi) / 2
        if (1.0 / (1.0 + np.exp(-(mid + z)))).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _names(prefix: str, n: int) -> list[str]:
    """``n`` value names that sort in index order: ``prefix`` and a zero-padded index."""
    width = len(str(n - 1))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _factors(params: RecommenderParams, seg: np.ndarray, cat: np.ndarray, dev: np.ndarray, hour: np.ndarray,
             num: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four standardised latent factors of the rows (see the module docstring)."""
    def effect(n: int) -> np.ndarray:
        return rng.standard_normal(n)

    def daily() -> np.ndarray:
        return np.cos(2 * np.pi * hour / HOURS + rng.uniform(0, 2 * np.pi))

    def linear() -> np.ndarray:
        return num @ (rng.standard_normal(params.numeric) / np.sqrt(params.numeric))

    u = rng.standard_normal((params.segments, RANK)) / np.sqrt(RANK)
    v = rng.standard_normal((params.categories, RANK))
    shared = effect(params.segments)[seg] + effect(params.categories)[cat] + (u[seg] * v[cat]).sum(1) + linear()
    click = effect(len(DEVICES))[dev] + daily() + linear()
    conversion = effect(params.categories)[cat] + effect(params.segments)[seg] + linear()
    dwell = effect(len(DEVICES))[dev] + effect(params.categories)[cat] + linear()
    return {k: _standard(z) for k, z in
            {"shared": shared, "click": click, "conversion": conversion, "dwell": dwell}.items()}


@SUITES.register(
    "recommender",
    params=RecommenderParams,
    summary="generated impressions: click, conversion (labelled only where clicked) and dwell time over categorical "
            "and numeric features",
)
def build(params: RecommenderParams, seed: int) -> TaskSuite:
    """The rows, their three tasks and the categorical columns' codes (see the module docstring)."""
    value_rng, row_rng, latent_rng, outcome_rng = np.random.default_rng(seed).spawn(4)
    sizes = {"train": params.n_train, "val": params.n_val, "test": params.n_test}
    n = sum(sizes.values())
    hour_p = 1 + 0.8 * np.cos(2 * np.pi * (np.arange(HOURS) - 20) / HOURS)
    seg = row_rng.choice(params.segments, n, p=_popularity(params.segments, 0.8, value_rng))
    cat = row_rng.choice(params.categories, n, p=_popularity(params.categories, 1.0, value_rng))
    dev = row_rng.choice(len(DEVICES), n, p=DEVICE_P)
    hour = row_rng.choice(HOURS, n, p=hour_p / hour_p.sum())
    num = row_rng.standard_normal((n, params.numeric))
    f = _factors(params, seg, cat, dev, hour, num, latent_rng)

    r, k = params.shared, params.strength
    click_z = k * np.sqrt(0.5) * (f["shared"] + f["click"])
    click_b = _intercept(click_z, params.click_rate)
    click_p = 1 / (1 + np.exp(-(click_b + click_z)))
    click = outcome_rng.random(n) < click_p
    conv_z = k * (np.sqrt(r) * f["shared"] + np.sqrt(1 - r) * f["conversion"])
    conv_b = _intercept(conv_z[click], params.conversion_rate) if click.any() else 0.0
    conversion = outcome_rng.random(n) < 1 / (1 + np.exp(-(conv_b + conv_z)))
    log_dwell = (np.log(DWELL_MEDIAN_S) + DWELL_SCALE * (np.sqrt(r) * f["shared"] + np.sqrt(1 - r) * f["dwell"])
                 + params.dwell_noise * outcome_rng.standard_normal(n))
    dwell = log_dwell if params.dwell == "log" else np.exp(log_dwell)

    targets = {"click": click.astype(np.float64),
               "conversion": np.where(click, conversion.astype(np.float64), np.nan),
               "dwell": np.where(click, dwell, np.nan)}
    x = np.concatenate([np.stack([seg, cat, dev, hour], 1) + 1.0, num], 1)  # codes 1..K: 0 is unknown
    train = slice(0, params.n_train)
    scale = Standardizer.fit(torch.from_numpy(targets["dwell"][train]))
    y = {name: torch.from_numpy(t) for name, t in targets.items()}
    y["dwell"] = scale.encode(y["dwell"])
    splits: dict[str, tuple[TaskData, ...]] = {}
    rates: dict[str, dict[str, float]] = {}
    start = 0
    for split in SPLITS:
        rows = slice(start, start + sizes[split])
        splits[split] = (TaskData(torch.from_numpy(x[rows].astype(np.float32)),
                                  {name: t[rows].float() for name, t in y.items()},
                                  torch.arange(start, start + sizes[split], dtype=torch.int64)),)
        clicked = click[rows]
        rates[split] = {"click": float(clicked.mean()),
                        "conversion": float(conversion[rows][clicked].mean()) if clicked.any() else float("nan")}
        start += sizes[split]
    tasks = (Task("click", "classification", 2, (AUC,), classes=(0, 1)),
             Task("conversion", "classification", 2, (AUC,), classes=(0, 1)),
             Task("dwell", "regression", 1, scale=scale))
    features = ["segment", "category", "device", "hour", *(f"num{i}" for i in range(params.numeric))]
    categories = {"segment": _names("s", params.segments), "category": _names("c", params.categories),
                  "device": list(DEVICES), "hour": _names("h", HOURS)}
    info = {"params": params.model_dump(mode="json"), "features": features, "categories": categories,
            "rates": rates, "intercepts": {"click": click_b, "conversion": conv_b}}
    categorical = {j: len(values) + 1 for j, values in enumerate(categories.values())}
    return TaskSuite("recommender", tasks, splits, info, None, categorical)
