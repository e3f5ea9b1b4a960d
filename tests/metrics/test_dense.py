"""Dense-latent counts and PCA-subspace helpers, on hand-built inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ext.metrics.dense import (
    dense_count,
    dense_fraction,
    dense_mask,
    firing_counts,
    firing_rates,
    pca_directions,
    principal_angle_cosines,
    principal_angles_degrees,
    remove_top_pca_directions,
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


def _anisotropic(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Data with variances 25, 9, 1, 0.01 along a known rotated frame, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    frame, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1.0, 0.1])
    return z @ frame.T + 7.0, frame


def test_pca_directions_recover_known_frame() -> None:
    x, frame = _anisotropic()
    b = pca_directions(x, 2)
    assert b.shape == (4, 2)
    torch.testing.assert_close(b.T @ b, torch.eye(2, dtype=b.dtype), atol=1e-10, rtol=0)
    # sorted by variance: column i is ± frame column i
    for i in range(2):
        assert abs(float(b[:, i] @ frame[:, i])) > 0.999
    # deterministic sign: the largest-magnitude entry of each column is positive
    assert (b[b.abs().argmax(0), torch.arange(2)] > 0).all()
    # the offset (mean) does not matter: PCA is of the centred data
    torch.testing.assert_close(pca_directions(x - 7.0, 2), b)


def test_pca_directions_more_directions_than_rows() -> None:
    x = torch.randn(3, 6, dtype=torch.float64)
    b = pca_directions(x, 5)
    torch.testing.assert_close(b.T @ b, torch.eye(5, dtype=b.dtype), atol=1e-10, rtol=0)


@pytest.mark.parametrize("r", [0, 5, -1, 1.5, True])
def test_pca_directions_rank_errors(r) -> None:
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        pca_directions(torch.randn(10, 4), r)


def test_pca_directions_shape_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pca_directions(torch.randn(10), 1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        pca_directions(torch.randn(1, 4), 1)


def test_remove_top_pca_directions_projects_out_exactly() -> None:
    basis = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # span of e0, e2 in R^3
    x = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 5.0, 6.0]])
    out = remove_top_pca_directions(x, basis)
    assert out.tolist() == [[0.0, 2.0, 0.0], [0.0, 5.0, 0.0]]
    # mean-ablation: the removed components are replaced by the centre's
    centre = torch.tensor([10.0, 20.0, 30.0])
    out_c = remove_top_pca_directions(x, basis, center=centre)
    assert out_c.tolist() == [[10.0, 2.0, 30.0], [10.0, 5.0, 30.0]]
    with pytest.raises(ValueError, match=r"\[3, r\]"):
        remove_top_pca_directions(x, torch.eye(2))


def test_remove_top_pca_directions_leaves_the_rest_of_the_variance() -> None:
    x, _ = _anisotropic()
    out = remove_top_pca_directions(x, pca_directions(x, 2), center=x.mean(0))
    var = (out - out.mean(0)).pow(2).sum(0).sum() / (x.shape[0] - 1)
    assert float(var) == pytest.approx(1.0 + 0.01, rel=0.1)


def test_principal_angles() -> None:
    e = torch.eye(3)
    # same span, different basis
    a = e[:, :2]
    b = torch.stack([e[:, 0] + e[:, 1], e[:, 0] - 2 * e[:, 1]], dim=1)
    torch.testing.assert_close(principal_angle_cosines(a, b), torch.ones(2, dtype=torch.float64))
    # one shared direction, one at 45 degrees, one orthogonal
    c = torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / math.sqrt(2)], dim=1)
    torch.testing.assert_close(
        principal_angles_degrees(a, c), torch.tensor([0.0, 45.0], dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        principal_angles_degrees(e[:, :1], e[:, 2:]), torch.tensor([90.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="same d"):
        principal_angle_cosines(torch.eye(3), torch.eye(4))
