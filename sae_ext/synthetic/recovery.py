"""Recovery metrics against ground-truth feature subspaces (SPEC §6).

- :func:`principal_cosines` — cosines of the principal angles between two row spans.
- :func:`splitting_count` — per ground-truth subspace, how many learned latents (one decoder
  direction each) or SASA groups (a decoder block each) lie inside it.
- :func:`subspace_capture` / :func:`best_matching_groups` — how much of a ground-truth subspace
  a learned span contains, and which group contains most of it.
- :func:`energy_in_subspace` / :func:`units_for_energy` — data-driven splitting: how many
  latents or groups carry 90 % of a feature's reconstructed energy on tokens where it fires.
- :func:`max_cosine_match` — per true direction, the best ``|cos|`` over learned directions
  (signed latents count for both polarities), optionally one-to-one (Hungarian, as SAELens's
  ``mean_correlation_coefficient``).

**When does a group lie inside a subspace?** A decoder block ``D_k`` (``r`` unit rows) may
carry a few directions that the group barely uses. Its *dominant subspace* is spanned by the
top-``m`` right singular vectors, ``m`` = the number of singular values holding ``energy``
(90 %) of ``Σσ²`` — i.e. ``rank90(D_k)``. The group counts for a ground-truth subspace ``S``
when ``m ≤ dim S`` and **every** principal cosine between the dominant subspace and ``S`` is
``≥ cos_threshold``, i.e. every unit vector in the dominant subspace has a projection of at
least ``cos_threshold`` onto ``S``. For a single direction (a standard latent) this reduces
to ``‖P_S v̂‖ ≥ cos_threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment

from sae_ext.metrics.groups import rank_at_fraction

Blocks = torch.Tensor | Sequence[torch.Tensor]


def _orthonormal_rows(a: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis (rows) of the row span of ``a`` ``(p, d)``, float64; rank-revealing."""
    if a.dim() != 2:
        raise ValueError(f"expected a (p, d) matrix of row vectors; got shape {tuple(a.shape)}")
    a = a.detach().to(torch.float64)
    if a.shape[0] == 0:
        return a
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    keep = s > tol * max(float(s[0]), 1e-300) if s.numel() else s.bool()
    return vh[keep]


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between ``rowspan(a)`` and ``rowspan(b)``, descending.

    ``a`` is ``(p, d)`` and ``b`` is ``(q, d)``; rows need not be orthonormal or independent.
    Returns a float64 tensor of length ``min(rank a, rank b)``, values in ``[0, 1]``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (p, d) and (q, d) with the same d; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    qa, qb = _orthonormal_rows(a), _orthonormal_rows(b)
    if qa.shape[0] == 0 or qb.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(qa @ qb.T).clamp(0.0, 1.0)


def dominant_subspace(block: torch.Tensor, energy: float = 0.9) -> torch.Tensor:
    """Top right singular vectors of ``block`` ``(r, d)`` holding ``energy`` of ``Σσ²``: ``(m, d)``."""
    if block.dim() != 2:
        raise ValueError(f"block must be (r, d); got shape {tuple(block.shape)}")
    _, s, vh = torch.linalg.svd(block.detach().to(torch.float64), full_matrices=False)
    m = int(rank_at_fraction(s.pow(2), energy))
    return vh[:m]


def _as_block_list(learned: Blocks) -> tuple[list[torch.Tensor], bool]:
    """Normalise the learned argument to a list of ``(r_k, d)`` blocks; flag 1-D latents."""
    if isinstance(learned, torch.Tensor):
        if learned.dim() == 2:
            return [row.unsqueeze(0) for row in learned], True
        if learned.dim() == 3:
            return list(learned), False
        raise ValueError(
            "learned must be (n_latents, d) decoder directions or (K, r, d) group blocks; "
            f"got shape {tuple(learned.shape)}"
        )
    return [torch.as_tensor(b) for b in learned], False


def _check_truth(ground_truth_bases: Sequence[torch.Tensor], d: int) -> list[torch.Tensor]:
    out = []
    for i, basis in enumerate(ground_truth_bases):
        if basis.dim() != 2 or basis.shape[1] != d:
            raise ValueError(
                f"ground_truth_bases[{i}] must be (d_i, {d}); got shape {tuple(basis.shape)}"
            )
        out.append(_orthonormal_rows(basis))
    return out


def splitting_count(
    ground_truth_bases: Sequence[torch.Tensor],
    decoder_or_group_bases: Blocks,
    cos_threshold: float = 0.9,
    energy: float = 0.9,
) -> torch.Tensor:
    """Per ground-truth subspace, the number of latents or groups lying inside it (``(n_true,)`` long).

    ``decoder_or_group_bases`` is either ``(n_latents, d)`` — one decoder direction per latent,
    a latent counts for ``S`` when ``‖P_S v̂‖ ≥ cos_threshold`` — or ``(K, r, d)`` / a list of
    ``(r_k, d)`` group blocks, a group counts when its dominant subspace (``energy`` of
    ``Σσ²``) lies inside ``S`` (see the module docstring). A latent or group can count for
    several subspaces only if they overlap.
    """
    if not 0.0 < cos_threshold <= 1.0:
        raise ValueError(f"cos_threshold must be in (0, 1]; got {cos_threshold}")
    blocks, single = _as_block_list(decoder_or_group_bases)
    if not blocks:
        return torch.zeros(len(ground_truth_bases), dtype=torch.long)
    d = blocks[0].shape[-1]
    truth = _check_truth(ground_truth_bases, d)
    if single:
        dirs = torch.cat(blocks).detach().to(torch.float64)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-300)
        # ‖P_S v̂‖ for every (subspace, latent)
        proj = torch.stack([(dirs @ q.T).norm(dim=-1) for q in truth])
        return (proj >= cos_threshold).sum(-1)
    dominant = [dominant_subspace(b, energy) for b in blocks]
    counts = torch.zeros(len(truth), dtype=torch.long)
    for i, q in enumerate(truth):
        for dom in dominant:
            if dom.shape[0] == 0 or dom.shape[0] > q.shape[0]:
                continue
            if float(principal_cosines(dom, q).min()) >= cos_threshold:
                counts[i] += 1
    return counts


def subspace_capture(basis: torch.Tensor, learned: torch.Tensor) -> float:
    """Fraction of subspace ``S = rowspan(basis)`` inside ``rowspan(learned)``: mean of cos²θ_j.

    Equals ``‖P_learned Q_S‖_F² / dim S`` ∈ [0, 1]; 1 iff ``S ⊆ span(learned)``.
    """
    q = _orthonormal_rows(basis)
    cos = principal_cosines(q, learned)
    return float(cos.pow(2).sum() / max(q.shape[0], 1))


class GroupMatch(NamedTuple):
    """Best group per ground-truth subspace."""

    index: torch.Tensor
    """``(n_true,)`` long: the group whose span captures most of the subspace."""
    capture: torch.Tensor
    """``(n_true,)`` float64: that group's :func:`subspace_capture`."""


def best_matching_groups(
    ground_truth_bases: Sequence[torch.Tensor], group_blocks: Blocks
) -> GroupMatch:
    """For each ground-truth subspace, the group whose full decoder span captures most of it."""
    blocks, _ = _as_block_list(group_blocks)
    if not blocks:
        raise ValueError("group_blocks must contain at least one group")
    truth = _check_truth(ground_truth_bases, blocks[0].shape[-1])
    spans = [_orthonormal_rows(b) for b in blocks]
    capture = torch.tensor(
        [[float((q @ s.T).pow(2).sum()) / q.shape[0] for s in spans] for q in truth],
        dtype=torch.float64,
    )
    best, idx = capture.max(dim=-1)
    return GroupMatch(index=idx, capture=best)


def energy_in_subspace(
    codes: torch.Tensor, blocks: torch.Tensor, basis: torch.Tensor
) -> torch.Tensor:
    """Per unit, the energy its reconstruction contributions put inside ``S = rowspan(basis)``.

    ``codes`` ``(T, U, r)`` are the units' codes on ``T`` tokens (a standard latent is a unit
    with ``r = 1``), ``blocks`` ``(U, r, d)`` the decoder rows those codes multiply. Returns
    ``(U,)`` float64 ``Σ_t ‖P_S (codes_{t,u} · blocks_u)‖²``: how much of the feature's
    reconstruction each latent or group carries (data-driven, so unused decoder rows don't count).
    """
    if codes.dim() != 3 or blocks.dim() != 3 or codes.shape[1:] != blocks.shape[:2]:
        raise ValueError(
            f"codes must be (T, U, r) and blocks (U, r, d) with matching U, r; got "
            f"{tuple(codes.shape)} and {tuple(blocks.shape)}"
        )
    q = _orthonormal_rows(basis)
    m = blocks.detach().to(torch.float64) @ q.T  # (U, r, d_i)
    inside = torch.einsum("tur,urj->tuj", codes.detach().to(torch.float64), m)
    return inside.pow(2).sum(dim=(0, 2))


def units_for_energy(energy: torch.Tensor, fraction: float = 0.9) -> int:
    """Fewest units whose energies (from :func:`energy_in_subspace`) hold ``fraction`` of the total.

    1 means one latent/group carries the feature (no splitting); 0 when nothing reconstructs it.
    """
    if energy.dim() != 1:
        raise ValueError(f"energy must be (U,); got shape {tuple(energy.shape)}")
    return int(rank_at_fraction(energy.sort(descending=True).values, fraction))


class CosineMatch(NamedTuple):
    """Result of :func:`max_cosine_match`."""

    mean: float
    """Mean over true directions of the matched ``|cos|`` (the MCC when ``one_to_one``)."""
    per_true: torch.Tensor
    """``(n_true,)`` float64 matched ``|cos|``."""
    index: torch.Tensor
    """``(n_true,)`` long index of the matched learned direction (−1 if unmatched)."""


def max_cosine_match(
    true_dirs: torch.Tensor, learned_dirs: torch.Tensor, one_to_one: bool = False
) -> CosineMatch:
    """Match every true direction to a learned direction by ``|cos|`` (signs count).

    ``true_dirs`` ``(n_true, d)``, ``learned_dirs`` ``(n_learned, d)``. Default: each true
    direction takes its best learned direction (several may share one). ``one_to_one=True``:
    Hungarian assignment, the MCC of SAELens's ``mean_correlation_coefficient``; true directions
    left without a partner (``n_learned < n_true``) score 0 with index −1.
    """
    if (
        true_dirs.dim() != 2
        or learned_dirs.dim() != 2
        or true_dirs.shape[1] != learned_dirs.shape[1]
    ):
        raise ValueError(
            "true_dirs and learned_dirs must be (n, d) and (m, d) with the same d; got "
            f"{tuple(true_dirs.shape)} and {tuple(learned_dirs.shape)}"
        )
    n_true = true_dirs.shape[0]
    if n_true == 0 or learned_dirs.shape[0] == 0:
        return CosineMatch(0.0, torch.zeros(n_true, dtype=torch.float64), torch.full((n_true,), -1))
    t = true_dirs.detach().to(torch.float64)
    t = t / t.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    lrn = learned_dirs.detach().to(torch.float64)
    lrn = lrn / lrn.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    cos = (t @ lrn.T).abs()
    if not one_to_one:
        per_true, index = cos.max(dim=-1)
        return CosineMatch(float(per_true.mean()), per_true, index)
    rows, cols = linear_sum_assignment(-cos.cpu().numpy())
    per_true = torch.zeros(n_true, dtype=torch.float64)
    index = torch.full((n_true,), -1, dtype=torch.long)
    per_true[torch.as_tensor(rows)] = cos[torch.as_tensor(rows), torch.as_tensor(cols)]
    index[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return CosineMatch(float(per_true.mean()), per_true, index)
