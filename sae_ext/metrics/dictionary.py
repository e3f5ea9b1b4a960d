"""Dictionary statistics of an SAE over a token stream: L0, dead / dense latents, the
firing-rate histogram, sign usage (signed SAEs such as SA-GSAE) and, for grouped SAEs
(SASA, ``cfg.group_rank``), per-group stable rank and rank90 of the decoder blocks.

Only per-latent counters are kept (``O(d_sae)`` memory), never the latent activations of all
tokens, so any number of tokens can be streamed through :class:`DictionaryStatsAccumulator`.

Definitions (SPEC §1–§3):

* a latent *fires* on a token when its activation is non-zero (``!= 0``, as SAELens's
  ``run_evals``, so negative activations of signed SAEs count);
* *dead*: never fires on the data; *dense*: fires on more than ``dense_threshold`` (10 %) of
  tokens (SAEBench ``freq_over_10_percent``);
* *bipolar*: an alive latent whose activations take each sign on at least ``sign_share``
  (5 %) of its firings; ``positive_share`` = positive firings / firings;
* group ``k`` = rows ``[k·r, (k+1)·r)`` of the row-normalised decoder ``Ŵ_dec`` (``r =
  cfg.group_rank``; SASA decodes with unit rows whatever the stored norms); stable rank
  ``‖D_k‖_F² / σ_max²`` ∈ [1, r]; rank90 = fewest singular values holding 90 % of ``Σσ²``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_ext.metrics.dark_matter import (
    check_activations,
    encode_decode,
    iter_activation_batches,
    n_batches_hint,
)

__all__ = [
    "DictionaryStats",
    "DictionaryStatsAccumulator",
    "decoder_group_ranks",
    "dictionary_stats",
    "dictionary_stats_from_codes",
    "unit_decoder_rows",
]

DENSE_THRESHOLD = 0.1
SIGN_SHARE = 0.05
RANK_FRACTION = 0.9


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
            ps = self.positive_share[~torch.isnan(self.positive_share)]
            out["mean_positive_share"] = float(ps.mean().item()) if ps.numel() else None
            # bipolar census: how many alive latents fire positive on each 10 % share of firings
            out["positive_share_hist"] = torch.histc(ps.float(), bins=10, min=0.0, max=1.0).long().tolist()
        if self.group_rank is not None:
            assert self.group_stable_rank is not None and self.group_rank90 is not None
            sr = self.group_stable_rank[~torch.isnan(self.group_stable_rank)]
            out["groups"] = {
                "group_rank": self.group_rank,
                "n_groups": int(self.group_stable_rank.numel()),
                "mean_stable_rank": float(sr.mean().item()) if sr.numel() else None,
                "mean_rank90": float(self.group_rank90.double().mean().item()),
                "rank90_counts": {
                    str(k): int((self.group_rank90 == k).sum().item())
                    for k in range(1, self.group_rank + 1)
                },
                "group_l0": self.group_l0,
                "group_dead_fraction": self.group_dead_fraction,
                "group_dense_fraction": self.group_dense_fraction,
            }
        return out


def decoder_group_ranks(
    W_dec: torch.Tensor, group_rank: int, fraction: float = RANK_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(stable rank, rank90)`` of the decoder blocks ``D_k = W_dec[k·r:(k+1)·r]``.

    Uses the eigenvalues of the ``r × r`` Gram matrices ``D_k D_kᵀ`` (= σ²) in float64. A group
    with an all-zero block gets stable rank NaN and rank90 0.
    """
    if group_rank < 1:
        raise ValueError(f"group_rank must be >= 1, got {group_rank}")
    d_sae, d_in = W_dec.shape
    if d_sae % group_rank:
        raise ValueError(f"d_sae = {d_sae} is not a multiple of group_rank = {group_rank}")
    blocks = W_dec.detach().to(torch.float64).reshape(d_sae // group_rank, group_rank, d_in)
    gram = blocks @ blocks.transpose(1, 2)
    sig2 = torch.linalg.eigvalsh(gram).clamp_min(0.0).flip(-1)  # descending
    total = sig2.sum(-1)
    top = sig2[:, 0]
    stable = torch.where(top > 0, total / top.clamp_min(1e-300), torch.full_like(top, float("nan")))
    cum = sig2.cumsum(-1)
    # fewest k with cum_k >= fraction * total (with a round-off margin)
    need = fraction * total * (1 - 1e-12)
    rank = (cum < need.unsqueeze(-1)).sum(-1) + 1
    rank = torch.where(total > 0, rank, torch.zeros_like(rank))
    return stable, rank


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
        self.fires = torch.zeros(d_sae, dtype=torch.int64)
        self.pos = torch.zeros(d_sae, dtype=torch.int64)
        self.neg = torch.zeros(d_sae, dtype=torch.int64)
        n_groups = d_sae // group_rank if group_rank else 0
        self.group_fires = torch.zeros(n_groups, dtype=torch.int64)

    def update(self, feature_acts: torch.Tensor) -> None:
        """Count firings, signs and group activity of a batch ``[..., d_sae]``."""
        if feature_acts.shape[-1] != self.d_sae:
            raise ValueError(
                f"feature_acts have width {feature_acts.shape[-1]} but d_sae is {self.d_sae}"
            )
        f = feature_acts.detach().reshape(-1, self.d_sae)
        if f.is_sparse:
            f = f.to_dense()
        fire = f != 0
        self.n_tokens += f.shape[0]
        self.fires += fire.sum(0).cpu()
        self.pos += (f > 0).sum(0).cpu()
        self.neg += (f < 0).sum(0).cpu()
        if self.group_rank:
            g = fire.reshape(f.shape[0], -1, self.group_rank).any(-1)
            self.group_fires += g.sum(0).cpu()

    def result(
        self,
        *,
        W_dec: torch.Tensor | None = None,
        dense_threshold: float = DENSE_THRESHOLD,
        sign_share: float = SIGN_SHARE,
        n_bins: int = 50,
    ) -> DictionaryStats:
        """Summaries of everything seen so far; ``W_dec`` enables the group decoder ranks."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were seen: feed at least one batch before result()")
        if not 0.0 <= dense_threshold < 1.0:
            raise ValueError(f"dense_threshold must lie in [0, 1), got {dense_threshold}")
        if not 0.0 < sign_share <= 0.5:
            raise ValueError(f"sign_share must lie in (0, 0.5], got {sign_share}")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        n = self.n_tokens
        rates = self.fires.double() / n
        alive = self.fires > 0
        dense = rates > dense_threshold
        lo = math.floor(math.log10(1.0 / n)) if n > 1 else -1
        lo = min(lo, -1)
        edges = np.linspace(lo, 0.0, n_bins + 1)
        counts, _ = np.histogram(np.log10(rates[alive].numpy()), bins=edges)
        is_signed = bool(self.neg.sum().item() > 0)
        bipolar: float | None = None
        pos_share: torch.Tensor | None = None
        if is_signed:
            fires = self.fires.double()
            pos_share = torch.where(alive, self.pos.double() / fires.clamp_min(1), torch.nan)
            both = alive & (self.pos >= sign_share * fires) & (self.neg >= sign_share * fires)
            n_alive = int(alive.sum().item())
            bipolar = float(both.sum().item()) / n_alive if n_alive else float("nan")
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
            bipolar_fraction=bipolar,
            positive_share=pos_share,
            sign_share=sign_share,
        )
        if self.group_rank:
            grates = self.group_fires.double() / n
            stats.group_rank = self.group_rank
            stats.group_l0 = float(self.group_fires.sum().item()) / n
            stats.group_dead_fraction = float((self.group_fires == 0).double().mean().item())
            stats.group_dense_fraction = float((grates > dense_threshold).double().mean().item())
            if W_dec is not None:
                stats.group_stable_rank, stats.group_rank90 = decoder_group_ranks(
                    W_dec, self.group_rank
                )
            else:
                k = self.d_sae // self.group_rank
                stats.group_stable_rank = torch.full((k,), float("nan"), dtype=torch.float64)
                stats.group_rank90 = torch.zeros(k, dtype=torch.int64)
        return stats


def unit_decoder_rows(sae: Any) -> torch.Tensor | None:
    """The SAE's decoder with unit-norm rows (``Ŵ_dec`` of SPEC §3), as the group ranks use it.

    Rows of zero norm stay zero. ``None`` if the SAE has no ``W_dec``.
    """
    W = getattr(sae, "W_dec", None)
    if W is None:
        return None
    W = W.detach().to(torch.float64)
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _group_rank_of(sae: Any) -> int | None:
    r = getattr(sae.cfg, "group_rank", None)
    return int(r) if r else None


def dictionary_stats(
    sae: Any,
    activations_or_batches: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 4096,
    dense_threshold: float = DENSE_THRESHOLD,
    sign_share: float = SIGN_SHARE,
    n_bins: int = 50,
    progress: bool = True,
) -> DictionaryStats:
    """Stream activations ``[..., d_in]`` through ``sae.encode`` and summarise latent usage.

    Works for any SAE (only ``encode``, ``cfg.d_in``, ``cfg.d_sae``, ``W_dec`` are used);
    group statistics are added when ``sae.cfg`` has a non-zero ``group_rank`` (SASA).
    """
    d_in = int(sae.cfg.d_in)
    if isinstance(activations_or_batches, torch.Tensor):
        check_activations(activations_or_batches, d_in)  # before any work
    acc = DictionaryStatsAccumulator(int(sae.cfg.d_sae), group_rank=_group_rank_of(sae))
    batches = iter_activation_batches(activations_or_batches, d_in, batch_size)
    total = n_batches_hint(activations_or_batches, batch_size)
    for x in tqdm(batches, total=total, desc="dictionary stats", leave=False, disable=not progress):
        feats, _ = encode_decode(sae, x)
        acc.update(feats)
    return acc.result(
        W_dec=unit_decoder_rows(sae) if acc.group_rank else None,
        dense_threshold=dense_threshold,
        sign_share=sign_share,
        n_bins=n_bins,
    )


def dictionary_stats_from_codes(
    codes: torch.Tensor | Iterable[torch.Tensor],
    *,
    group_rank: int | None = None,
    W_dec: torch.Tensor | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    sign_share: float = SIGN_SHARE,
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
        W_dec=W_dec, dense_threshold=dense_threshold, sign_share=sign_share, n_bins=n_bins
    )
