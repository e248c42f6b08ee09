"""A self-contained SVG heatmap of an affinity matrix (no scripts, fonts or links to fetch).

Colours are a diverging scale centred at 0 (blue below, red above, white at 0) in the matrix's "good" direction:
for a lower-is-better matrix the colours are flipped so red always means "helps". The scale is set by the largest
off-diagonal magnitude, so a large diagonal (self-lookahead, single-task loss) does not wash out the pairs; the
diagonal is drawn on the same scale and clipped.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path

import numpy as np

from polytask.io import atomic_write_text
from polytask.relations.affinity import AffinityMatrix

_NEG = (33, 102, 172)  # blue
_POS = (178, 24, 43)  # red
_NAN = "#dddddd"


def _mix(t: float) -> tuple[int, int, int]:
    """RGB for t in [-1, 1]: white at 0, blue at -1, red at +1."""
    end = _POS if t >= 0 else _NEG
    a = min(abs(t), 1.0)
    return tuple(round(255 + (c - 255) * a) for c in end)  # type: ignore[return-value]


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "–"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
        return f"{v:.1e}"
    return f"{v:.3g}"


def heatmap_svg(aff: AffinityMatrix, title: str | None = None, cell: int = 44) -> str:
    """The SVG text of ``aff`` as a heatmap: rows = source task i, columns = target task j, a value in each cell."""
    k = aff.k
    m = aff.matrix
    good = aff.oriented()
    off = ~np.eye(k, dtype=bool)
    vals = good[off & np.isfinite(good)]
    scale = float(np.abs(vals).max()) if vals.size else 0.0
    if scale == 0.0:
        diag = np.abs(np.diag(good))
        scale = float(np.nanmax(diag)) if np.isfinite(diag).any() else 1.0
        scale = scale or 1.0
    labels = [escape(t) for t in aff.tasks]
    label_w = 10 + 7 * max((len(t) for t in aff.tasks), default=1)
    top = 40 + label_w
    left = label_w + 30
    width = left + k * cell + 20
    height = top + k * cell + 40
    title = title if title is not None else f"{aff.estimator}: effect of row task on column task"
    direction = "higher is better" if aff.higher_is_better else "lower is better (colours flipped)"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{left}" y="34" fill="#555555">source i (row) → target j (column); {escape(direction)}; '
        f"colour scale ±{escape(_fmt(scale))}</text>",
    ]
    for j, lab in enumerate(labels):
        x = left + j * cell + cell / 2
        out.append(f'<text transform="translate({x:.1f},{top - 6}) rotate(-60)" text-anchor="start">{lab}</text>')
    for i, lab in enumerate(labels):
        y = top + i * cell + cell / 2 + 4
        out.append(f'<text x="{left - 6}" y="{y:.1f}" text-anchor="end">{lab}</text>')
        for j in range(k):
            v = float(m[i, j])
            x0, y0 = left + j * cell, top + i * cell
            if math.isnan(v):
                fill, ink = _NAN, "#555555"
            else:
                rgb = _mix(float(good[i, j]) / scale)
                fill = "#{:02x}{:02x}{:02x}".format(*rgb)
                ink = "#ffffff" if abs(float(good[i, j])) / scale > 0.6 else "#000000"
            out.append(
                f'<rect x="{x0}" y="{y0}" width="{cell}" height="{cell}" fill="{fill}" stroke="#ffffff">'
                f"<title>{labels[i]} → {labels[j]}: {escape(repr(v))}</title></rect>"
            )
            out.append(
                f'<text x="{x0 + cell / 2:.1f}" y="{y0 + cell / 2 + 4:.1f}" text-anchor="middle" '
                f'fill="{ink}">{escape(_fmt(v))}</text>'
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def save_heatmap(aff: AffinityMatrix, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write :func:`heatmap_svg` to ``path`` atomically."""
    return atomic_write_text(path, heatmap_svg(aff, title))
