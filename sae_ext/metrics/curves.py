"""Comparing SAEs on sparsity–fidelity curves at matched L0 (SPEC §8).

Architectures are compared on, e.g., R² against L0 over a sweep of each one's sparsity knob,
read at matched L0 by interpolation over the overlap of the L0 ranges — not at one point
each. :func:`value_at_l0` reads one curve at a given L0 (linear in log L0 between the two
neighbouring points, as L0 sweeps are spaced geometrically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["is_monotone", "value_at_l0"]


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
