"""``mnist1d``: MNIST-1D (Greydanus & Kobak 2024, "Scaling down deep learning with MNIST-1D", ICML) generated per
experience with its own nuisance settings, a domain-incremental stream of the ten 1-D digit templates.

The generator follows the paper's procedure (and the ``mnist1d`` package's ``make_dataset``/``transform``, whose
default settings these are): a 12-point template is padded with 36..60 zeros, stretched to 72 points, scaled by
1 ± scale_coeff/2, rolled right by 0..max_translation-1 points, its zero background replaced by Gaussian-smoothed
noise (sigma 2 points), iid noise added, sheared by a random linear ramp, and resampled to 40 points. It is
written here, vectorised with a seeded ``numpy`` generator, because the package imports matplotlib and seeds the
global random state; the samples are therefore not the package's (a different random stream), and the
standardisation differs: the package standardises its whole dataset (train and test) with one mean and std, here
every experience is standardised with the mean and std of the first experience's training signals (nothing from
later experiences or from test rows).

By default experience i pads its templates with ``padding_step`` * i .. ``padding_step`` * (i + 1) zeros before the
stretch (the paper's default is 36..60): the same digits at another time scale, narrower in every experience. Each
such experience is learnable on its own and a model of one transfers poorly to the others (an MLP, 4,000 training
signals each, 30 epochs of Adam, padding 0-12, 12-36, 36-60, 60-84: 0.60-0.87 accuracy on its own experience,
0.14-0.38 on the others), while scaling the noise up mainly makes later experiences unlearnable. ``domains`` gives
each experience's settings instead.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.continual.stream import STREAMS, Stream
from polytask.continual.streams.domains import domain_stream

# the ten 12-point templates of MNIST-1D (Greydanus & Kobak 2024, Fig. 1), before whitening
_TEMPLATES = np.array([
    [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
    [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
    [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
    [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
    [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
    [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
    [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
    [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
])


def templates() -> np.ndarray:
    """The templates whitened (zero mean, unit std), shifted to start at 0 and divided by 6, as in the paper."""
    x = _TEMPLATES - _TEMPLATES.mean(1, keepdims=True)
    x = x / x.std(1, keepdims=True)
    return (x - x[:, :1]) / 6.0


class Mnist1dSettings(BaseModel):
    """The generator's nuisance settings (the paper's defaults); an experience of ``domains`` overrides some."""

    model_config = ConfigDict(extra="forbid")
    padding: tuple[int, int] = Field((36, 60), description="zeros appended to the template: from, to (inclusive)")
    scale_coeff: float = Field(0.4, ge=0, lt=2, description="amplitude scaled by 1 + scale_coeff * (u - 1/2)")
    max_translation: int = Field(48, ge=1, description="rolled right by 0..max_translation-1 points")
    corr_noise_scale: float = Field(0.25, ge=0, description="std of the smoothed background noise")
    iid_noise_scale: float = Field(0.02, ge=0, description="std of the iid noise")
    shear_scale: float = Field(0.75, ge=0, description="slope of the linear ramp drawn from shear_scale * (u - 1/2)")
    final_seq_length: int = Field(40, ge=2, description="points of the final signal")

    @model_validator(mode="after")
    def _check(self) -> Mnist1dSettings:
        if self.padding[0] > self.padding[1] or self.padding[0] < 0:
            raise ValueError(f"padding {list(self.padding)}: need 0 <= from <= to")
        return self


def _resample(x: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of each row's first ``lengths[i]`` values, spread over [0, 1], at ``n`` points of
    [0, 1] (``np.interp`` row by row, vectorised)."""
    pos = np.linspace(0, 1, n)[None, :] * (lengths[:, None] - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), lengths[:, None] - 1)
    hi = np.minimum(lo + 1, lengths[:, None] - 1)
    frac = pos - lo
    return np.take_along_axis(x, lo, 1) * (1 - frac) + np.take_along_axis(x, hi, 1) * frac


def mnist1d_signals(labels: np.ndarray, s: Mnist1dSettings, rng: np.random.Generator) -> np.ndarray:
    """One raw (unstandardised) MNIST-1D signal per label, (N, final_seq_length) float64: the paper's transform."""
    from scipy.ndimage import gaussian_filter1d

    n, (low, high) = len(labels), s.padding
    t = templates()
    width = t.shape[1] + high  # the stretched length (template_len + padding[-1])
    padded = np.zeros((n, t.shape[1] + high))
    padded[:, :t.shape[1]] = t[labels] + 1e-8  # eps keeps the template apart from the zero background
    pad = low + np.floor(rng.random(n) * (high - low + 1)).astype(np.int64)
    x = _resample(padded, t.shape[1] + pad, width)
    x = x * (1 + s.scale_coeff * (rng.random(n)[:, None] - 0.5))
    shift = rng.integers(0, s.max_translation, n)
    x = x[np.arange(n)[:, None], (np.arange(width)[None, :] - shift[:, None]) % width]  # roll each row right
    noise = gaussian_filter1d(s.corr_noise_scale * rng.standard_normal((n, width)), 2, axis=1)
    x = np.where(x != 0, x, noise) + s.iid_noise_scale * rng.standard_normal((n, width))
    x = x - s.shear_scale * (rng.random(n)[:, None] - 0.5) * np.linspace(-0.5, 0.5, width)[None, :]
    return _resample(x, np.full(n, width), s.final_seq_length)


class Mnist1dParams(BaseModel):
    """Parameters of ``mnist1d``."""

    model_config = ConfigDict(extra="forbid")
    scenario: Literal["task", "class", "domain"] = Field("domain", description="domain (one head), task or class")
    n_experiences: int = Field(4, ge=1, le=100, description="experiences when domains is not given")
    padding_step: int = Field(20, ge=1, description="experience i appends padding_step * i .. padding_step * "
                              "(i + 1) zeros to the templates (when domains is not given)")
    domains: list[Mnist1dSettings] | None = Field(None, min_length=1, description="each experience's settings "
                                                  "(overrides of the defaults of padding, scale_coeff, "
                                                  "max_translation, corr_noise_scale, iid_noise_scale, shear_scale, "
                                                  "final_seq_length)")
    n_train_per_class: int = Field(400, ge=1, description="training signals of each digit per experience")
    n_val_per_class: int = Field(50, ge=1)
    n_test_per_class: int = Field(100, ge=1)


def _settings(params: Mnist1dParams) -> list[Mnist1dSettings]:
    if params.domains is not None:
        return list(params.domains)
    step = params.padding_step
    return [Mnist1dSettings(padding=(step * i, step * (i + 1))) for i in range(params.n_experiences)]


@STREAMS.register("mnist1d", params=Mnist1dParams,
                  summary="MNIST-1D signals, each experience at its own time scale (domain; generated, nothing read)",
                  paper="Greydanus & Kobak 2024")
def mnist1d(params: Mnist1dParams, seed: int) -> Stream:
    """Experience i: balanced train/val/test signals drawn with ``numpy.random.default_rng([seed, i])`` under its
    settings (``info['domains']``), standardised with the first experience's training mean and std."""
    sizes = {"train": params.n_train_per_class, "val": params.n_val_per_class, "test": params.n_test_per_class}
    settings = _settings(params)
    raw = []
    for i, s in enumerate(settings):
        rngs = dict(zip(sizes, np.random.default_rng([seed, i]).spawn(3), strict=True))
        splits = {}
        for split, n in sizes.items():
            labels = rngs[split].permutation(np.repeat(np.arange(10), n))
            splits[split] = (mnist1d_signals(labels, s, rngs[split]), labels)
        raw.append(splits)
    mean, std = float(raw[0]["train"][0].mean()), float(raw[0]["train"][0].std()) or 1.0
    experiences = [(f"d{i}", {split: (torch.from_numpy((x - mean) / std).float(), y, np.arange(len(y)))
                              for split, (x, y) in splits.items()}) for i, splits in enumerate(raw)]
    info = {"seed": seed, "domains": [s.model_dump(mode="json") for s in settings],
            "standardisation": {"mean": mean, "std": std, "fitted_on": "train rows of experience d0"}}
    return domain_stream("mnist1d", params.scenario, experiences, tuple(range(10)), "digit", info)
