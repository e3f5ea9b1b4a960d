"""Group-level (subspace) metrics for SASA-style decoders (SPEC §3).

A SASA decoder is cut into ``K`` blocks ``D_k ∈ R^{r×d}`` (``r`` consecutive rows of
``W_dec``). The *group* is the feature, so its geometry is summarised per block:

- **stable rank** ``‖D_k‖_F² / σ_max(D_k)²`` — a smooth rank surrogate in ``[1, rank(D_k)]``;
- **rank90** — the number of singular values needed to hold 90 % of ``Σσ²`` (the block's
  "effective dimension": what the benchmark compares with a feature's true dimension);
- firing counts per group and the fraction of groups that never fired (dead groups).

All functions are pure (they read their arguments and return new tensors) and work on any
``(K, r, d)`` stack of blocks, so they apply equally to a trained SASA SAE, to ground-truth
bases, or to hand-built matrices in tests. Singular values are computed in float64: these are
reporting metrics, and the rank90 threshold test must not flip on float32 rounding.
"""

from __future__ import annotations

import torch

#: Fraction of ``Σσ²`` that ``rank90`` must reach.
RANK90_FRACTION = 0.9
#: Relative slack on the rank90 threshold so that an exact 90 % split is not lost to rounding.
_RANK_FRACTION_RTOL = 1e-9


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.dim() != 3:
        raise ValueError(
            f"blocks must be a (K, r, d) tensor of K decoder blocks; got shape {tuple(blocks.shape)}"
        )


def block_singular_values(blocks: torch.Tensor) -> torch.Tensor:
    """Singular values of every block, descending: ``(K, r, d) -> (K, min(r, d))`` float64."""
    _check_blocks(blocks)
    return torch.linalg.svdvals(blocks.detach().to(torch.float64))


def stable_rank(blocks: torch.Tensor) -> torch.Tensor:
    """Stable rank ``‖D_k‖_F² / σ_max²`` of each block: ``(K, r, d) -> (K,)`` float64.

    It lies in ``[1, rank(D_k)] ⊆ [1, min(r, d)]``. A zero block has no defined stable rank
    and gives NaN (a SASA decoder has unit-norm rows, so this never happens there).
    """
    sigma_sq = block_singular_values(blocks).pow(2)
    return sigma_sq.sum(-1) / sigma_sq[..., 0]


def rank_at_fraction(sigma_sq: torch.Tensor, fraction: float = RANK90_FRACTION) -> torch.Tensor:
    """Smallest ``m`` with ``Σ_{i≤m} σ_i² ≥ fraction · Σ σ²`` for descending ``sigma_sq`` ``(..., r)``.

    Returns a long tensor ``(...,)``; an all-zero row gives 0.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    sigma_sq = sigma_sq.to(torch.float64)
    total = sigma_sq.sum(-1, keepdim=True)
    cum = sigma_sq.cumsum(-1)
    reached = cum >= fraction * total * (1.0 - _RANK_FRACTION_RTOL)
    count = (~reached).sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, count, torch.zeros_like(count))


def rank90(blocks: torch.Tensor, fraction: float = RANK90_FRACTION) -> torch.Tensor:
    """Number of singular values needed for ``fraction`` (90 %) of ``Σσ²``: ``(K, r, d) -> (K,)`` long."""
    return rank_at_fraction(block_singular_values(blocks).pow(2), fraction)


def group_firing_counts(feature_acts: torch.Tensor, group_rank: int) -> torch.Tensor:
    """Per-group number of tokens on which the group is active (any of its ``r`` codes non-zero).

    ``feature_acts`` is ``[..., d_sae]`` with groups of ``group_rank`` consecutive columns; every
    leading index is a token. Returns a float64 ``[d_sae // group_rank]`` tensor.
    """
    if group_rank < 1:
        raise ValueError(f"group_rank must be an integer >= 1; got {group_rank}")
    if feature_acts.dim() < 1 or feature_acts.shape[-1] % group_rank != 0:
        raise ValueError(
            f"feature_acts must be [..., d_sae] with d_sae divisible by group_rank={group_rank}; "
            f"got shape {tuple(feature_acts.shape)}"
        )
    acts = feature_acts.to_dense() if feature_acts.is_sparse else feature_acts
    active = (acts != 0).unflatten(-1, (-1, group_rank)).any(-1)
    return active.reshape(-1, active.shape[-1]).sum(0).to(torch.float64)


def dead_group_fraction(group_counts: torch.Tensor) -> float:
    """Fraction of groups whose firing count is zero (``group_counts`` from :func:`group_firing_counts`)."""
    if group_counts.dim() != 1 or group_counts.numel() == 0:
        raise ValueError(
            f"group_counts must be a non-empty (K,) tensor; got shape {tuple(group_counts.shape)}"
        )
    return (group_counts == 0).to(torch.float64).mean().item()


def dead_groups_from_neuron_mask(dead_neuron_mask: torch.Tensor, group_rank: int) -> torch.Tensor:
    """Per-group dead flag from SAELens's per-column ``dead_neuron_mask``: dead iff all ``r`` columns are."""
    if group_rank < 1:
        raise ValueError(f"group_rank must be an integer >= 1; got {group_rank}")
    if dead_neuron_mask.dim() != 1 or dead_neuron_mask.shape[0] % group_rank != 0:
        raise ValueError(
            f"dead_neuron_mask must be (d_sae,) with d_sae divisible by group_rank={group_rank}; "
            f"got shape {tuple(dead_neuron_mask.shape)}"
        )
    return dead_neuron_mask.bool().view(-1, group_rank).all(-1)
