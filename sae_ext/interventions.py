"""The named interventions of an SAE evaluation, their results, and the public measurement
functions (SPEC §4–§5): dark-matter CE splices, error-node ablation, SAE-internal hook ablation
(the scaffold), subspace removal (top-r PCA), the zero ablation of loss recovered.

Each public function builds one :class:`~sae_ext.splicer.Splicer` (validation once) and one
:meth:`~sae_ext.splicer.Splicer.measure` call; :func:`sae_ext.evaluate.evaluate_sae` puts the same
interventions into a single call, so every forward runs once per batch. Special positions are
left unspliced everywhere (see :mod:`sae_ext.splicer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from sae_ext.metrics.dark_matter import linear_error
from sae_ext.metrics.pca import orthonormal_basis, remove_top_pca_directions
from sae_ext.model_io import SpecialTokens
from sae_ext.sae_io import check_sae_hook_names
from sae_ext.splicer import Intervention, Meter, Splicer

__all__ = [
    "SPLICE_MODES",
    "DarkMatterCE",
    "DirectionRemoval",
    "ErrorNodeAblation",
    "HookAblation",
    "ablate_hook",
    "dark_matter_ce",
    "error_node_ablation",
    "mean_sae_error",
    "remove_directions_ce",
    "run_spliced",
    "splice_ce",
]

SpliceMode = Literal["clean", "sae", "sae+linear", "sae+nonlinear"]
SPLICE_MODES: tuple[str, ...] = ("clean", "sae", "sae+linear", "sae+nonlinear")
HookFn = Any

# --------------------------------------------------------------------------------------------
# interventions
# --------------------------------------------------------------------------------------------

#: The plain splice ``SAE(x)``: the reference "with SAE" of every report.
SAE = Intervention.splice("sae", compare_to=("clean",))
#: The activation zeroed at every position (the ``run_evals`` zero ablation of loss recovered).
ZERO_ABLATION = Intervention.edit_activation(
    "zero_ablation", torch.zeros_like, all_positions=True, compare_to=("clean",)
)
#: The SAE with its error term: must reproduce the clean logits.
ERROR_TERM = Intervention.splice("error_term", use_error_term=True, compare_to=("clean",))


def check_W(W: Any, d_in: int) -> torch.Tensor:
    """``W`` if it is a finite ``[d_in(+1), d_in]`` tensor (:attr:`DarkMatterResult.W`)."""
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a tensor [d_in(+1), d_in], got {type(W).__name__}")
    if W.ndim != 2 or W.shape[1] != d_in or W.shape[0] not in (d_in, d_in + 1):
        raise ValueError(
            f"W has shape {tuple(W.shape)}; for sae.cfg.d_in = {d_in} it must be "
            f"[{d_in}, {d_in}] or [{d_in + 1}, {d_in}] (DarkMatterResult.W)"
        )
    bad = int((~torch.isfinite(W)).sum().item())
    if bad:
        raise ValueError(f"W contains {bad} non-finite value(s) (NaN/Inf)")
    return W


def linear_error_splice(W: torch.Tensor) -> Intervention:
    """``SAE(x) + x W*``: the SAE plus its linearly predictable error."""
    return Intervention.splice("sae+linear", transform=lambda x, out: out + linear_error(x, W))


def nonlinear_error_splice(W: torch.Tensor) -> Intervention:
    """``SAE(x) + (e − x W*)``: the SAE plus the error ``x W*`` does not predict."""
    return Intervention.splice(
        "sae+nonlinear", transform=lambda x, out: out + ((x - out) - linear_error(x, W))
    )


def error_ablation(mode: Literal["zero", "mean"], mean_error: torch.Tensor | None = None) -> Intervention:
    """The SAE with its error term, ``hook_sae_error`` replaced by 0 or by ``mean_error``."""
    if mode == "zero":

        def ablate(err: torch.Tensor, hook: Any) -> torch.Tensor:
            return torch.zeros_like(err)
    else:
        assert mean_error is not None

        def ablate(err: torch.Tensor, hook: Any) -> torch.Tensor:
            return mean_error.to(device=err.device, dtype=err.dtype).expand_as(err).clone()

    return Intervention.splice(
        f"error_{mode}",
        use_error_term=True,
        sae_hooks=[("hook_sae_error", ablate)],
        compare_to=("clean", "sae"),
    )


def hook_ablation(sae_hook: str, *, use_error_term: bool = True) -> Intervention:
    """The SAE spliced with its hook point ``sae_hook`` zeroed."""

    def zero(t: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(t)

    return Intervention.splice(
        f"zero {sae_hook}",
        use_error_term=use_error_term,
        sae_hooks=[(sae_hook, zero)],
        compare_to=("clean",),
    )


def subspace_removal(q: torch.Tensor, center: torch.Tensor | None = None) -> Intervention:
    """``x − ((x − c) Q) Qᵀ`` in float64 for an orthonormal ``Q`` ``[d, r]``."""

    def remove(x: torch.Tensor) -> torch.Tensor:
        return remove_top_pca_directions(x.double(), q, center).to(x.dtype)

    return Intervention.edit_activation("remove_directions", remove, compare_to=("clean",))


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _pct_recovered(ce_sae: float, ce_setting: float, ce_clean: float) -> float:
    denom = ce_sae - ce_clean
    return (ce_sae - ce_setting) / denom * 100.0 if denom != 0 else float("nan")


@dataclass
class DarkMatterCE:
    """CE of the dark-matter splices and the share of the SAE's CE gap each one closes."""

    ce_clean: float
    ce_sae: float
    ce_sae_linear: float
    ce_sae_nonlinear: float
    pct_recovered_linear: float
    """``(CE_sae − CE_sae+linear) / (CE_sae − CE_clean) · 100``."""
    pct_recovered_nonlinear: float
    n_tokens: int

    @classmethod
    def from_meters(cls, m: dict[str, Meter]) -> DarkMatterCE:
        clean, sae = m["clean"].ce, m["sae"].ce
        lin, nonlin = m["sae+linear"].ce, m["sae+nonlinear"].ce
        return cls(
            ce_clean=clean,
            ce_sae=sae,
            ce_sae_linear=lin,
            ce_sae_nonlinear=nonlin,
            pct_recovered_linear=_pct_recovered(sae, lin, clean),
            pct_recovered_nonlinear=_pct_recovered(sae, nonlin, clean),
            n_tokens=m["clean"].ce_n,
        )

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class ErrorNodeAblation:
    """CE/KL with the SAE's error node zero- or mean-ablated, vs the clean model and the plain splice."""

    mode: str
    ce_clean: float
    ce_spliced: float
    """With the error term: must equal ``ce_clean`` up to float tolerance."""
    ce_sae: float
    """Plain splice ``SAE(x)`` (no error term)."""
    ce_ablated: float
    delta_ce_vs_clean: float
    delta_ce_vs_sae: float
    kl_sae_vs_clean: float
    kl_ablated_vs_clean: float
    kl_ablated_vs_sae: float
    max_abs_logit_diff_spliced: float
    """``max |logits(spliced with error term) − logits(clean)|``: the reproduction check."""
    n_tokens: int

    @classmethod
    def from_meters(cls, mode: str, m: dict[str, Meter]) -> ErrorNodeAblation:
        clean, abl = m["clean"].ce, m[f"error_{mode}"]
        return cls(
            mode=mode,
            ce_clean=clean,
            ce_spliced=m["error_term"].ce,
            ce_sae=m["sae"].ce,
            ce_ablated=abl.ce,
            delta_ce_vs_clean=abl.ce - clean,
            delta_ce_vs_sae=abl.ce - m["sae"].ce,
            kl_sae_vs_clean=m["sae"].kl("clean"),
            kl_ablated_vs_clean=abl.kl("clean"),
            kl_ablated_vs_sae=abl.kl("sae"),
            max_abs_logit_diff_spliced=m["error_term"].max_abs_diff("clean"),
            n_tokens=m["clean"].ce_n,
        )

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass
class HookAblation:
    """CE with an SAE-internal hook zeroed while the SAE is spliced."""

    sae_hook: str
    use_error_term: bool
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    ce_ratio: float
    """``CE_ablated / CE_clean`` (the scaffold paper's "×" numbers)."""
    ce_increase: float
    kl_ablated_vs_clean: float
    n_tokens: int

    @classmethod
    def from_meters(cls, sae_hook: str, use_error_term: bool, m: dict[str, Meter]) -> HookAblation:
        clean, abl = m["clean"].ce, m[f"zero {sae_hook}"]
        return cls(
            sae_hook=sae_hook,
            use_error_term=use_error_term,
            ce_clean=clean,
            ce_spliced=m[ERROR_TERM.name if use_error_term else SAE.name].ce,
            ce_ablated=abl.ce,
            ce_ratio=abl.ce / clean if clean else float("nan"),
            ce_increase=abl.ce - clean,
            kl_ablated_vs_clean=abl.kl("clean"),
            n_tokens=m["clean"].ce_n,
        )

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


@dataclass
class DirectionRemoval:
    """CE with a subspace projected out of the activation at one hook."""

    hook_name: str
    rank: int
    ce_clean: float
    ce_removed: float
    ce_ratio: float
    """``CE_removed / CE_clean``."""
    ce_increase: float
    kl_removed_vs_clean: float
    n_tokens: int

    @classmethod
    def from_meters(cls, hook_name: str, rank: int, m: dict[str, Meter]) -> DirectionRemoval:
        clean, rem = m["clean"].ce, m["remove_directions"]
        return cls(
            hook_name=hook_name,
            rank=rank,
            ce_clean=clean,
            ce_removed=rem.ce,
            ce_ratio=rem.ce / clean if clean else float("nan"),
            ce_increase=rem.ce - clean,
            kl_removed_vs_clean=rem.kl("clean"),
            n_tokens=m["clean"].ce_n,
        )

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# public measurement functions
# --------------------------------------------------------------------------------------------


def _splicer(model: Any, sae: Any, tokens: Any, hook_name: str | None, special_tokens: SpecialTokens,
             batch_size: int, progress: bool) -> Splicer:  # fmt: skip
    return Splicer(
        model,
        sae,
        tokens,
        hook_name=hook_name,
        special_tokens=special_tokens,
        batch_size=batch_size,
        progress=progress,
    )


@torch.no_grad()
def run_spliced(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    use_error_term: bool = True,
    sae_hooks: Sequence[tuple[str, HookFn]] = (),
    hook_name: str | None = None,
    special_tokens: SpecialTokens = None,
) -> torch.Tensor:
    """Logits of ``model`` on ``tokens`` (one forward) with ``sae`` spliced in at its hook.

    ``use_error_term=True`` adds the SAE error back (``hook_sae_error``), so the output equals
    the clean model's up to float tolerance. ``sae_hooks`` are ``(name, fn)`` pairs on the SAE's
    own hook points (``"hook_sae_error"``, ``"hook_sae_acts_post"``, ``"hook_scaffold"``, …).
    Special positions are left unspliced.
    """
    splicer = _splicer(model, sae, tokens, hook_name, special_tokens, 1, False)
    iv = Intervention.splice("run", use_error_term=use_error_term, sae_hooks=sae_hooks)
    splicer.check([iv])
    return splicer.forward(iv, splicer.tokens)


def splice_ce(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    mode: SpliceMode = "sae",
    W: torch.Tensor | None = None,
    hook_name: str | None = None,
    special_tokens: SpecialTokens = None,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean CE with the activation at the SAE's hook replaced according to ``mode``.

    ``"clean"``: untouched; ``"sae"``: ``SAE(x)``; ``"sae+linear"``: ``SAE(x) + x W*``;
    ``"sae+nonlinear"``: ``SAE(x) + (e - x W*)``. ``W`` is :attr:`DarkMatterResult.W`.
    """
    if mode not in SPLICE_MODES:
        raise ValueError(f"mode must be one of {SPLICE_MODES}, got {mode!r}")
    if mode in ("sae+linear", "sae+nonlinear"):
        if W is None:
            raise ValueError(f"mode {mode!r} needs W (the fitted map of dark_matter())")
        W = check_W(W, sae.cfg.d_in)
    splicer = _splicer(model, sae, tokens, hook_name, special_tokens, batch_size, progress)
    ivs = {
        "clean": [],
        "sae": [SAE],
        "sae+linear": [linear_error_splice(W)] if W is not None else [],
        "sae+nonlinear": [nonlinear_error_splice(W)] if W is not None else [],
    }[mode]
    return splicer.measure(ivs, desc=f"CE ({mode})")[mode].ce


def dark_matter_ce(
    model: Any,
    sae: Any,
    tokens: Any,
    W: torch.Tensor,
    *,
    hook_name: str | None = None,
    special_tokens: SpecialTokens = None,
    batch_size: int = 8,
    progress: bool = True,
) -> DarkMatterCE:
    """CE of clean / ``SAE(x)`` / ``SAE(x)+linear error`` / ``SAE(x)+nonlinear error`` (SPEC §4)."""
    W = check_W(W, sae.cfg.d_in)
    splicer = _splicer(model, sae, tokens, hook_name, special_tokens, batch_size, progress)
    ivs = [SAE, linear_error_splice(W), nonlinear_error_splice(W)]
    return DarkMatterCE.from_meters(splicer.measure(ivs, desc="dark-matter CE"))


def mean_sae_error(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    hook_name: str | None = None,
    special_tokens: SpecialTokens = None,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Mean SAE error ``E[x − SAE(x)]`` over the non-special positions of ``tokens`` (float32 ``[d_in]``)."""
    return _splicer(model, sae, tokens, hook_name, special_tokens, batch_size, progress).mean_sae_error()


def check_mean_error(mean_error: torch.Tensor, d_in: int) -> torch.Tensor:
    """``mean_error`` if it is a finite ``[d_in]`` tensor."""
    if not isinstance(mean_error, torch.Tensor) or tuple(mean_error.shape) != (d_in,):
        raise ValueError(
            f"mean_error has shape {tuple(getattr(mean_error, 'shape', ()))}, expected ({d_in},)"
        )
    if not bool(torch.isfinite(mean_error).all()):
        raise ValueError("mean_error contains non-finite values (NaN/Inf)")
    return mean_error


def error_node_ablation(
    model: Any,
    sae: Any,
    tokens: Any,
    mode: Literal["zero", "mean"] = "zero",
    *,
    hook_name: str | None = None,
    mean_error: torch.Tensor | None = None,
    special_tokens: SpecialTokens = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ErrorNodeAblation:
    """Splice the SAE with its error term and zero- or mean-ablate ``hook_sae_error`` (SPEC §5).

    ``mode="mean"`` replaces the error by its mean over the non-special positions of ``tokens``
    (or by ``mean_error`` if given).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mean_error is not None:
        check_mean_error(mean_error, sae.cfg.d_in)
    splicer = _splicer(model, sae, tokens, hook_name, special_tokens, batch_size, progress)
    if mode == "mean" and mean_error is None:
        mean_error = splicer.mean_sae_error()
    ivs = [SAE, ERROR_TERM, error_ablation(mode, mean_error)]
    return ErrorNodeAblation.from_meters(mode, splicer.measure(ivs, desc=f"error node ({mode})"))


def ablate_hook(
    model: Any,
    sae: Any,
    tokens: Any,
    sae_hook: str = "hook_scaffold",
    *,
    use_error_term: bool = True,
    hook_name: str | None = None,
    special_tokens: SpecialTokens = None,
    batch_size: int = 8,
    progress: bool = True,
) -> HookAblation:
    """Zero the SAE's hook point ``sae_hook`` while the SAE is spliced and report the CE.

    With ``use_error_term=True`` (default) the error node is computed from the un-ablated SAE,
    so the model sees ``x`` minus the ablated component only — for ``hook_scaffold`` that is
    ``x − s``, directly comparable with :func:`remove_directions_ce` on the top-r PCA basis.
    """
    check_sae_hook_names(sae, [sae_hook])
    splicer = _splicer(model, sae, tokens, hook_name, special_tokens, batch_size, progress)
    spliced = ERROR_TERM if use_error_term else SAE
    ivs = [spliced, hook_ablation(sae_hook, use_error_term=use_error_term)]
    return HookAblation.from_meters(sae_hook, use_error_term, splicer.measure(ivs, desc=f"ablate {sae_hook}"))


def subspace_basis(basis: torch.Tensor, center: torch.Tensor | None, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal float64 ``Q`` of ``basis`` and the float64 centre, checked against width ``d``."""
    q = orthonormal_basis(basis, d)
    if center is None:
        return q, None
    c = center.detach().double().reshape(-1)
    if c.shape != (d,):
        raise ValueError(f"center has {c.numel()} values but the activation width is {d}")
    return q, c


def remove_directions_ce(
    model: Any,
    hook_name: str,
    basis: torch.Tensor,
    tokens: Any,
    *,
    center: torch.Tensor | None = None,
    special_tokens: SpecialTokens = None,
    batch_size: int = 8,
    progress: bool = True,
) -> DirectionRemoval:
    """CE after projecting the span of ``basis`` ``[d, r]`` out of the activation at ``hook_name``.

    ``x ← x − ((x − c) Q) Qᵀ`` at non-special positions, with ``Q`` an orthonormal basis of the
    columns (QR) and ``c`` = ``center`` (default 0). Use
    :func:`sae_ext.metrics.pca.top_pca_basis` for the top-r PCA directions.
    """
    splicer = _splicer(model, None, tokens, hook_name, special_tokens, batch_size, progress)
    q, c = subspace_basis(basis, center, splicer.width)
    meters = splicer.measure([subspace_removal(q, c)], desc="remove directions")
    return DirectionRemoval.from_meters(splicer.hook, int(q.shape[1]), meters)
