"""SAELens's ``run_evals`` on pretokenized rows at any hook: the activation store, the full
metric set (:func:`loss_recovered`) and its typed result (SPEC §5).

``run_evals`` reads the hook from ``sae.cfg.metadata.hook_name``; it is handed a view of the
SAE naming the canonical hook (:func:`sae_ext.sae_io.sae_at_hook`), never a mutated SAE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from sae_ext.model_io import (
    SpecialTokens,
    activation_width,
    check_tokens,
    input_device,
    resolve_hook_name,
    special_token_ids,
)
from sae_ext.sae_io import sae_at_hook, sae_hook_name, sae_with_metadata

__all__ = [
    "RunEvalsMetrics",
    "loss_recovered",
    "make_activations_store",
    "run_evals_metrics",
    "run_evals_validated",
]


@dataclass
class RunEvalsMetrics:
    """SAELens ``run_evals`` metrics under SAELens's names (NaN where not computed)."""

    ce_loss_score: float = math.nan
    """CE loss recovered: ``(CE_zero-abl − CE_sae) / (CE_zero-abl − CE_clean)``."""
    ce_loss_without_sae: float = math.nan
    ce_loss_with_sae: float = math.nan
    ce_loss_with_ablation: float = math.nan
    kl_div_score: float = math.nan
    """``(KL_zero-abl − KL_sae) / KL_zero-abl``."""
    kl_div_with_sae: float = math.nan
    kl_div_with_ablation: float = math.nan
    explained_variance: float = math.nan
    explained_variance_legacy: float = math.nan
    mse: float = math.nan
    cossim: float = math.nan
    l0: float = math.nan
    l1: float = math.nan
    l2_norm_in: float = math.nan
    l2_norm_out: float = math.nan
    l2_ratio: float = math.nan
    relative_reconstruction_bias: float = math.nan
    total_tokens_eval_reconstruction: int = 0
    total_tokens_eval_sparsity_variance: int = 0

    @classmethod
    def from_flat(cls, flat: dict[str, float]) -> RunEvalsMetrics:
        """From ``run_evals``'s metric groups flattened into one dict (unknown keys ignored)."""
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        kw = {k: (int(v) if names[k] == "int" else float(v)) for k, v in flat.items() if k in names}
        return cls(**kw)

    def with_loss_recovered(
        self, *, ce_clean: float, ce_sae: float, ce_zero: float, kl_sae: float, kl_zero: float
    ) -> RunEvalsMetrics:
        """A copy with the CE/KL fields and scores set as ``run_evals`` computes them."""
        return dataclasses.replace(
            self,
            ce_loss_without_sae=ce_clean,
            ce_loss_with_sae=ce_sae,
            ce_loss_with_ablation=ce_zero,
            ce_loss_score=(ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else math.nan,
            kl_div_with_sae=kl_sae,
            kl_div_with_ablation=kl_zero,
            kl_div_score=(kl_zero - kl_sae) / kl_zero if kl_zero else math.nan,
        )

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def make_activations_store(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    hook_name: str | None = None,
    batch_size_prompts: int = 8,
    device: str | torch.device | None = None,
) -> Any:
    """A SAELens ``ActivationsStore`` (``ActivationsStore.from_sae``) over pretokenized rows (a
    tensor, lists or a tokenized ``Dataset``) at the SAE's hook, as ``run_evals`` needs. The
    context size is the row length; the caller's dataset is copied, never mutated."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    toks = check_tokens(model, tokens)
    hook = resolve_hook_name(model, sae_hook_name(sae, hook_name))
    if batch_size_prompts < 1:
        raise ValueError(f"batch_size_prompts must be >= 1, got {batch_size_prompts}")
    # from_sae requires prepend_bos, which pretokenized rows ignore
    bos = {} if sae.cfg.metadata.prepend_bos is not None else {"prepend_bos": False}
    view = sae_with_metadata(sae, hook_name=hook, **bos)
    ds = Dataset.from_dict({"input_ids": toks.tolist()})
    return ActivationsStore.from_sae(
        model,
        view,
        ds,
        context_size=int(toks.shape[1]),
        streaming=False,
        store_batch_size_prompts=min(batch_size_prompts, toks.shape[0]),
        n_batches_in_buffer=2,
        train_batch_size_tokens=min(4096, toks.numel()),
        total_tokens=len(ds),
        device=str(torch.device(device) if device is not None else input_device(model)),
    )


def _row_batch(n_rows: int, batch_size: int) -> int:
    """The largest batch ≤ ``batch_size`` that divides ``n_rows``: ``run_evals`` then reads
    every row exactly once."""
    return max(b for b in range(1, min(batch_size, n_rows) + 1) if n_rows % b == 0)


def run_evals_validated(
    model: Any,
    sae: Any,
    toks: torch.Tensor,
    hook: str,
    special_ids: tuple[int, ...],
    *,
    batch_size_prompts: int,
    loss: bool,
    progress: bool,
) -> RunEvalsMetrics:
    """:func:`run_evals_metrics` on validated inputs (checked rows, canonical hook whose width
    is the SAE's ``d_in``, resolved special ids)."""
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    bs = _row_batch(toks.shape[0], batch_size_prompts)
    n_batches = toks.shape[0] // bs
    store = make_activations_store(model, sae, toks, hook_name=hook, batch_size_prompts=bs)
    cfg = EvalConfig(
        batch_size_prompts=bs,
        n_eval_reconstruction_batches=n_batches if loss else 0,
        n_eval_sparsity_variance_batches=n_batches,
        compute_kl=loss,
        compute_ce_loss=loss,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(
        sae_at_hook(sae, hook),
        store,
        model,
        ActivationScaler(),
        cfg,
        exclude_special_tokens=list(special_ids) if special_ids else False,
        verbose=progress,
    )
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    return RunEvalsMetrics.from_flat(flat)


def run_evals_metrics(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    hook_name: str | None = None,
    special_tokens: SpecialTokens = None,
    batch_size_prompts: int = 8,
    loss: bool = True,
    progress: bool = False,
) -> RunEvalsMetrics:
    """SAELens ``run_evals`` on every row of ``tokens`` (batches of the largest size ≤
    ``batch_size_prompts`` dividing the row count). ``loss=False`` skips its three CE/KL forwards
    per batch and keeps the reconstruction, sparsity and norm metrics (one partial forward).
    Special positions (see :func:`sae_ext.model_io.special_token_ids`) are excluded."""
    toks = check_tokens(model, tokens)
    hook = resolve_hook_name(model, sae_hook_name(sae, hook_name))
    ids = special_token_ids(model, special_tokens)
    if batch_size_prompts < 1:
        raise ValueError(f"batch_size_prompts must be >= 1, got {batch_size_prompts}")
    width = activation_width(model, hook, toks, sae.cfg.metadata.hook_head_index)
    if width != sae.cfg.d_in:
        raise ValueError(
            f"the activation at {hook!r} has width {width} but the SAE's d_in is {sae.cfg.d_in}"
        )
    return run_evals_validated(
        model, sae, toks, hook, ids, batch_size_prompts=batch_size_prompts, loss=loss, progress=progress
    )


def loss_recovered(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    hook_name: str | None = None,
    special_tokens: SpecialTokens = None,
    batch_size_prompts: int = 8,
    progress: bool = False,
) -> RunEvalsMetrics:
    """SAELens ``run_evals`` metrics: ``ce_loss_score`` (CE loss recovered), ``kl_div_score``,
    the CE/KL with SAE / without / zero-ablated, ``explained_variance``, ``mse``, ``cossim``,
    ``l0``, ``l1``, L2 ratios and the token counts, on every row of ``tokens``."""
    return run_evals_metrics(
        model,
        sae,
        tokens,
        hook_name=hook_name,
        special_tokens=special_tokens,
        batch_size_prompts=batch_size_prompts,
        progress=progress,
    )
