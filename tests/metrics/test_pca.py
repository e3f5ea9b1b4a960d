"""Subspace helpers (:mod:`sae_ext.metrics.pca`): PCA, projecting out, principal angles."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ext.metrics.pca import (
    PCAAccumulator,
    pca_directions,
    principal_angle_cosines,
    principal_angles_degrees,
    remove_top_pca_directions,
    top_pca_basis,
)


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


def test_streaming_pca_equals_one_tensor_and_survives_a_large_mean() -> None:
    """One PCA: batches and one tensor agree, and a mean 1e6× the spread loses nothing."""
    x, frame = _anisotropic()
    big = x + 1e6
    streamed = top_pca_basis([big[:100], big[100:]], 2)
    torch.testing.assert_close(streamed.basis, pca_directions(x, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(streamed.mean, big.mean(0), atol=1e-6, rtol=1e-12)
    with pytest.raises(ValueError, match="need at least 2 activation vectors"):
        PCAAccumulator().result(1)
