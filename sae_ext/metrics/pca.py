"""Subspaces of activations: PCA (one implementation, streaming), projecting a subspace out,
and principal angles (SPEC §2, §6).

The scaffolded-SAE paper compares zeroing the learned rank-r scaffold with removing the top-r
principal directions of the activations; its PCA initialisation uses the same directions.
:class:`PCAAccumulator` is the only PCA here: :func:`pca_directions` (one tensor) and
:func:`top_pca_basis` (a stream of batches) both read it. Everything is float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "PCAAccumulator",
    "PCABasis",
    "orthonormal_basis",
    "pca_directions",
    "principal_angle_cosines",
    "principal_angles_degrees",
    "remove_top_pca_directions",
    "top_pca_basis",
]


@dataclass
class PCABasis:
    """Top principal directions of a set of activations."""

    basis: torch.Tensor
    """float64 ``[d, r]``, orthonormal columns, by decreasing variance; each column's
    largest-magnitude entry is positive (deterministic signs)."""
    mean: torch.Tensor
    """float64 ``[d]`` (zeros when not centred)."""
    explained_variance_ratio: torch.Tensor
    """float64 ``[r]``: each direction's share of the total variance."""


class PCAAccumulator:
    """One-pass float64 second-moment accumulator (``O(d²)`` memory).

    Moments are taken about the first batch's mean (a shift that leaves the covariance exact
    and avoids cancellation when the mean is large against the spread).
    """

    def __init__(self) -> None:
        self.yy: torch.Tensor | None = None
        self.y_sum: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        """Add activations ``[..., d]`` (finite floats)."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or not torch.is_floating_point(x):
            raise ValueError("activations must be a float tensor [..., d]")
        bad = int((~torch.isfinite(x)).sum().item())
        if bad:
            raise ValueError(f"activations contain {bad} non-finite value(s) (NaN/Inf)")
        x64 = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        if x64.shape[0] == 0:
            return
        if self.yy is None:
            d = x64.shape[1]
            self.shift = x64.mean(0)
            self.yy = torch.zeros(d, d, dtype=torch.float64)
            self.y_sum = torch.zeros(d, dtype=torch.float64)
        elif x64.shape[1] != self.yy.shape[0]:
            raise ValueError(
                f"activations have width {x64.shape[1]}, earlier batches {self.yy.shape[0]}"
            )
        assert self.y_sum is not None and self.shift is not None
        y = x64 - self.shift
        self.yy += y.T @ y
        self.y_sum += y.sum(0)
        self.n += y.shape[0]

    def result(self, r: int, *, center: bool = True) -> PCABasis:
        """Top-``r`` directions of the covariance (of the second moment with ``center=False``)."""
        if self.yy is None or self.y_sum is None or self.shift is None or self.n < 2:
            raise ValueError(f"need at least 2 activation vectors for PCA, got {self.n}")
        d = self.yy.shape[0]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d:
            raise ValueError(f"r must be an integer in [1, d] = [1, {d}]; got {r!r}")
        n, s, m_y = self.n, self.shift, self.y_sum / self.n
        if center:
            mean = s + m_y
            cov = self.yy / n - torch.outer(m_y, m_y)
        else:  # E[x xᵀ] with x = y + s
            mean = torch.zeros_like(s)
            cov = (self.yy / n + torch.outer(m_y, s) + torch.outer(s, m_y) + torch.outer(s, s))
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        top = evecs[:, :r]
        idx = top.abs().argmax(0)
        signs = torch.sign(top[idx, torch.arange(r)])
        signs[signs == 0] = 1.0
        total = evals.sum()
        ratio = evals[:r] / total if total > 0 else torch.zeros(r, dtype=torch.float64)
        return PCABasis(basis=(top * signs).contiguous(), mean=mean, explained_variance_ratio=ratio)


def top_pca_basis(
    activations: torch.Tensor | Iterable[torch.Tensor], r: int, *, center: bool = True
) -> PCABasis:
    """Top-``r`` PCA directions of activations ``[..., d]`` (a tensor or an iterable of batches)."""
    acc = PCAAccumulator()
    for x in [activations] if isinstance(activations, torch.Tensor) else activations:
        acc.update(x)
    return acc.result(r, center=center)


def pca_directions(acts: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` principal directions of ``acts`` ``[n, d]`` (centred), as ``[d, r]`` columns in
    the dtype of ``acts``: orthonormal, by decreasing variance, deterministic signs (each
    column's largest-magnitude entry positive). ``r`` may exceed ``n``."""
    if acts.dim() != 2:
        raise ValueError(f"acts must be 2-D [n, d]; got shape {tuple(acts.shape)}")
    n, d = acts.shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d:
        raise ValueError(f"r must be an integer in [1, d] = [1, {d}]; got {r!r}")
    if n < 2:
        raise ValueError(f"need at least 2 rows of acts to centre them; got n = {n}")
    return top_pca_basis(acts, r).basis.to(device=acts.device, dtype=acts.dtype)


def orthonormal_basis(basis: torch.Tensor, d: int) -> torch.Tensor:
    """An orthonormal float64 basis ``[d, r]`` (QR) of the columns of ``basis``; ``ValueError``
    for a wrong shape, non-finite values or linearly dependent columns."""
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2:
        raise ValueError(
            f"basis must be a 2-D tensor [d, r], got {getattr(basis, 'shape', basis)!r}"
        )
    if basis.shape[0] != d:
        raise ValueError(
            f"basis has shape {tuple(basis.shape)} but the activation width is {d}; "
            f"expected [{d}, r]"
        )
    r = basis.shape[1]
    if not 1 <= r <= d:
        raise ValueError(f"basis rank r = {r} must lie in [1, {d}]")
    bad = int((~torch.isfinite(basis)).sum().item())
    if bad:
        raise ValueError(f"basis contains {bad} non-finite value(s) (NaN/Inf)")
    q, rr = torch.linalg.qr(basis.detach().double())
    diag = rr.diagonal().abs()
    if bool((diag <= 1e-10 * diag.max().clamp_min(1e-300)).any()):
        raise ValueError(f"basis columns are linearly dependent (rank < {r})")
    return q


def remove_top_pca_directions(
    acts: torch.Tensor, basis: torch.Tensor, center: torch.Tensor | None = None
) -> torch.Tensor:
    """Remove the span of ``basis`` ``[d, r]`` (orthonormal columns) from ``acts`` ``[..., d]``.

    ``center=None`` projects out: ``x − (x B) Bᵀ``. With ``center`` = the activation mean,
    the component along ``B`` is replaced by the mean's (mean-ablation): ``x − ((x − c) B) Bᵀ``.
    Computed in the dtype of ``acts``.
    """
    d = acts.shape[-1]
    if basis.dim() != 2 or basis.shape[0] != d:
        raise ValueError(
            f"basis must be [d, r] = [{d}, r] with orthonormal columns; got shape {tuple(basis.shape)}"
        )
    b = basis.to(device=acts.device, dtype=acts.dtype)
    ref = acts if center is None else acts - center.to(device=acts.device, dtype=acts.dtype)
    return acts - (ref @ b) @ b.T


def principal_angle_cosines(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spans of ``basis_a`` and ``basis_b``.

    Both are ``[d, r_a]`` / ``[d, r_b]``; columns need not be orthonormal (they are
    orthonormalised by QR). Returns ``min(r_a, r_b)`` cosines in ``[0, 1]``, descending.
    """
    if basis_a.dim() != 2 or basis_b.dim() != 2 or basis_a.shape[0] != basis_b.shape[0]:
        raise ValueError(
            "bases must be [d, r_a] and [d, r_b] with the same d; got shapes "
            f"{tuple(basis_a.shape)} and {tuple(basis_b.shape)}"
        )
    qa, _ = torch.linalg.qr(basis_a.detach().to(torch.float64))
    qb, _ = torch.linalg.qr(basis_b.detach().to(torch.float64))
    return torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)


def principal_angles_degrees(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of two bases."""
    return torch.rad2deg(torch.arccos(principal_angle_cosines(basis_a, basis_b)))
