"""Dictionary statistics of an SAE over a token stream: L0, dead / dense latents, the
firing-rate histogram, sign usage (signed SAEs such as SA-GSAE) and, for grouped SAEs (SASA),
group firing and the stable rank / rank90 of the decoder blocks.

Only per-latent counters are kept (``O(d_sae)`` memory), never the latent activations of all
tokens, so any number of tokens can be streamed through :class:`DictionaryStatsAccumulator`.

Every definition is the one of its metric module (SPEC §1–§3): *fires* and *dense*
(:mod:`sae_ext.metrics.dense`, SAEBench's 10 %), *positive share* and *bipolar*
(:mod:`sae_ext.metrics.sign`), group firing, dead groups, stable rank and rank90
(:mod:`sae_ext.metrics.groups`). A share of an empty set (no alive latent) is NaN. Which
latents form groups, and the decoder blocks as ``decode`` uses them, are asked of the SAE
(:func:`sae_ext.evaluation_spec.evaluation_spec`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_ext.evaluation_spec import evaluation_spec
from sae_ext.metrics.dense import DENSE_THRESHOLD, dense_fraction, dense_mask, firing_counts
from sae_ext.metrics.groups import (
    dead_group_fraction,
    group_firing_counts,
    rank90,
    stable_rank,
)
from sae_ext.metrics.sign import MIN_SIGN_SHARE, bipolar_fraction, positive_share, sign_counts
from sae_ext.sae_io import (
    check_activations,
    encode_decode,
    iter_activation_batches,
    n_batches_hint,
)

__all__ = [
    "DictionaryStats",
    "DictionaryStatsAccumulator",
    "dictionary_stats",
    "dictionary_stats_from_codes",
]


@dataclass
class DictionaryStats:
    """Per-latent usage statistics of an SAE over ``n_tokens`` tokens."""

    n_tokens: int
    d_sae: int
    l0: float
    """Mean number of firing latents per token."""
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    firing_rates: torch.Tensor
    """Per-latent firing rate, float64 ``[d_sae]``."""
    hist_counts: list[int]
    """Histogram of ``log10(firing rate)`` over *alive* latents (dead ones are ``n_dead``)."""
    hist_edges: list[float]
    n_dead: int
    n_dense: int
    is_signed: bool
    """Whether any latent took a negative value on the data."""
    bipolar_fraction: float | None
    """Share of alive latents firing with each sign on ≥ ``sign_share`` of firings (None if unsigned)."""
    positive_share: torch.Tensor | None
    """Per latent: positive firings / firings (NaN for dead latents; None if unsigned)."""
    sign_share: float
    group_rank: int | None = None
    group_stable_rank: torch.Tensor | None = None
    group_rank90: torch.Tensor | None = None
    group_l0: float | None = None
    """Mean number of groups with any firing latent per token."""
    group_dead_fraction: float | None = None
    group_dense_fraction: float | None = None
    group_firing_rates: torch.Tensor | None = None
    """Per group: share of tokens on which any of its latents fires, float64 ``[K]``."""

    @property
    def mean_positive_share(self) -> float | None:
        """Mean over alive latents of the positive share (None if unsigned or none alive)."""
        if self.positive_share is None:
            return None
        ps = self.positive_share[~torch.isnan(self.positive_share)]
        return float(ps.mean().item()) if ps.numel() else None

    @property
    def positive_share_hist(self) -> list[int] | None:
        """Bipolar census: alive latents per 10 % bin of positive share (None if unsigned)."""
        if self.positive_share is None:
            return None
        ps = self.positive_share[~torch.isnan(self.positive_share)]
        return torch.histc(ps.float(), bins=10, min=0.0, max=1.0).long().tolist()

    @property
    def mean_group_stable_rank(self) -> float | None:
        """Mean stable rank over groups with a non-zero block (None without groups or blocks)."""
        if self.group_stable_rank is None:
            return None
        sr = self.group_stable_rank[~torch.isnan(self.group_stable_rank)]
        return float(sr.mean().item()) if sr.numel() else None

    @property
    def mean_live_group_stable_rank(self) -> float | None:
        """Mean stable rank over the groups that fired (None without groups, blocks or live
        groups): the rank the used groups decode with, which the dead groups' blocks do not dilute."""
        if self.group_stable_rank is None or self.group_firing_rates is None:
            return None
        sr = self.group_stable_rank[(self.group_firing_rates > 0) & ~torch.isnan(self.group_stable_rank)]
        return float(sr.mean().item()) if sr.numel() else None

    @property
    def group_rank90_counts(self) -> dict[str, int] | None:
        """Number of groups per rank90 value ``1..r`` (None without groups)."""
        if self.group_rank is None or self.group_rank90 is None:
            return None
        return {
            str(k): int((self.group_rank90 == k).sum().item()) for k in range(1, self.group_rank + 1)
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: scalars, the histogram and group summaries (no per-latent arrays)."""
        out: dict[str, Any] = {
            "n_tokens": self.n_tokens,
            "d_sae": self.d_sae,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "dense_fraction": self.dense_fraction,
            "dense_threshold": self.dense_threshold,
            "n_dead": self.n_dead,
            "n_dense": self.n_dense,
            "firing_rate_hist": {"log10_edges": self.hist_edges, "counts": self.hist_counts},
            "is_signed": self.is_signed,
            "bipolar_fraction": self.bipolar_fraction,
            "sign_share": self.sign_share,
        }
        if self.positive_share is not None:
            out["mean_positive_share"] = self.mean_positive_share
            out["positive_share_hist"] = self.positive_share_hist
        if self.group_rank is not None:
            assert self.group_stable_rank is not None and self.group_rank90 is not None
            out["groups"] = {
                "group_rank": self.group_rank,
                "n_groups": int(self.group_stable_rank.numel()),
                "mean_stable_rank": self.mean_group_stable_rank,
                "mean_live_stable_rank": self.mean_live_group_stable_rank,
                "mean_rank90": float(self.group_rank90.double().mean().item()),
                "rank90_counts": self.group_rank90_counts,
                "group_l0": self.group_l0,
                "group_dead_fraction": self.group_dead_fraction,
                "group_dense_fraction": self.group_dense_fraction,
            }
        return out


class DictionaryStatsAccumulator:
    """Streaming per-latent counters; feed latent activations ``[n, d_sae]`` to ``update``."""

    def __init__(self, d_sae: int, *, group_rank: int | None = None) -> None:
        if d_sae < 1:
            raise ValueError(f"d_sae must be >= 1, got {d_sae}")
        if group_rank is not None and (group_rank < 1 or d_sae % group_rank):
            raise ValueError(f"group_rank = {group_rank} must be >= 1 and divide d_sae = {d_sae}")
        self.d_sae = d_sae
        self.group_rank = group_rank
        self.n_tokens = 0
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.pos = torch.zeros(d_sae, dtype=torch.int64)
        self.neg = torch.zeros(d_sae, dtype=torch.int64)
        n_groups = d_sae // group_rank if group_rank else 0
        self.group_fires = torch.zeros(n_groups, dtype=torch.float64)

    def update(self, feature_acts: torch.Tensor) -> None:
        """Count firings, signs and group activity of a batch ``[..., d_sae]``."""
        if feature_acts.shape[-1] != self.d_sae:
            raise ValueError(
                f"feature_acts have width {feature_acts.shape[-1]} but d_sae is {self.d_sae}"
            )
        f = feature_acts.detach().reshape(-1, self.d_sae)
        if f.is_sparse:
            f = f.to_dense()
        self.n_tokens += f.shape[0]
        self.fires += firing_counts(f).cpu()
        pos, neg = sign_counts(f)
        self.pos += pos.cpu()
        self.neg += neg.cpu()
        if self.group_rank:
            self.group_fires += group_firing_counts(f, self.group_rank).cpu()

    def result(
        self,
        *,
        group_blocks: torch.Tensor | None = None,
        dense_threshold: float = DENSE_THRESHOLD,
        sign_share: float = MIN_SIGN_SHARE,
        n_bins: int = 50,
    ) -> DictionaryStats:
        """Summaries of everything seen so far; ``group_blocks`` ``(K, r, d_in)`` (the decoder
        blocks as ``decode`` uses them) enables the group stable rank and rank90."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were seen: feed at least one batch before result()")
        if not 0.0 <= dense_threshold < 1.0:
            raise ValueError(f"dense_threshold must lie in [0, 1), got {dense_threshold}")
        if not 0.0 < sign_share <= 0.5:
            raise ValueError(f"sign_share must lie in (0, 0.5], got {sign_share}")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        n_groups = self.group_fires.numel()
        if group_blocks is not None and (
            not self.group_rank or tuple(group_blocks.shape[:2]) != (n_groups, self.group_rank)
        ):
            raise ValueError(
                f"group_blocks have shape {tuple(group_blocks.shape)} but the accumulator counts "
                f"{n_groups} groups of rank {self.group_rank}"
            )
        n = self.n_tokens
        rates = self.fires / n
        alive = self.fires > 0
        dense = dense_mask(self.fires, n, dense_threshold)
        lo = min(math.floor(math.log10(1.0 / n)) if n > 1 else -1, -1)
        edges = np.linspace(lo, 0.0, n_bins + 1)
        counts, _ = np.histogram(np.log10(rates[alive].numpy()), bins=edges)
        is_signed = bool(self.neg.sum().item() > 0)
        stats = DictionaryStats(
            n_tokens=n,
            d_sae=self.d_sae,
            l0=float(self.fires.sum().item()) / n,
            dead_fraction=float((~alive).double().mean().item()),
            dense_fraction=float(dense.double().mean().item()),
            dense_threshold=dense_threshold,
            firing_rates=rates,
            hist_counts=[int(c) for c in counts],
            hist_edges=[float(e) for e in edges],
            n_dead=int((~alive).sum().item()),
            n_dense=int(dense.sum().item()),
            is_signed=is_signed,
            bipolar_fraction=(
                float(bipolar_fraction(self.pos, self.neg, sign_share).item()) if is_signed else None
            ),
            positive_share=positive_share(self.pos, self.neg) if is_signed else None,
            sign_share=sign_share,
        )
        if self.group_rank:
            stats.group_rank = self.group_rank
            stats.group_l0 = float(self.group_fires.sum().item()) / n
            stats.group_dead_fraction = dead_group_fraction(self.group_fires)
            stats.group_dense_fraction = dense_fraction(self.group_fires, n, dense_threshold)
            stats.group_firing_rates = self.group_fires / n
            if group_blocks is not None:
                stats.group_stable_rank = stable_rank(group_blocks)
                stats.group_rank90 = rank90(group_blocks)
            else:
                stats.group_stable_rank = torch.full((n_groups,), float("nan"), dtype=torch.float64)
                stats.group_rank90 = torch.zeros(n_groups, dtype=torch.int64)
        return stats


def dictionary_stats(
    sae: Any,
    activations_or_batches: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 4096,
    dense_threshold: float = DENSE_THRESHOLD,
    sign_share: float = MIN_SIGN_SHARE,
    n_bins: int = 50,
    progress: bool = True,
) -> DictionaryStats:
    """Stream activations ``[..., d_in]`` through ``sae.encode`` and summarise latent usage.

    Works for any SAE (only ``encode``, ``cfg.d_in`` and ``cfg.d_sae`` are used); group
    statistics are added when the SAE's :class:`~sae_ext.evaluation_spec.EvaluationSpec`
    names groups (SASA).
    """
    d_in = int(sae.cfg.d_in)
    if isinstance(activations_or_batches, torch.Tensor):
        check_activations(activations_or_batches, d_in)  # before any work
    spec = evaluation_spec(sae)
    acc = DictionaryStatsAccumulator(int(sae.cfg.d_sae), group_rank=spec.group_rank)
    batches = iter_activation_batches(activations_or_batches, d_in, batch_size)
    total = n_batches_hint(activations_or_batches, batch_size)
    for x in tqdm(batches, total=total, desc="dictionary stats", leave=False, disable=not progress):
        feats, _ = encode_decode(sae, x)
        acc.update(feats)
    return acc.result(
        group_blocks=spec.group_blocks,
        dense_threshold=dense_threshold,
        sign_share=sign_share,
        n_bins=n_bins,
    )


def dictionary_stats_from_codes(
    codes: torch.Tensor | Iterable[torch.Tensor],
    *,
    group_rank: int | None = None,
    group_blocks: torch.Tensor | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    sign_share: float = MIN_SIGN_SHARE,
    n_bins: int = 50,
) -> DictionaryStats:
    """:func:`dictionary_stats` from latent activations ``[..., d_sae]`` computed elsewhere."""
    batches = [codes] if isinstance(codes, torch.Tensor) else codes
    acc: DictionaryStatsAccumulator | None = None
    for i, f in enumerate(batches):
        if not isinstance(f, torch.Tensor) or f.ndim < 1:
            raise ValueError(
                f"code batch {i} must be a tensor [..., d_sae], got {type(f).__name__}"
            )
        bad = int((~torch.isfinite(f.float())).sum().item()) if torch.is_floating_point(f) else 0
        if bad:
            raise ValueError(f"code batch {i} contains {bad} non-finite value(s) (NaN/Inf)")
        if acc is None:
            acc = DictionaryStatsAccumulator(int(f.shape[-1]), group_rank=group_rank)
        acc.update(f)
    if acc is None:
        raise ValueError("codes is empty: no latent activations to summarise")
    return acc.result(
        group_blocks=group_blocks,
        dense_threshold=dense_threshold,
        sign_share=sign_share,
        n_bins=n_bins,
    )
