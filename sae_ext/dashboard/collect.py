"""One streaming pass over the tokens: the SAE's non-zero codes (sparse), sign and group firing
counts and, for scaffolded SAEs, the scaffold's per-token share — what every dashboard page
is drawn from.

Only non-zero latent activations are kept (``O(tokens × L0)`` memory, not ``tokens × d_sae``),
so exact histograms and top contexts come out of the same pass. Positions holding a special
token (BOS/EOS/PAD… of the model's tokenizer, SPEC §8) are skipped before the SAE sees them:
they enter no statistic and can never be a top context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_ext.evaluation_spec import EvaluationSpec
from sae_ext.metrics.dense import dense_mask, firing_rates
from sae_ext.metrics.groups import group_firing_counts, rank90, stable_rank
from sae_ext.metrics.sign import accumulate_sign_counts, bipolar_mask, positive_share
from sae_ext.model_io import special_token_mask, stream_activations, token_batches
from sae_ext.sae_io import encode_decode
from sae_ext.splicer import Splicer

__all__ = ["MAX_STORED_CODES", "Collected", "UnitStats", "collect", "rank_units", "unit_stats"]

#: Most non-zero codes one pass keeps (about 20 bytes each): tokens × L0 must stay below it.
MAX_STORED_CODES = 50_000_000


@dataclass
class Collected:
    """What the streaming pass keeps. Positions are flat indices ``row · T + pos`` into ``tokens``."""

    tokens: torch.Tensor
    """All token rows ``[rows, T]`` (special tokens included, for display)."""
    kept: torch.Tensor
    """Bool ``[rows, T]``: the positions that count (not a special token)."""
    n_tokens: int
    """Number of kept positions: the denominator of every rate."""
    pos: torch.Tensor
    """Flat position of each non-zero code, int64 ``[nnz]``, sorted by (latent, position)."""
    latent: torch.Tensor
    """Latent of each non-zero code, int64 ``[nnz]`` (sorted)."""
    value: torch.Tensor
    """Value of each non-zero code, float32 ``[nnz]``."""
    starts: torch.Tensor
    """``starts[i]:starts[i+1]`` is latent ``i``'s slice of ``pos``/``value`` (``[d_sae + 1]``)."""
    pos_counts: torch.Tensor
    neg_counts: torch.Tensor
    abs_sum: torch.Tensor
    """Per latent: Σ|activation| over kept tokens (float64)."""
    group_counts: torch.Tensor | None
    """Per group: kept tokens on which any of its columns fired (SASA), else None."""
    spec: EvaluationSpec
    """What the architecture adds: groups (``group_rank``, ``group_blocks``), a scaffold hook."""
    scaffold_share: torch.Tensor | None
    """Per flat position: ‖s‖² / ‖x̃‖² of the scaffold ``s`` (NaN at skipped positions)."""
    scaffold_energy: tuple[float, float] | None
    """(Σ‖s‖², Σ‖x̃‖²) over kept tokens."""
    scaffold_gram: torch.Tensor | None
    """Σ sᵀs over kept tokens ``[d_in, d_in]`` (float64): the scaffold's output directions."""

    def latent_slice(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions, values) of latent ``i``'s non-zero codes, positions ascending."""
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        return self.pos[a:b], self.value[a:b]

    def dense_values(self, pos: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Scatter per-position values into a ``[rows, T]`` grid (zero elsewhere)."""
        grid = torch.zeros(self.tokens.numel(), dtype=torch.float32)
        grid[pos] = values.float()
        return grid.view_as(self.tokens)

    def group_codes(self, k: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions ``[m]``, codes ``[m, r]``) of the tokens on which group ``k`` is active."""
        parts = [self.latent_slice(k * r + j) for j in range(r)]
        pos = torch.unique(torch.cat([p for p, _ in parts])) if parts else torch.empty(0)
        codes = torch.zeros(pos.numel(), r, dtype=torch.float32)
        for j, (p, v) in enumerate(parts):
            codes[torch.searchsorted(pos, p), j] = v
        return pos, codes


def _processed_input(sae: Any, sae_in: torch.Tensor) -> torch.Tensor:
    """``x̃``: the SAE input after its run-time normalisation and ``b_dec`` centring (the space
    the scaffold ``s`` lives in), as SAELens's ``process_sae_in`` computes it."""
    x = sae.run_time_activation_norm_fn_in(sae_in)
    return x - sae.b_dec * sae.cfg.apply_b_dec_to_input


@torch.no_grad()
def collect(sae: Any, splicer: Splicer, spec: EvaluationSpec, *, progress: bool) -> Collected:
    """Stream the splicer's tokens through its model up to its hook and through ``sae`` once;
    see the module doc. ``spec`` says whether the SAE has groups or a scaffold hook."""
    toks = splicer.tokens
    rows, T = toks.shape
    special = special_token_mask(toks, splicer.special_ids)
    kept = ~special if special is not None else torch.ones_like(toks, dtype=torch.bool)
    d_sae, d_in = int(sae.cfg.d_sae), int(sae.cfg.d_in)
    r = spec.group_rank
    scaffold = spec.ablation_hook
    counts: tuple[torch.Tensor, torch.Tensor] | None = None
    abs_sum = torch.zeros(d_sae, dtype=torch.float64)
    group_counts = torch.zeros(d_sae // r, dtype=torch.float64) if r else None
    pos_parts: list[torch.Tensor] = []
    lat_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    share = torch.full((rows * T,), float("nan")) if scaffold else None
    gram = torch.zeros(d_in, d_in, dtype=torch.float64) if scaffold else None
    energy = [0.0, 0.0]
    n_codes = 0

    # every position comes back (special_ids=()), so positions map to rows; `kept` drops them
    batches = stream_activations(
        splicer.model, splicer.hook, toks, batch_size=splicer.batch_size,
        head_index=splicer.head_index, special_ids=(), progress=False,
    )  # fmt: skip
    n_batches = len(token_batches(toks, splicer.batch_size))
    for start, x in tqdm(
        zip(range(0, rows, splicer.batch_size), batches),
        total=n_batches, desc="dashboard: activations", disable=not progress,
    ):  # fmt: skip
        keep = kept[start : start + splicer.batch_size].reshape(-1)
        flat_pos = (torch.arange(keep.numel()) + start * T)[keep]
        xk = x[keep.to(x.device)]
        if xk.shape[0] == 0:
            continue
        grabbed: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: Any, grabbed: dict[str, torch.Tensor] = grabbed) -> None:
            grabbed[hook.name] = act.detach()

        hooks = [(scaffold, grab), ("hook_sae_input", grab)] if scaffold else []
        with sae.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():
            feats, _ = encode_decode(sae, xk)
        feats = feats.detach().float().cpu()
        counts = accumulate_sign_counts(feats, counts)
        abs_sum += feats.abs().sum(0, dtype=torch.float64)
        if group_counts is not None and r:
            group_counts += group_firing_counts(feats, r)
        t, lat = feats.nonzero(as_tuple=True)
        n_codes += t.numel()
        if n_codes > MAX_STORED_CODES:
            n_seen = start * T + keep.numel()
            raise ValueError(
                f"the SAE's codes hold {n_codes:,} non-zeros after {n_seen:,} positions (L0 ≈ "
                f"{n_codes / max(1, int(kept.view(-1)[:n_seen].sum())):.0f}), more than the "
                f"dashboard keeps ({MAX_STORED_CODES:,}); pass fewer tokens"
            )
        pos_parts.append(flat_pos[t])
        lat_parts.append(lat)
        val_parts.append(feats[t, lat])
        if scaffold and share is not None and gram is not None:
            s = grabbed[scaffold].reshape(-1, d_in).double().cpu()
            xt = _processed_input(sae, grabbed["hook_sae_input"]).reshape(-1, d_in).double().cpu()
            s2, x2 = s.pow(2).sum(-1), xt.pow(2).sum(-1)
            share[flat_pos] = (s2 / x2.clamp_min(1e-30)).float()
            energy[0] += float(s2.sum())
            energy[1] += float(x2.sum())
            gram += s.T @ s

    pos = torch.cat(pos_parts) if pos_parts else torch.empty(0, dtype=torch.long)
    lat = torch.cat(lat_parts) if lat_parts else torch.empty(0, dtype=torch.long)
    val = torch.cat(val_parts) if val_parts else torch.empty(0)
    order = torch.argsort(lat * (rows * T) + pos)
    pos, lat, val = pos[order], lat[order], val[order]
    starts = torch.zeros(d_sae + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(torch.bincount(lat, minlength=d_sae), 0)
    if counts is None:
        counts = (torch.zeros(d_sae, dtype=torch.long), torch.zeros(d_sae, dtype=torch.long))
    return Collected(
        tokens=toks, kept=kept, n_tokens=int(kept.sum()), pos=pos, latent=lat, value=val,
        starts=starts, pos_counts=counts[0], neg_counts=counts[1], abs_sum=abs_sum,
        group_counts=group_counts, spec=spec,
        scaffold_share=share.view(rows, T) if share is not None else None,
        scaffold_energy=(energy[0], energy[1]) if scaffold else None, scaffold_gram=gram,
    )  # fmt: skip


@dataclass
class UnitStats:
    """Per-unit table of the index: a unit is a latent, or a group for grouped SAEs."""

    kind: str
    """``"latent"`` or ``"group"``."""
    firing_rate: torch.Tensor
    mean_abs: torch.Tensor
    """Mean |activation| (groups: mean code norm ‖f_k‖) over the tokens on which the unit fires."""
    activity: torch.Tensor
    """Mean |activation| (groups: ‖f_k‖) over all kept tokens = firing rate × ``mean_abs``."""
    dead: torch.Tensor
    dense: torch.Tensor
    positive_share: torch.Tensor | None = None
    bipolar: torch.Tensor | None = None
    stable_rank: torch.Tensor | None = None
    rank90: torch.Tensor | None = None

    @property
    def bipolar_share(self) -> torch.Tensor | None:
        """Share of a latent's firings on its rarer sign, ``min(p, 1 − p)`` of the positive share
        ``p`` (what ``bipolar_mask`` thresholds); NaN for dead latents."""
        if self.positive_share is None:
            return None
        return torch.minimum(self.positive_share, 1 - self.positive_share)

    def __len__(self) -> int:
        return int(self.firing_rate.numel())


def _group_norm_sums(c: Collected, r: int) -> torch.Tensor:
    """Per group: Σ over kept tokens of the code norm ‖f_k‖."""
    k = c.latent // r
    n_pos = c.tokens.numel()
    key = k * n_pos + c.pos
    uniq, inv = torch.unique(key, return_inverse=True)
    sq = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, c.value.double() ** 2)
    out = torch.zeros(int(c.starts.numel() - 1) // r, dtype=torch.float64)
    return out.index_add_(0, uniq // n_pos, sq.sqrt())


def unit_stats(sae: Any, c: Collected) -> UnitStats:
    """Index statistics from a :class:`Collected` pass, with the package's metric definitions
    (:mod:`~sae_ext.metrics.sign`, :mod:`~sae_ext.metrics.dense`, :mod:`~sae_ext.metrics.groups`)."""
    n = c.n_tokens
    r = c.spec.group_rank
    if r and c.group_counts is not None:
        fires = c.group_counts
        norm_sum = _group_norm_sums(c, r)
        blocks = c.spec.group_blocks
        return UnitStats(
            kind="group", firing_rate=firing_rates(fires, n),
            mean_abs=torch.where(fires > 0, norm_sum / fires.clamp_min(1), torch.nan),
            activity=norm_sum / n, dead=fires == 0, dense=dense_mask(fires, n),
            stable_rank=stable_rank(blocks) if blocks is not None else None,
            rank90=rank90(blocks) if blocks is not None else None,
        )  # fmt: skip
    fires = (c.pos_counts + c.neg_counts).double()
    signed = bool(c.neg_counts.sum() > 0) or bool(getattr(sae.cfg, "two_sided", False))
    return UnitStats(
        kind="latent", firing_rate=firing_rates(fires, n),
        mean_abs=torch.where(fires > 0, c.abs_sum / fires.clamp_min(1), torch.nan),
        activity=c.abs_sum / n, dead=fires == 0, dense=dense_mask(fires, n),
        positive_share=positive_share(c.pos_counts, c.neg_counts) if signed else None,
        bipolar=bipolar_mask(c.pos_counts, c.neg_counts) if signed else None,
    )  # fmt: skip


RANK_BY = ("activity", "firing_rate", "bipolar")


def rank_units(stats: UnitStats, top: int, rank_by: str) -> list[int]:
    """The ``top`` alive units by ``rank_by``: ``activity`` (mean |activation| over all tokens),
    ``firing_rate``, or ``bipolar`` (bipolar share, then activity; without signed latents every
    share is 0 and this is the activity order)."""
    idx = torch.nonzero(~stats.dead).flatten()
    if rank_by == "firing_rate":
        keys = [stats.firing_rate]
    elif rank_by == "bipolar" and stats.bipolar_share is not None:
        keys = [stats.activity, stats.bipolar_share]  # bipolar share first, activity breaks ties
    else:
        keys = [stats.activity]
    order = idx
    for key in keys:  # stable sorts from the least to the most significant key
        order = order[torch.argsort(key[order].double(), descending=True, stable=True)]
    return [int(i) for i in order[:top]]


def iter_contexts(
    c: Collected, pos: torch.Tensor, left: int, right: int
) -> Iterator[tuple[int, int, int, int]]:
    """For each flat position: (row, position, window start, window end) within its row."""
    T = c.tokens.shape[1]
    for p in pos.tolist():
        row, q = divmod(int(p), T)
        yield row, q, max(0, q - left), min(T, q + right + 1)
