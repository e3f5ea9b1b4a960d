"""Sign metrics on hand-built activations with known per-latent counts."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ext.metrics.sign import (
    accumulate_sign_counts,
    bipolar_fraction,
    bipolar_fraction_by_frequency,
    bipolar_mask,
    dead_fraction,
    positive_share,
    sign_counts,
)

N_ROWS = 40


def _column(n_pos: int, n_neg: int) -> torch.Tensor:
    """A latent's activations over N_ROWS tokens with n_pos positive and n_neg negative firings."""
    col = torch.zeros(N_ROWS)
    col[:n_pos] = torch.linspace(0.5, 2.0, n_pos)
    col[n_pos : n_pos + n_neg] = -torch.linspace(0.1, 3.0, n_neg)
    return col


# (positive, negative) firings per latent, and whether it is bipolar at the 5 % rule
LATENTS = [
    (6, 4, True),  # 40 % negative
    (19, 1, True),  # exactly 5 % negative: counts (inclusive)
    (10, 0, False),  # always positive
    (0, 0, False),  # dead
    (0, 3, False),  # always negative
    (20, 1, False),  # 1/21 = 4.8 % negative: below the 5 % rule
    (1, 19, True),  # exactly 5 % positive
]


@pytest.fixture
def acts() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cols = [_column(p, n) for p, n, _ in LATENTS]
    # shuffle the rows so counts do not depend on order
    return torch.stack(cols, dim=1)[torch.randperm(N_ROWS, generator=g)]


def test_sign_counts_exact(acts: torch.Tensor) -> None:
    pos, neg = sign_counts(acts)
    assert pos.tolist() == [p for p, _, _ in LATENTS]
    assert neg.tolist() == [n for _, n, _ in LATENTS]


def test_counts_accept_leading_dims(acts: torch.Tensor) -> None:
    pos, neg = sign_counts(acts.reshape(4, 10, len(LATENTS)))
    assert pos.tolist() == [p for p, _, _ in LATENTS]
    assert neg.tolist() == [n for _, n, _ in LATENTS]


def test_streaming_accumulation_matches_one_batch(acts: torch.Tensor) -> None:
    counts = None
    for chunk in acts.split(7):
        counts = accumulate_sign_counts(chunk, counts)
    assert counts is not None
    whole = sign_counts(acts)
    assert torch.equal(counts[0], whole[0]) and torch.equal(counts[1], whole[1])
    assert bipolar_fraction(*counts) == bipolar_fraction(acts)


def test_positive_share(acts: torch.Tensor) -> None:
    share = positive_share(acts)
    expected = [p / (p + n) if p + n else math.nan for p, n, _ in LATENTS]
    for got, want in zip(share.tolist(), expected):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want)


def test_bipolar_mask_and_fraction(acts: torch.Tensor) -> None:
    assert bipolar_mask(acts).tolist() == [b for _, _, b in LATENTS]
    n_alive = sum(1 for p, n, _ in LATENTS if p + n)
    n_bipolar = sum(1 for *_, b in LATENTS if b)
    assert bipolar_fraction(acts).item() == pytest.approx(n_bipolar / n_alive)  # 3 / 6
    # from counts, the same
    assert bipolar_fraction(*sign_counts(acts)).item() == pytest.approx(0.5)


def test_min_share_is_a_parameter(acts: torch.Tensor) -> None:
    # at 30 % only latent 0 (40 % negative) is bipolar
    assert bipolar_mask(acts, min_share=0.3).tolist() == [
        True,
        False,
        False,
        False,
        False,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="min_share"):
        bipolar_fraction(acts, min_share=0.6)


def test_bipolar_fraction_by_frequency() -> None:
    # latents 0-1 fire most and are bipolar, 2-3 fire less and are one-sided, 4 is dead
    pos = torch.tensor([50, 40, 30, 20, 0])
    neg = torch.tensor([50, 40, 0, 0, 0])
    by_bin = bipolar_fraction_by_frequency(pos, neg, n_bins=2)
    assert by_bin.tolist() == [1.0, 0.0]
    # reversed frequencies put the bipolar latents last
    assert bipolar_fraction_by_frequency(torch.tensor([5, 6, 70, 80]), torch.tensor([5, 6, 0, 0]), n_bins=2).tolist() == [0.0, 1.0]
    # its bins average back to the overall fraction when they are equal
    assert by_bin.mean().item() == pytest.approx(bipolar_fraction(pos, neg).item())
    assert torch.isnan(bipolar_fraction_by_frequency(pos, neg, n_bins=6)[-1])
    with pytest.raises(ValueError, match="n_bins must be a positive int, got 0"):
        bipolar_fraction_by_frequency(pos, neg, n_bins=0)


def test_dead_fraction(acts: torch.Tensor) -> None:
    assert dead_fraction(acts).item() == pytest.approx(1 / len(LATENTS))
    assert dead_fraction(torch.zeros(3, 5)).item() == 1.0


def test_no_alive_latent_gives_nan_bipolar_fraction() -> None:
    assert math.isnan(bipolar_fraction(torch.zeros(3, 5)).item())


def test_count_validation() -> None:
    with pytest.raises(ValueError, match="same shape"):
        bipolar_fraction(torch.ones(3, dtype=torch.long), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        positive_share(torch.tensor([1, -1]), torch.tensor([0, 0]))
