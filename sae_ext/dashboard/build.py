"""``build_dashboard``: validate, run the one streaming pass, write the pages; the
``sae-ext dashboard`` command and the demo's dashboards."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_ext.dashboard.collect import RANK_BY, UnitStats, collect, rank_units, unit_stats
from sae_ext.dashboard.html import circuitsvis_js
from sae_ext.dashboard.pages import (
    PageContext,
    TokenText,
    group_page,
    index_page,
    latent_page,
    scaffold_page,
    unit_href,
)
from sae_ext.evaluation_spec import evaluation_spec
from sae_ext.model_io import SpecialTokens, as_token_tensor, special_token_mask
from sae_ext.splicer import Splicer

__all__ = [
    "DEFAULT_DASHBOARD_TOKENS",
    "DEMO_DASHBOARD_ARCHITECTURES",
    "Dashboard",
    "add_dashboard_arguments",
    "build_dashboard",
    "run_dashboard_command",
    "write_demo_dashboard",
]

DEFAULT_DASHBOARD_TOKENS = 16_384
DEFAULT_TOP = 24
#: Demo entries that get a dashboard (by training architecture).
DEMO_DASHBOARD_ARCHITECTURES = ("sign_aware_gated", "sasa")


@dataclass
class Dashboard:
    """Where :func:`build_dashboard` wrote what."""

    out_dir: Path
    index: Path
    kind: str
    """``"latent"``, or ``"group"`` for grouped SAEs (``cfg.group_rank``)."""
    pages: dict[int, Path] = field(default_factory=dict)
    """Unit id -> its page."""
    scaffold: Path | None = None
    n_tokens: int = 0
    """Tokens counted (special tokens excluded)."""
    stats: UnitStats | None = None


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _summary(
    sae: Any, model: Any, hook: str, stats: UnitStats, n_tokens: int, toks: torch.Tensor
) -> list[tuple[str, str]]:
    arch = sae.cfg.architecture()
    n_alive = int((~stats.dead).sum())
    rows = [
        ("architecture", arch),
        ("hook", hook),
        ("model", type(model).__name__),
        ("d_in / d_sae", f"{sae.cfg.d_in} / {sae.cfg.d_sae}"),
        (
            "tokens (special tokens excluded)",
            f"{n_tokens:,} of {toks.numel():,} in {toks.shape[0]} rows",
        ),
        (f"L0 ({stats.kind}s firing per token)", f"{float(stats.firing_rate.sum()):.2f}"),
        (f"dead / dense {stats.kind}s", f"{int(stats.dead.sum())} / {int(stats.dense.sum())}"),
    ]
    if stats.bipolar is not None:
        rows.append(
            (
                "bipolar latents (share of alive)",
                f"{int(stats.bipolar.sum())} ({int(stats.bipolar.sum()) / max(n_alive, 1):.3f})",
            )
        )
    r = evaluation_spec(sae).group_rank
    if r:
        rows.append(("group rank r / groups", f"{r} / {sae.cfg.d_sae // r}"))
    return rows


def _stats_json(stats: UnitStats, selected: list[int]) -> dict[str, Any]:
    def col(t: torch.Tensor | None) -> list[Any] | None:
        if t is None:
            return None
        return [None if (isinstance(v, float) and math.isnan(v)) else v for v in t.tolist()]

    return {
        "kind": stats.kind,
        "pages": selected,
        "firing_rate": col(stats.firing_rate),
        "mean_abs": col(stats.mean_abs),
        "activity": col(stats.activity),
        "dead": col(stats.dead),
        "dense": col(stats.dense),
        "positive_share": col(stats.positive_share),
        "bipolar": col(stats.bipolar),
        "stable_rank": col(stats.stable_rank),
        "rank90": col(stats.rank90),
    }


@torch.no_grad()
def build_dashboard(
    sae: Any,
    model: Any,
    token_rows: Any,
    *,
    out_dir: str | Path,
    latents: Sequence[int] | None = None,
    top: int = DEFAULT_TOP,
    rank_by: str = "activity",
    n_tokens: int | None = None,
    hook_name: str | None = None,
    n_contexts: int = 10,
    context_left: int = 16,
    context_right: int = 4,
    n_logit_tokens: int = 10,
    batch_size: int = 8,
    special_tokens: SpecialTokens = None,
    progress: bool = True,
) -> Dashboard:
    """Write an offline HTML dashboard of ``sae`` on ``model`` to ``out_dir``.

    ``token_rows``: token ids ``[rows, context]`` (tensor, lists or a tokenized ``Dataset``);
    ``n_tokens`` keeps the fewest leading rows holding that many. One streaming pass (tqdm)
    encodes every non-special token; then ``index.html`` lists every latent (firing rate, mean
    |activation|, positive and bipolar share, dead / dense / bipolar flags; sortable) and a page
    is written for each of ``latents``, or else for the ``top`` alive latents by ``rank_by``
    (``activity``, ``firing_rate`` or ``bipolar``). SAEs whose evaluation spec
    (:mod:`sae_ext.evaluation_spec`) names groups (SASA) get one page per group instead, and
    ``latents`` are group ids; those naming an ablation hook (the scaffold) get
    ``scaffold.html``. Positions
    holding a special token (``special_tokens``: by default the model tokenizer's, see
    :func:`sae_ext.model_io.special_token_ids`) enter no statistic and are never a top context.
    Pages inline circuitsvis's JS and need no network.
    Works for any SAE registered with SAELens, on HookedSAETransformer and on bridges.
    """
    for name, value, low in (
        ("top", top, 1), ("n_contexts", n_contexts, 1), ("context_left", context_left, 0),
        ("context_right", context_right, 0), ("n_logit_tokens", n_logit_tokens, 1),
        ("batch_size", batch_size, 1),
    ):  # fmt: skip
        _check_int(name, value, low)
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {list(RANK_BY)}, got {rank_by!r}")
    spec = evaluation_spec(sae)
    r = spec.group_rank
    n_units = int(sae.cfg.d_sae) // (r or 1)
    kind = "group" if r else "latent"
    selected: list[int] | None = None
    if latents is not None:
        selected = list(dict.fromkeys(latents))
        bad = [
            i
            for i in selected
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_units
        ]
        if bad or not selected:
            raise ValueError(
                f"latents must be a non-empty list of {kind} ids in [0, {n_units}), got {list(latents)!r}"
                + (f" (bad: {bad})" if bad else "")
            )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    toks = as_token_tensor(token_rows, n_tokens=n_tokens)
    # validates tokens, hook, SAE width, special tokens and batch size before any work
    splicer = Splicer(
        model, sae, toks, hook_name=hook_name, special_tokens=special_tokens,
        batch_size=batch_size, progress=False,
    )  # fmt: skip
    hook, toks = splicer.hook, splicer.tokens
    mask = special_token_mask(toks, splicer.special_ids)
    if mask is not None and bool(mask.all()):
        raise ValueError(
            f"every position holds a special token {list(splicer.special_ids)}; nothing to show"
        )
    circuitsvis_js()  # fail early if circuitsvis is missing

    c = collect(sae, splicer, spec, progress=progress)
    stats = unit_stats(sae, c)
    if selected is None:
        selected = rank_units(stats, top, rank_by)
    title = f"{sae.cfg.architecture()} @ {hook}"
    ctx = PageContext(
        sae=sae, model=model, collected=c, stats=stats, text=TokenText(model),
        n_contexts=n_contexts, left=context_left, right=context_right,
        n_logit_tokens=n_logit_tokens, title=title,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    result = Dashboard(
        out_dir=out, index=out / "index.html", kind=kind, n_tokens=c.n_tokens, stats=stats
    )
    make = group_page if r else latent_page
    for i in tqdm(selected, desc=f"dashboard: {kind} pages", disable=not progress):
        path = out / unit_href(kind, i)
        path.write_text(make(ctx, i), encoding="utf-8")
        result.pages[i] = path
    scaffold_href = None
    if c.scaffold_share is not None:
        result.scaffold = out / "scaffold.html"
        result.scaffold.write_text(scaffold_page(ctx), encoding="utf-8")
        scaffold_href = result.scaffold.name
    summary = _summary(sae, model, hook, stats, c.n_tokens, toks)
    hrefs = {i: p.name for i, p in result.pages.items()}
    result.index.write_text(index_page(ctx, hrefs, scaffold_href, summary), encoding="utf-8")
    meta = {"architecture": sae.cfg.architecture(), "hook": hook, "n_tokens": c.n_tokens,
            "summary": dict(summary), **_stats_json(stats, selected)}  # fmt: skip
    (out / "dashboard.json").write_text(json.dumps(meta, allow_nan=False) + "\n")
    return result


def write_demo_dashboard(
    name: str,
    architecture: str,
    sae: Any,
    model: Any,
    token_rows: Any,
    out: str | Path,
    top: int = 16,
) -> Dashboard | None:
    """The demo's dashboard of one entry (``OUT/dashboards/NAME``) for the architectures in
    :data:`DEMO_DASHBOARD_ARCHITECTURES`; None for the others. Signed SAEs list their most
    bipolar latents first."""
    if architecture not in DEMO_DASHBOARD_ARCHITECTURES:
        return None
    rank_by = "bipolar" if architecture == "sign_aware_gated" else "activity"
    dash = build_dashboard(
        sae, model, token_rows, out_dir=Path(out) / "dashboards" / name, top=top, rank_by=rank_by,
        progress=False,
    )  # fmt: skip
    print(f"wrote the {name} dashboard: {dash.index}")
    return dash


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``sae-ext dashboard``."""
    parser.add_argument("sae_dir", type=Path, help="folder of a saved SAE (cfg.json + weights)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--latents", type=int, nargs="+", default=None,
                       help="latent ids to build pages for (group ids for SASA)")  # fmt: skip
    which.add_argument("--top", type=int, default=DEFAULT_TOP,
                       help=f"pages for the N top alive latents by --rank-by (default {DEFAULT_TOP})")  # fmt: skip
    parser.add_argument("--rank-by", choices=RANK_BY, default="activity",
                        help="order for --top: mean |activation| over all tokens (activity), "
                             "firing rate, or bipolar share (signed SAEs)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=DEFAULT_DASHBOARD_TOKENS,
                        help=f"held-out tokens of the embedded text (default {DEFAULT_DASHBOARD_TOKENS})")  # fmt: skip
    parser.add_argument(
        "--hook", default=None, help="hook name (default: the SAE's cfg.metadata.hook_name)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: SAE_DIR/dashboard)"
    )
    parser.add_argument(
        "--contexts", type=int, default=10, help="top contexts per sign (default 10)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    return parser


def run_dashboard_command(args: argparse.Namespace) -> int:
    """``sae-ext dashboard``: load the SAE and the default model/text, write the dashboard."""
    for name, value in (("--tokens", args.tokens), ("--top", args.top), ("--contexts", args.contexts),
                        ("--batch-size", args.batch_size)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    from sae_ext.data import default_token_dataset
    from sae_ext.loading import load_sae
    from sae_ext.models import load_default_model

    sae = load_sae(args.sae_dir)
    out_dir = args.out if args.out is not None else Path(args.sae_dir) / "dashboard"
    model = load_default_model()
    context_size = int(sae.cfg.metadata.context_size or 128)
    n_request = math.ceil(args.tokens / context_size) * context_size
    dataset = default_token_dataset(model.tokenizer, context_size, n_tokens=n_request, split="eval")
    dash = build_dashboard(
        sae, model, dataset, out_dir=out_dir, latents=args.latents, top=args.top,
        rank_by=args.rank_by, n_tokens=args.tokens, hook_name=args.hook,
        n_contexts=args.contexts, batch_size=args.batch_size,
    )  # fmt: skip
    print(f"wrote {dash.index} ({len(dash.pages)} {dash.kind} pages"
          + (", scaffold page" if dash.scaffold else "") + f", {dash.n_tokens:,} tokens)")  # fmt: skip
    return 0
