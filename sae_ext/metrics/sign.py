"""Sign metrics for signed-latent SAEs (SPEC §1): bipolar fraction, positive share, dead fraction.

All functions work on per-latent firing counts, so they stream: accumulate counts batch by
batch with :func:`accumulate_sign_counts`, then compute the metrics once. For convenience
the metrics also accept a tensor of latent activations ``(..., d_sae)`` in place of the
counts. A latent *fires* when its activation is non-zero; it fires positive or negative by
the activation's sign. A latent is *alive* when it fired at least once.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulate_sign_counts",
    "bipolar_fraction",
    "bipolar_fraction_by_frequency",
    "bipolar_mask",
    "dead_fraction",
    "positive_share",
    "sign_counts",
]

#: Default minimum share of its firings a latent must have on each sign to count as bipolar.
MIN_SIGN_SHARE = 0.05


def sign_counts(feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-latent (positive, negative) firing counts (int64) of activations ``(..., d_sae)``."""
    flat = feature_acts.reshape(-1, feature_acts.shape[-1])
    return (flat > 0).sum(dim=0), (flat < 0).sum(dim=0)


def accumulate_sign_counts(
    feature_acts: torch.Tensor,
    counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a batch's :func:`sign_counts` to running ``counts`` (None starts from zero)."""
    pos, neg = sign_counts(feature_acts)
    if counts is None:
        return pos, neg
    return counts[0] + pos.to(counts[0].device), counts[1] + neg.to(counts[1].device)


def _counts(
    pos_counts_or_acts: torch.Tensor, neg_counts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if neg_counts is None:
        return sign_counts(pos_counts_or_acts)
    if pos_counts_or_acts.shape != neg_counts.shape:
        raise ValueError(
            f"positive and negative counts must have the same shape, got "
            f"{tuple(pos_counts_or_acts.shape)} and {tuple(neg_counts.shape)}"
        )
    if (pos_counts_or_acts < 0).any() or (neg_counts < 0).any():
        raise ValueError("firing counts must be >= 0")
    return pos_counts_or_acts, neg_counts


def positive_share(
    pos_counts_or_acts: torch.Tensor, neg_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-latent share of firings that are positive, in [0, 1]; NaN for dead latents."""
    pos, neg = _counts(pos_counts_or_acts, neg_counts)
    total = (pos + neg).double()
    return torch.where(total > 0, pos.double() / total.clamp(min=1), torch.nan)


def bipolar_mask(
    pos_counts_or_acts: torch.Tensor,
    neg_counts: torch.Tensor | None = None,
    min_share: float = MIN_SIGN_SHARE,
) -> torch.Tensor:
    """Per-latent bool: alive and each sign on at least ``min_share`` of its firings."""
    if not 0 < min_share <= 0.5:
        raise ValueError(f"min_share must be in (0, 0.5], got {min_share}")
    share = positive_share(pos_counts_or_acts, neg_counts)
    # NaN (dead) compares False on both sides
    return (share >= min_share) & (1 - share >= min_share)


def bipolar_fraction(
    pos_counts_or_acts: torch.Tensor,
    neg_counts: torch.Tensor | None = None,
    min_share: float = MIN_SIGN_SHARE,
) -> torch.Tensor:
    """Share of alive latents whose firings take each sign at least ``min_share`` of the time.

    Pass per-latent positive and negative firing counts, or one tensor of activations
    ``(..., d_sae)``. Returns a 0-d float64 tensor; NaN when no latent is alive (a share of
    nothing), as every other share in :mod:`sae_ext.metrics`.
    """
    pos, neg = _counts(pos_counts_or_acts, neg_counts)
    n_alive = ((pos + neg) > 0).sum().double()
    n_bipolar = bipolar_mask(pos, neg, min_share).sum().double()
    return n_bipolar / n_alive if n_alive > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def bipolar_fraction_by_frequency(
    pos_counts_or_acts: torch.Tensor,
    neg_counts: torch.Tensor | None = None,
    n_bins: int = 10,
    min_share: float = MIN_SIGN_SHARE,
) -> torch.Tensor:
    """Bipolar fraction within each firing-frequency bin of the alive latents, most frequent first.

    The alive latents are sorted by how often they fire (either sign) and cut into ``n_bins``
    near-equal bins; entry ``i`` is the share of bin ``i``'s latents that are bipolar. It says where
    the bipolar latents sit: SPEC §1 expects the latents that carry an anticorrelated pair to fire
    on both features' tokens, so more often than one-sided latents. Returns ``[n_bins]`` float64;
    NaN for a bin with no latent (fewer alive latents than bins).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    pos, neg = _counts(pos_counts_or_acts, neg_counts)
    bipolar = bipolar_mask(pos, neg, min_share).flatten()
    total = (pos + neg).flatten()
    alive = torch.nonzero(total > 0).flatten()
    order = alive[torch.argsort(total[alive], descending=True, stable=True)]
    return torch.stack([
        bipolar[b].double().mean() if b.numel() else torch.tensor(float("nan"), dtype=torch.float64)
        for b in torch.tensor_split(order, n_bins)
    ])


def dead_fraction(
    pos_counts_or_acts: torch.Tensor, neg_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Share of latents that never fired, as a 0-d float64 tensor."""
    pos, neg = _counts(pos_counts_or_acts, neg_counts)
    return ((pos + neg) == 0).double().mean()
