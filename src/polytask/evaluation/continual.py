"""Metrics of a continual run from its accuracy matrix R (R[i, j]: accuracy on experience j's test set after
training on experiences 0..i).

- average accuracy: the mean of the last row (Chaudhry et al. 2018);
- BWT, backward transfer: mean over j < T-1 of R[T-1, j] - R[j, j] (Lopez-Paz & Ranzato 2017, GEM), negative when
  training later experiences lowers earlier ones;
- FWT, forward transfer: mean over j > 0 of R[j-1, j] - b[j], with b[j] the accuracy of the initial (untrained)
  model on experience j (Lopez-Paz & Ranzato 2017);
- forgetting: mean over j < T-1 of max over l < T-1 of R[l, j] - R[T-1, j] (Chaudhry et al. 2018, RWalk);
- intransigence: mean over k of a*[k] - R[k, k], a*[k] the accuracy on experience k of a reference model trained on
  all data up to k (Chaudhry et al. 2018): the cumulative strategy's R[k, k] when given.

Undefined quantities (one experience; no reference) are None.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def continual_metrics(r: Sequence[Sequence[float]], initial: Sequence[float] | None = None,
                      reference: Sequence[float] | None = None) -> dict[str, float | None]:
    """Average accuracy, BWT, FWT, forgetting and intransigence of the T x T accuracy matrix ``r``; ``initial``:
    the untrained model's accuracy per experience (for FWT); ``reference``: a*[k] per experience (intransigence)."""
    m = np.asarray(r, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or not m.size:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {m.shape}")
    t = m.shape[0]
    earlier = range(t - 1)
    out: dict[str, float | None] = {"average_accuracy": float(m[-1].mean()), "bwt": None, "fwt": None,
                                    "forgetting": None, "intransigence": None}
    if t > 1:
        out["bwt"] = float(np.mean([m[-1, j] - m[j, j] for j in earlier]))
        out["forgetting"] = float(np.mean([m[:t - 1, j].max() - m[-1, j] for j in earlier]))
        if initial is not None:
            b = np.asarray(initial, dtype=np.float64)
            out["fwt"] = float(np.mean([m[j - 1, j] - b[j] for j in range(1, t)]))
    if reference is not None:
        a = np.asarray(reference, dtype=np.float64)
        out["intransigence"] = float(np.mean(a - np.diag(m)))
    return out
