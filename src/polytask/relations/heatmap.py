"""A self-contained SVG heatmap of an affinity matrix, with a colour bar (no scripts, fonts or links to fetch).

The colours always point the matrix's "good" way (for a lower-is-better matrix they are flipped, so darker red
always means "better"), and the scale is chosen from the off-diagonal values so that their range shows:

* values on both sides of 0: a diverging scale centred at 0 (blue below, white at 0, red above), set by the
  largest off-diagonal magnitude;
* values all on one side of 0 (a correlation matrix of data maps, a loss table): a sequential scale from the
  smallest to the largest off-diagonal value (pale to dark red). A diverging scale would paint such a matrix in
  one uniform dark colour.

The diagonal (a self-lookahead, a single-task loss) does not set the scale; it is drawn on it, clipped. The colour
bar beside the grid reads in the matrix's own units.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np

from polytask.io import atomic_write_text
from polytask.relations.affinity import AffinityMatrix

_NEG = (33, 102, 172)  # blue
_POS = (178, 24, 43)  # red
_PALE = (253, 235, 228)  # the light end of the sequential scale
_NAN = "#dddddd"


@dataclass(frozen=True)
class ColourScale:
    """Maps an oriented ("higher is better") value to a colour: diverging on [-limit, limit] centred at 0, or
    sequential on [lo, hi]."""

    kind: str  # "diverging" or "sequential"
    lo: float
    hi: float

    @classmethod
    def for_values(cls, good: np.ndarray) -> ColourScale:
        """The scale for these oriented off-diagonal values (see the module docstring)."""
        vals = good[np.isfinite(good)]
        if not vals.size:
            return cls("diverging", -1.0, 1.0)
        lo, hi = float(vals.min()), float(vals.max())
        if lo < 0.0 < hi or lo == hi:
            limit = max(abs(lo), abs(hi)) or 1.0
            return cls("diverging", -limit, limit)
        return cls("sequential", lo, hi)

    def rgb(self, v: float) -> tuple[int, int, int]:
        if self.kind == "diverging":
            t = max(-1.0, min(1.0, v / self.hi))
            end, a = (_POS if t >= 0 else _NEG), abs(t)
            return tuple(round(255 + (c - 255) * a) for c in end)  # type: ignore[return-value]
        a = max(0.0, min(1.0, (v - self.lo) / (self.hi - self.lo)))
        return tuple(round(p + (c - p) * a) for p, c in zip(_PALE, _POS, strict=True))  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _ink(rgb: tuple[int, int, int]) -> str:
    """Black or white text, whichever reads on this fill (relative luminance, ITU-R BT.709)."""
    lum = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255
    return "#ffffff" if lum < 0.5 else "#000000"


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "–"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
        return f"{v:.1e}"
    return f"{v:.3g}"


def _colour_bar(scale: ColourScale, x: float, y: float, height: float, sign: float) -> list[str]:
    """A vertical colour bar (best at the top) with five ticks, labelled in the matrix's own units."""
    steps, w = 32, 14
    out = ['<g class="colorbar">']
    for s in range(steps):
        v = scale.hi - (scale.hi - scale.lo) * (s + 0.5) / steps
        out.append(f'<rect x="{x}" y="{y + s * height / steps:.2f}" width="{w}" height="{height / steps + 0.5:.2f}" '
                   f'fill="{_hex(scale.rgb(v))}"/>')
    out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{height}" fill="none" stroke="#888888"/>')
    for q in range(5):
        v = scale.hi - (scale.hi - scale.lo) * q / 4
        ty = y + height * q / 4
        out.append(f'<line x1="{x + w}" y1="{ty:.1f}" x2="{x + w + 4}" y2="{ty:.1f}" stroke="#555555"/>')
        out.append(f'<text class="tick" x="{x + w + 6}" y="{ty + 4:.1f}">{escape(_fmt(sign * v))}</text>')
    out.append("</g>")
    return out


def heatmap_svg(aff: AffinityMatrix, title: str | None = None, cell: int = 44) -> str:
    """The SVG text of ``aff`` as a heatmap: rows = source task i, columns = target task j, a value in each cell,
    and a colour bar."""
    k = aff.k
    m = aff.matrix
    good = aff.oriented()
    off = ~np.eye(k, dtype=bool)
    scale = ColourScale.for_values(good[off] if k > 1 else np.diag(good))
    sign = 1.0 if aff.higher_is_better else -1.0
    labels = [escape(t) for t in aff.tasks]
    label_w = 10 + 7 * max((len(t) for t in aff.tasks), default=1)
    top = 40 + label_w
    left = label_w + 30
    title = title if title is not None else f"{aff.estimator}: effect of row task on column task"
    direction = "higher is better" if aff.higher_is_better else "lower is better (colours flipped)"
    range_txt = (f"diverging scale ±{_fmt(scale.hi)} around 0" if scale.kind == "diverging"
                 else f"sequential scale {_fmt(sign * scale.lo)} to {_fmt(sign * scale.hi)}")
    subtitle = f"source i (row) → target j (column); {direction}; {range_txt}"
    bar_x = left + k * cell + 16
    width = max(bar_x + 80, left + 8 * len(title), left + 6 * len(subtitle)) + 10
    height = top + max(k * cell, 120) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{left}" y="34" fill="#555555">{escape(subtitle)}</text>',
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
                rgb = scale.rgb(float(good[i, j]))
                fill, ink = _hex(rgb), _ink(rgb)
            out.append(
                f'<rect x="{x0}" y="{y0}" width="{cell}" height="{cell}" fill="{fill}" stroke="#ffffff">'
                f"<title>{labels[i]} → {labels[j]}: {escape(repr(v))}</title></rect>"
            )
            out.append(
                f'<text x="{x0 + cell / 2:.1f}" y="{y0 + cell / 2 + 4:.1f}" text-anchor="middle" '
                f'fill="{ink}">{escape(_fmt(v))}</text>'
            )
    out += _colour_bar(scale, bar_x, top, max(k * cell, 120), sign)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def save_heatmap(aff: AffinityMatrix, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write :func:`heatmap_svg` to ``path`` atomically."""
    return atomic_write_text(path, heatmap_svg(aff, title))
