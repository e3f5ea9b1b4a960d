"""Comparing SAEs on sparsity–fidelity curves at matched L0 (SPEC §8).

Architectures are compared on, e.g., R² against L0 over a sweep of each one's sparsity knob,
read at matched L0 by interpolation over the overlap of the L0 ranges — not at one point
each. :func:`value_at_l0` reads one curve at a given L0 (linear in log L0 between the two
neighbouring points, as L0 sweeps are spaced geometrically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["is_monotone", "matched_gap", "pareto_front", "value_at_l0"]


def value_at_l0(l0s: Sequence[float], values: Sequence[float], at: float) -> float:
    """The curve ``(l0s, values)`` read at L0 = ``at``; NaN outside the curve's L0 range.

    Points are sorted by L0; between two neighbours the value is interpolated linearly in
    log L0. L0 values must be finite and > 0, and there must be as many values as L0s.
    """
    if len(l0s) != len(values) or not l0s:
        raise ValueError(f"need as many values as L0s (at least one), got {len(l0s)} L0s and {len(values)} values")
    if not all(math.isfinite(v) and v > 0 for v in [*l0s, at]):
        raise ValueError(f"L0 values must be finite and > 0, got {list(l0s)} and at={at!r}")
    points = sorted(zip(l0s, values))
    lo, hi = points[0][0], points[-1][0]
    if not lo <= at <= hi:
        return math.nan
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            if x1 == x0:
                return (y0 + y1) / 2
            t = (math.log(at) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[0][1]  # a single point, at == its L0


def is_monotone(knobs: Sequence[float], l0s: Sequence[float], decreasing: bool = True) -> bool:
    """Whether L0 moves one way as the sparsity knob rises (strictly; points sorted by knob)."""
    if len(knobs) != len(l0s):
        raise ValueError(f"need as many L0s as knob values, got {len(knobs)} and {len(l0s)}")
    ordered = [l0 for _, l0 in sorted(zip(knobs, l0s))]
    pairs = list(zip(ordered, ordered[1:]))
    return all(b < a for a, b in pairs) if decreasing else all(b > a for a, b in pairs)


def matched_gap(a: list[tuple[float, float]], b: list[tuple[float, float]], n: int = 16) -> dict[str, float] | None:
    """Mean, min and max of (a − b) over the overlap of the two curves' L0 ranges (log-spaced L0s);
    ``None`` when the curves have fewer than two points each or do not overlap."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (points compared over the overlap), got {n!r}")
    if len(a) < 2 or len(b) < 2:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if lo >= hi:
        return None
    xs = [min(hi, max(lo, math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (n - 1)))) for i in range(n)]
    ax, ay, bx, by = [p[0] for p in a], [p[1] for p in a], [p[0] for p in b], [p[1] for p in b]
    gaps = [value_at_l0(ax, ay, x) - value_at_l0(bx, by, x) for x in xs]
    return {"l0_low": lo, "l0_high": hi, "mean_gap": sum(gaps) / n, "min_gap": min(gaps), "max_gap": max(gaps)}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats (lower or equal L0 and higher or equal metric)."""
    if not all(math.isfinite(x) and math.isfinite(y) for x, y in points):
        raise ValueError(f"points must be finite (L0, metric) pairs, got {points!r}")
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front
