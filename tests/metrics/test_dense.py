"""Dense-latent counts on hand-built inputs with known answers."""

from __future__ import annotations

import pytest
import torch

from sae_ext.metrics.dense import (
    dense_count,
    dense_fraction,
    dense_mask,
    firing_counts,
    firing_rates,
)


def test_firing_counts_exact() -> None:
    # 4 tokens x 3 latents; latent 0 fires on 3 tokens, latent 1 on none, latent 2 on 1 (negative counts)
    acts = torch.tensor(
        [[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
    )
    assert firing_counts(acts).tolist() == [3.0, 0.0, 1.0]
    # leading dims are all tokens
    assert firing_counts(acts.reshape(2, 2, 3)).tolist() == [3.0, 0.0, 1.0]
    assert firing_counts(acts.to_sparse()).tolist() == [3.0, 0.0, 1.0]
    assert firing_counts(acts.reshape(2, 2, 3), mostly_zero=True).tolist() == [3.0, 0.0, 1.0]
    assert firing_counts(acts.to_sparse(), mostly_zero=True).tolist() == [3.0, 0.0, 1.0]


def test_firing_counts_paths_agree_on_random_codes() -> None:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(300, 50, generator=g) * (torch.rand(300, 50, generator=g) < 0.1)
    expected = (acts != 0).sum(0).double()
    torch.testing.assert_close(firing_counts(acts), expected)
    torch.testing.assert_close(firing_counts(acts, mostly_zero=True), expected)


def test_dense_fraction_uses_strict_ten_percent() -> None:
    # 100 tokens: rates 0.05, 0.10 (exactly at the threshold: not dense), 0.11, 0.5, 1.0
    counts = torch.tensor([5.0, 10.0, 11.0, 50.0, 100.0])
    assert dense_mask(counts, 100).tolist() == [False, False, True, True, True]
    assert dense_count(counts, 100) == 3
    assert dense_fraction(counts, 100) == pytest.approx(3 / 5)
    assert firing_rates(counts, 100).tolist() == pytest.approx([0.05, 0.1, 0.11, 0.5, 1.0])


def test_dense_fraction_other_threshold_and_zero() -> None:
    counts = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert dense_count(counts, 10, threshold=0.15) == 2
    assert dense_fraction(counts, 10, threshold=0.0) == pytest.approx(0.75)
    assert dense_fraction(torch.zeros(7), 3) == 0.0


@pytest.mark.parametrize(
    ("counts", "n", "threshold", "match"),
    [
        (torch.tensor([1.0]), 0, 0.1, "n_tokens"),
        (torch.tensor([1.0]), float("nan"), 0.1, "n_tokens"),
        (torch.tensor([11.0]), 10, 0.1, r"\[0, n_tokens\]"),
        (torch.tensor([-1.0]), 10, 0.1, r"\[0, n_tokens\]"),
        (torch.ones(2, 2), 10, 0.1, "1-D"),
        (torch.tensor([1.0]), 10, 1.0, r"\[0, 1\)"),
        (torch.tensor([1.0]), 10, -0.1, r"\[0, 1\)"),
    ],
)
def test_dense_fraction_errors(counts, n, threshold, match) -> None:
    with pytest.raises(ValueError, match=match):
        dense_fraction(counts, n, threshold)


def test_dense_fraction_empty_is_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        dense_fraction(torch.zeros(0), 10)
