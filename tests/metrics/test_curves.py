"""Reading sparsity–fidelity curves at matched L0 (``sae_ext.metrics.curves``)."""

from __future__ import annotations

import math

import pytest

from sae_ext.metrics.curves import is_monotone, value_at_l0


def test_value_at_l0_interpolates_linearly_in_log_l0() -> None:
    l0s, r2s = [32.0, 8.0, 2.0], [0.9, 0.7, 0.5]  # any order
    assert value_at_l0(l0s, r2s, 8.0) == pytest.approx(0.7)
    assert value_at_l0(l0s, r2s, 4.0) == pytest.approx(0.6)  # halfway in log between 2 and 8
    assert value_at_l0(l0s, r2s, 16.0) == pytest.approx(0.8)
    assert value_at_l0(l0s, r2s, 2.0) == pytest.approx(0.5) and value_at_l0(l0s, r2s, 32.0) == pytest.approx(0.9)
    assert math.isnan(value_at_l0(l0s, r2s, 1.9)) and math.isnan(value_at_l0(l0s, r2s, 40.0))
    assert value_at_l0([5.0], [0.3], 5.0) == 0.3 and math.isnan(value_at_l0([5.0], [0.3], 6.0))


def test_value_at_l0_rejects_bad_curves() -> None:
    with pytest.raises(ValueError, match="as many values as L0s"):
        value_at_l0([1.0, 2.0], [0.5], 1.5)
    with pytest.raises(ValueError, match="finite and > 0"):
        value_at_l0([0.0, 2.0], [0.1, 0.5], 1.0)
    with pytest.raises(ValueError, match="finite and > 0"):
        value_at_l0([1.0, 2.0], [0.1, 0.5], math.nan)


def test_is_monotone_orders_by_knob() -> None:
    assert is_monotone([3.0, 0.1, 1.0], [2.4, 18.0, 2.8])
    assert not is_monotone([0.1, 0.3, 1.0], [18.0, 18.0, 2.8])  # strict
    assert is_monotone([1, 2, 4], [8.0, 16.0, 32.0], decreasing=False)
    with pytest.raises(ValueError, match="as many L0s as knob values"):
        is_monotone([1.0], [1.0, 2.0])
