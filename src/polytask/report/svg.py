"""Tiny dependency-free SVG line charts for the self-contained HTML report."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from html import escape

Point = tuple[float, float]

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#9c755f",
    "#ff9da7",
    "#bab0ac",
)
"""Tableau 10: distinct, print-friendly series colours, cycled in order."""

_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
_GRID = "#e6e9ed"
_AXIS = "#8c959f"
_TEXT = "#1f2328"
_MUTED = "#59636e"
_MAX_DOTS = 30
_MAX_LABEL = 22
_CHAR_W = 6.6
"""Upper estimate of one character's width at font-size 11 (tick labels, legend)."""


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) spanning ``[lo, hi]``.

    A zero-width range is widened (not below zero if it was not) so that a single value or a constant
    series still gets an axis.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    lo, hi = min(lo, hi), max(lo, hi)
    if (hi - lo) / max(count, 1) < sys.float_info.min:  # zero, or too narrow for a (normal) float step
        pad = 1.0 if integer or abs(lo) * 0.1 / max(count, 1) < sys.float_info.min else abs(lo) * 0.1
        lo, hi = (lo - pad if lo - pad >= 0 or lo < 0 else 0.0), hi + pad
    raw = (hi - lo) / max(count, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = float(max(1, math.ceil(step)))
    first = math.floor(lo / step + 1e-9)
    n = max(1, math.ceil(hi / step - 1e-9) - first)
    digits = max(0, 3 - math.floor(math.log10(step)))
    return [round((first + i) * step, digits) + 0.0 for i in range(n + 1)]


def format_tick(value: float, ticks: Sequence[float]) -> str:
    """Format ``value`` with the fewest digits that tell all ``ticks`` apart: fixed decimals, or significant
    digits in scientific form (``5.25e6``, ``1.5e-5``) where the ticks reach 1e6 or stay below 1e-3."""
    span = max(abs(t) for t in ticks) if ticks else abs(value)
    if span >= 1e6 or (0 < span < 1e-3):
        for digits in range(1, 16):
            if len({scientific(t, digits) for t in ticks}) == len(set(ticks)):
                return scientific(value, digits)
        return scientific(value, 16)
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    for decimals in range(7):
        if all(abs(round(t, decimals) - t) <= step * 1e-6 for t in ticks):
            return f"{value:.{decimals}f}"
    return f"{value:.3g}"


def scientific(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits in compact scientific form: ``5.290e6``, ``-1.2e-4``, ``0``."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{max(digits - 1, 0)}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _num(value: float) -> str:
    return f"{value:.1f}"


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def line_chart(
    series: Mapping[str, Sequence[Point]],
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    *,
    width: int = 540,
    height: int = 300,
    colors: Mapping[str, str] | None = None,
    markers: Mapping[str, Point] | None = None,
) -> str:
    """An inline ``<svg>`` line chart: one line per series, nice ticks, grid, legend and title.

    ``colors`` pins a series to a colour (others take the palette in order); ``markers`` rings one
    point per series, e.g. the best-validation epoch. Non-finite points are skipped.
    """
    clean = {
        name: [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
        for name, points in series.items()
    }
    clean = {name: points for name, points in clean.items() if points}
    palette = dict(colors or {})
    for i, name in enumerate(n for n in clean if n not in palette):
        palette[name] = PALETTE[i % len(PALETTE)]

    legend_w = 34 + _CHAR_W * max((len(_short(n)) for n in clean), default=0) if clean else 0
    top, bottom = 34.0, 44.0
    right = max(16.0, legend_w + 12)
    yticks: list[float] = []
    ylabels: list[str] = []
    if clean:
        ys = [y for points in clean.values() for _, y in points]
        yticks = nice_ticks(min(ys), max(ys), 5)
        ylabels = [format_tick(t, yticks) for t in yticks]
    # room for the longest y tick label, its 6 px gap, and the rotated axis label beside it
    left = max(58.0, 28 + 6 + _CHAR_W * max((len(s) for s in ylabels), default=0))
    plot_w, plot_h = width - left - right, height - top - bottom

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" font-family="{escape(_FONT)}" font-size="11" fill="{_TEXT}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{_num(left)}" y="20" font-size="13" font-weight="600">{escape(title)}</text>',
    ]
    if not clean:
        parts.append(
            f'<rect x="{_num(left)}" y="{top}" width="{_num(plot_w)}" height="{_num(plot_h)}" fill="none" '
            f'stroke="{_GRID}"/>'
        )
        parts.append(
            f'<text x="{_num(left + plot_w / 2)}" y="{_num(top + plot_h / 2)}" text-anchor="middle" '
            f'fill="{_MUTED}">no data</text>'
        )
        parts.append("</svg>")
        return "".join(parts)

    xs = [x for points in clean.values() for x, _ in points]
    xticks = nice_ticks(min(xs), max(xs), 6, integer=all(x.is_integer() for x in xs))
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    base = top + plot_h
    for t, label in zip(yticks, ylabels, strict=True):
        parts.append(
            f'<line x1="{_num(left)}" x2="{_num(left + plot_w)}" y1="{_num(py(t))}" y2="{_num(py(t))}" '
            f'stroke="{_GRID}"/>'
        )
        parts.append(
            f'<text x="{_num(left - 6)}" y="{_num(py(t) + 3.5)}" text-anchor="end" fill="{_MUTED}">'
            f"{escape(label)}</text>"
        )
    for t in xticks:
        parts.append(f'<line x1="{_num(px(t))}" x2="{_num(px(t))}" y1="{base}" y2="{base + 4}" stroke="{_AXIS}"/>')
        parts.append(
            f'<text x="{_num(px(t))}" y="{base + 16}" text-anchor="middle" fill="{_MUTED}">'
            f"{escape(format_tick(t, xticks))}</text>"
        )
    parts.append(f'<path d="M{_num(left)} {top}V{base}H{_num(left + plot_w)}" fill="none" stroke="{_AXIS}"/>')
    if xlabel:
        parts.append(
            f'<text x="{_num(left + plot_w / 2)}" y="{height - 8}" text-anchor="middle" '
            f'fill="{_MUTED}">{escape(xlabel)}</text>'
        )
    if ylabel:
        cy = _num(top + plot_h / 2)
        parts.append(
            f'<text x="14" y="{cy}" transform="rotate(-90 14 {cy})" text-anchor="middle" '
            f'fill="{_MUTED}">{escape(ylabel)}</text>'
        )

    for name, points in clean.items():
        color = palette[name]
        coords = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in points)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2" '
            f'stroke-linejoin="round" stroke-linecap="round"/>'
        )
        if len(points) <= _MAX_DOTS:
            for x, y in points:
                parts.append(
                    f'<circle cx="{_num(px(x))}" cy="{_num(py(y))}" r="2.5" fill="{color}">'
                    f"<title>{escape(f'{name}: ({x:g}, {y:.4g})')}</title></circle>"
                )
        marker = (markers or {}).get(name)
        if marker is not None and all(math.isfinite(v) for v in marker):
            mx, my = marker
            parts.append(
                f'<circle cx="{_num(px(mx))}" cy="{_num(py(my))}" r="5.5" fill="none" '
                f'stroke="{color}" stroke-width="2"><title>{escape(f"{name}: best ({mx:g}, {my:.4g})")}'
                f"</title></circle>"
            )

    lx = width - right + 12
    for i, name in enumerate(clean):
        ly = top + 6 + i * 16
        parts.append(
            f'<line x1="{_num(lx)}" x2="{_num(lx + 18)}" y1="{ly}" y2="{ly}" stroke="{palette[name]}" '
            f'stroke-width="2.5"/>'
        )
        parts.append(
            f'<text x="{_num(lx + 24)}" y="{ly + 3.5}"><title>{escape(name)}</title>{escape(_short(name))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def scatter_chart(
    points: Mapping[str, Point],
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    *,
    better: tuple[bool, bool] = (True, True),
    front: Sequence[str] = (),
    staircase: bool = True,
    squares: Sequence[str] = (),
    width: int = 540,
    height: int = 360,
    colors: Mapping[str, str] | None = None,
) -> str:
    """An inline ``<svg>`` scatter of labelled points, one marker per point (``data-label`` names it).

    ``better`` says per axis whether higher is better; points named in ``front`` are filled (others hollow) and,
    with ``staircase``, joined by the Pareto staircase that bounds the region they dominate (shaded, drawn to the
    plot's worse corner). ``squares`` are drawn as squares (a single-task reference). Non-finite points are
    skipped."""
    clean = {n: (float(x), float(y)) for n, (x, y) in points.items() if math.isfinite(x) and math.isfinite(y)}
    palette = dict(colors or {})
    for i, name in enumerate(n for n in clean if n not in palette):
        palette[name] = PALETTE[i % len(PALETTE)]
    top, bottom, right = 34.0, 44.0, 24.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" font-family="{escape(_FONT)}" font-size="11" fill="{_TEXT}">',
        f"<title>{escape(title)}</title>",
    ]
    if not clean:
        parts.append(f'<text x="58" y="20" font-size="13" font-weight="600">{escape(title)}</text>')
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" fill="{_MUTED}">'
                     "no data</text></svg>")
        return "".join(parts)
    xs = [x for x, _ in clean.values()]
    ys = [y for _, y in clean.values()]
    xticks, yticks = nice_ticks(min(xs), max(xs), 5), nice_ticks(min(ys), max(ys), 5)
    ylabels = [format_tick(t, yticks) for t in yticks]
    left = max(58.0, 28 + 6 + _CHAR_W * max(len(s) for s in ylabels))
    plot_w, plot_h = width - left - right, height - top - bottom
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    base = top + plot_h
    parts.append(f'<text x="{_num(left)}" y="20" font-size="13" font-weight="600">{escape(title)}</text>')
    for t, label in zip(yticks, ylabels, strict=True):
        parts.append(f'<line x1="{_num(left)}" x2="{_num(left + plot_w)}" y1="{_num(py(t))}" y2="{_num(py(t))}" '
                     f'stroke="{_GRID}"/>')
        parts.append(f'<text x="{_num(left - 6)}" y="{_num(py(t) + 3.5)}" text-anchor="end" fill="{_MUTED}">'
                     f"{escape(label)}</text>")
    for t in xticks:
        parts.append(f'<line x1="{_num(px(t))}" x2="{_num(px(t))}" y1="{base}" y2="{base + 4}" stroke="{_AXIS}"/>')
        parts.append(f'<text x="{_num(px(t))}" y="{base + 16}" text-anchor="middle" fill="{_MUTED}">'
                     f"{escape(format_tick(t, xticks))}</text>")
    parts.append(f'<path d="M{_num(left)} {top}V{base}H{_num(left + plot_w)}" fill="none" stroke="{_AXIS}"/>')
    if xlabel:
        parts.append(f'<text x="{_num(left + plot_w / 2)}" y="{height - 8}" text-anchor="middle" '
                     f'fill="{_MUTED}">{escape(xlabel)}</text>')
    if ylabel:
        cy = _num(top + plot_h / 2)
        parts.append(f'<text x="14" y="{cy}" transform="rotate(-90 14 {cy})" text-anchor="middle" '
                     f'fill="{_MUTED}">{escape(ylabel)}</text>')
    on_front = [clean[n] for n in front if n in clean]
    if staircase and on_front:
        corner = (x0 if better[0] else x1, y0 if better[1] else y1)
        coords = [f"{_num(px(x))} {_num(py(y))}" for x, y in _staircase(on_front, better, corner)]
        parts.append(f'<path d="M{"L".join(coords)}Z" fill="{PALETTE[0]}" fill-opacity="0.08" stroke="none"/>')
        parts.append(f'<path d="M{"L".join(coords[:-1])}" fill="none" stroke="{_MUTED}" stroke-width="1.5" '
                     f'stroke-dasharray="4 3"/>')
    placed: list[tuple[float, float]] = []
    for name, (x, y) in clean.items():
        color = palette[name]
        fill = color if name in front else "#fff"
        tip = f"<title>{escape(f'{name}: ({x:.4g}, {y:.4g})')}</title>"
        cx, cy = px(x), py(y)
        if name in squares:
            parts.append(f'<rect data-label="{escape(name)}" x="{_num(cx - 5)}" y="{_num(cy - 5)}" width="10" '
                         f'height="10" fill="{fill}" stroke="{color}" stroke-width="2">{tip}</rect>')
        else:
            parts.append(f'<circle data-label="{escape(name)}" cx="{_num(cx)}" cy="{_num(cy)}" r="5" '
                         f'fill="{fill}" stroke="{color}" stroke-width="2">{tip}</circle>')
        anchor = "end" if cx > left + plot_w * 0.75 else "start"
        dx = -8 if anchor == "end" else 8
        ly = cy - 7
        while any(abs(ly - py_) < 12 and abs(cx - px_) < _CHAR_W * _MAX_LABEL for px_, py_ in placed):
            ly += 12  # a label near another point's label moves down a line instead of overprinting it
        placed.append((cx, ly))
        parts.append(f'<text x="{_num(cx + dx)}" y="{_num(ly)}" text-anchor="{anchor}">'
                     f"{escape(_short(name))}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _staircase(front: Sequence[Point], better: tuple[bool, bool], corner: Point) -> list[Point]:
    """The closed outline of the region ``front`` dominates, up to the plot's worse ``corner``: from the corner's
    y at the best-x point, stepping through the points in order of x (best first), out to the corner's x."""
    sx = -1.0 if better[0] else 1.0
    sy = -1.0 if better[1] else 1.0
    pts = sorted(set(front), key=lambda p: (sx * p[0], sy * p[1]))
    steps: list[Point] = []
    for x, y in pts:  # keep the 2-D front: each next point must improve y
        if not steps or sy * y < sy * steps[-1][1]:
            steps.append((x, y))
    path: list[Point] = [(steps[0][0], corner[1])]
    for i, (x, y) in enumerate(steps):
        if i:
            path.append((x, steps[i - 1][1]))
        path.append((x, y))
    path += [(corner[0], steps[-1][1]), corner]
    return path
