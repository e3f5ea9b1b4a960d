"""The dashboard's pages: the index, one page per latent (or per group for grouped SAEs) and the
scaffold page. Each function returns a complete HTML document (see :mod:`.html`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sae_ext.dashboard.collect import Collected, UnitStats, iter_contexts
from sae_ext.dashboard.html import (
    Elements,
    colored_tokens,
    esc,
    figure_data_uri,
    page,
    sortable_table,
)
from sae_ext.metrics.dense import DENSE_THRESHOLD
from sae_ext.metrics.sign import MIN_SIGN_SHARE

__all__ = [
    "PageContext",
    "TokenText",
    "group_page",
    "index_page",
    "latent_page",
    "scaffold_page",
    "unit_href",
]

#: Most points drawn in a SASA group's scatter (a fixed-seed sample of its active tokens).
MAX_SCATTER_POINTS = 4000
#: Distinct current tokens coloured in a group scatter (the rest are grey).
SCATTER_TOKEN_COLOURS = 8


class TokenText:
    """Token id -> display string: the tokenizer's ``decode`` of the single id (cached), or
    ``⟨id⟩`` for a model without a tokenizer."""

    def __init__(self, model: Any) -> None:
        self.tokenizer = getattr(model, "tokenizer", None)
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self.cache:
            if self.tokenizer is None:
                self.cache[token_id] = f"\u27e8{token_id}\u27e9"
            else:
                self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]

    def many(self, ids: torch.Tensor) -> list[str]:
        return [self(i) for i in ids.tolist()]


@dataclass
class PageContext:
    """What every page needs besides its unit."""

    sae: Any
    model: Any
    collected: Collected
    stats: UnitStats
    text: TokenText
    n_contexts: int
    left: int
    right: int
    n_logit_tokens: int
    title: str
    """``architecture @ hook`` for headings."""


def _fmt(v: float | int | None, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def _flags(stats: UnitStats, i: int) -> str:
    out = []
    if bool(stats.dead[i]):
        out.append('<span class="flag f-dead">dead</span>')
    if bool(stats.dense[i]):
        out.append('<span class="flag f-dense">dense</span>')
    if stats.bipolar is not None and bool(stats.bipolar[i]):
        out.append('<span class="flag f-bipolar">bipolar</span>')
    return "".join(out)


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return (
        "<table>" + "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"
    )


def _unembedding(model: Any, d_in: int) -> torch.Tensor | None:
    W_U = getattr(model, "W_U", None)
    if not isinstance(W_U, torch.Tensor) or W_U.ndim != 2 or W_U.shape[0] != d_in:
        return None
    return W_U.detach()


def _logit_lists(ctx: PageContext, direction: torch.Tensor, labels: tuple[str, str]) -> str:
    """Two token tables: the ``n`` tokens whose logits ``direction · W_U`` raises most and least."""
    W_U = _unembedding(ctx.model, int(direction.numel()))
    if W_U is None:
        return (
            '<p class="note">No logit effect: the model has no unembedding <code>W_U</code> of '
            f"width d_in = {direction.numel()} (e.g. an attention-z hook).</p>"
        )
    logits = (direction.to(W_U) @ W_U).float().cpu()
    k = min(ctx.n_logit_tokens, logits.numel())
    blocks = []
    for label, (vals, idx) in zip(labels, (logits.topk(k), (-logits).topk(k))):
        sign = 1 if label == labels[0] else -1
        rows = "".join(
            f"<tr><td>{esc(repr(ctx.text(int(t))))}</td><td>{sign * float(v):+.3f}</td></tr>"
            for v, t in zip(vals.tolist(), idx.tolist())
        )
        blocks.append(f'<div><h3>{esc(label)}</h3><table class="tokens">{rows}</table></div>')
    return f'<div class="cols">{"".join(blocks)}</div>'


def _contexts(
    ctx: PageContext,
    elements: Elements,
    grid: torch.Tensor,
    top_pos: torch.Tensor,
    vmax: float,
    value_name: str,
) -> str:
    """Token windows around ``top_pos`` (flat positions), coloured by ``grid`` ``[rows, T]``."""
    if top_pos.numel() == 0:
        return '<p class="note">none on these tokens</p>'
    c = ctx.collected
    out = []
    for row, q, a, b in iter_contexts(c, top_pos, ctx.left, ctx.right):
        ids = c.tokens[row, a:b]
        vals = grid[row, a:b]
        label = (
            f"{value_name} {float(grid[row, q]):+.4g} on {esc(repr(ctx.text(int(c.tokens[row, q]))))} "
            f"(row {row}, position {q})"
        )
        out.append(
            f'<div class="ctx"><div class="ctx-label">{label}</div>'
            f"{colored_tokens(elements, ctx.text.many(ids), vals.tolist(), vmax)}</div>"
        )
    return "".join(out)


def _histogram(values: torch.Tensor, xlabel: str, title: str) -> str:
    """Histogram of ``values`` with positive bars blue and negative bars red, as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    v = values.double().numpy()
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    if v.size:
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
        for m, colour, name in ((v > 0, "tab:blue", "positive"), (v < 0, "tab:red", "negative")):
            if m.any():
                ax.hist(v[m], bins=edges, color=colour, label=f"{name} ({int(m.sum()):,})")
        ax.axvline(0, color="k", lw=0.6)
        if (v < 0).any():
            ax.legend(fontsize=8)
    ax.set(xlabel=xlabel, ylabel="tokens")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return figure_data_uri(fig)


def _top_positions(pos: torch.Tensor, key: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` positions with the largest ``key`` (ties: earlier position first)."""
    if key.numel() == 0:
        return pos[:0]
    order = torch.argsort(key.double(), descending=True, stable=True)[:k]
    return pos[order]


def _header(ctx: PageContext, heading: str, flags: str = "") -> str:
    c = ctx.collected
    return (
        '<p><a href="index.html">&larr; index</a></p>'
        f"<h1>{esc(heading)} {flags}</h1>"
        f'<p class="sub">{esc(ctx.title)} &middot; {c.n_tokens:,} tokens '
        "(special tokens excluded)</p>"
    )


def latent_page(ctx: PageContext, i: int) -> str:
    """One latent: statistics, histogram, logit effect of ``W_dec[i]`` and top contexts (for
    latents that fire negative, or any latent of a signed SAE, positive and negative apart)."""
    c, st = ctx.collected, ctx.stats
    pos, val = c.latent_slice(i)
    grid = c.dense_values(pos, val)
    signed = st.positive_share is not None
    vmax = float(val.abs().max()) if val.numel() else 1.0
    el = Elements()
    rows = [
        ("firing rate", _fmt(float(st.firing_rate[i]))),
        ("mean |activation| when firing", _fmt(float(st.mean_abs[i]))),
        ("mean |activation| over all tokens", _fmt(float(st.activity[i]))),
        ("max / min activation", f"{_fmt(float(val.max()) if val.numel() else None)} / "
                                 f"{_fmt(float(val.min()) if val.numel() else None)}"),
    ]  # fmt: skip
    if signed and st.positive_share is not None and st.bipolar_share is not None:
        rows += [
            ("positive share of firings", _fmt(float(st.positive_share[i]), ".3f")),
            (f"bipolar share (rarer sign; bipolar if ≥ {MIN_SIGN_SHARE:g})",
             _fmt(float(st.bipolar_share[i]), ".3f")),
        ]  # fmt: skip
    hist = _histogram(val, "activation", f"latent {i}: {val.numel():,} firings")
    labels = (
        ("positive activation promotes", "negative activation promotes")
        if signed
        else ("promotes", "suppresses")
    )
    logits = _logit_lists(ctx, ctx.sae.W_dec[i].detach(), labels)
    n = ctx.n_contexts
    body = [
        _header(ctx, f"Latent {i}", _flags(st, i)),
        '<div class="cols"><div>',
        _kv_table(rows),
        f'<h2>Activation histogram</h2><img alt="activation histogram" src="{hist}">',
        "</div><div><h2>Logit effect of the decoder direction (W_dec[i] &middot; W_U)</h2>",
        '<p class="note">Direct effect on the logits, before the final norm.</p>',
        logits,
        "</div></div>",
    ]
    if signed or bool((val < 0).any()):
        pos_top = _top_positions(pos[val > 0], val[val > 0], n)
        neg_top = _top_positions(pos[val < 0], -val[val < 0], n)
        body += [
            f'<h2 class="pos">Top positive activations ({int((val > 0).sum()):,} firings)</h2>',
            _contexts(ctx, el, grid, pos_top, vmax, "activation"),
            f'<h2 class="neg">Top negative activations ({int((val < 0).sum()):,} firings)</h2>',
            _contexts(ctx, el, grid, neg_top, vmax, "activation"),
        ]
    else:
        body += [
            f"<h2>Top activations ({val.numel():,} firings)</h2>",
            _contexts(ctx, el, grid, _top_positions(pos, val, n), vmax, "activation"),
        ]
    return page(f"Latent {i} · {ctx.title}", "\n".join(body), el)


def _scatter(coords: torch.Tensor, token_ids: torch.Tensor, text: TokenText, title: str) -> str:
    """Scatter of 2-D ``coords``, the most frequent current tokens in colour, as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    if coords.shape[0]:
        ids, counts = torch.unique(token_ids, return_counts=True)
        common = ids[torch.argsort(counts, descending=True, stable=True)[:SCATTER_TOKEN_COLOURS]]
        rest = ~torch.isin(token_ids, common)
        ax.scatter(coords[rest, 0], coords[rest, 1], s=6, c="0.7", label="other tokens", lw=0)
        cmap = plt.get_cmap("tab10")
        for j, t in enumerate(common.tolist()):
            m = token_ids == t
            ax.scatter(coords[m, 0], coords[m, 1], s=8, color=cmap(j), label=repr(text(t)), lw=0)
        ax.legend(fontsize=7, markerscale=2, loc="best")
        ax.axhline(0, color="k", lw=0.4)
        ax.axvline(0, color="k", lw=0.4)
        ax.set_aspect("equal", adjustable="datalim")
    ax.set(xlabel="singular direction 1", ylabel="singular direction 2")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return figure_data_uri(fig)


def group_page(ctx: PageContext, k: int) -> str:
    """One SASA group: its code norm (histogram, top contexts), the scatter of its decoded code
    ``f_k D_k`` on the block's top two right singular directions, and their logit effects."""
    c, st = ctx.collected, ctx.stats
    r = int(c.spec.group_rank or 1)
    pos, codes = c.group_codes(k, r)
    norms = codes.norm(dim=-1)
    grid = c.dense_values(pos, norms)
    blocks = c.spec.group_blocks
    if blocks is None:  # groups without blocks in the spec: the stored decoder rows
        blocks = ctx.sae.W_dec.detach().view(-1, r, int(ctx.sae.cfg.d_in))
    block = blocks[k].double().cpu()  # D_k as decode uses it
    U, S, Vh = torch.linalg.svd(block, full_matrices=False)
    coords = codes.double() @ (U[:, :2] * S[:2])  # = (f_k D_k) projected on Vh[:2]
    if coords.shape[1] == 1:
        coords = torch.cat([coords, torch.zeros_like(coords)], 1)
    g = torch.Generator().manual_seed(k)
    sample = torch.randperm(pos.numel(), generator=g)[:MAX_SCATTER_POINTS]
    scatter = _scatter(
        coords[sample].float(), c.tokens.view(-1)[pos[sample]], ctx.text,
        f"group {k}: {sample.numel():,} of {pos.numel():,} active tokens",
    )  # fmt: skip
    hist = _histogram(norms, "code norm ‖f_k‖", f"group {k}: {pos.numel():,} active tokens")
    el = Elements()
    sv = ", ".join(f"{float(s):.3f}" for s in S)
    rows = [
        ("latents (columns)", f"{k * r} … {(k + 1) * r - 1}"),
        ("firing rate (any column active)", _fmt(float(st.firing_rate[k]))),
        ("mean code norm when active", _fmt(float(st.mean_abs[k]))),
        ("stable rank / rank90 of D_k", f"{_fmt(float(st.stable_rank[k]) if st.stable_rank is not None else None, '.3f')} / "
                                        f"{int(st.rank90[k]) if st.rank90 is not None else '–'}"),
        ("singular values of D_k", sv),
    ]  # fmt: skip
    logit_blocks = [
        f"<h3>singular direction {j + 1}</h3>"
        + _logit_lists(ctx, Vh[j], ("+ direction promotes", "− direction promotes"))
        for j in range(min(2, Vh.shape[0]))
    ]
    body = [
        _header(ctx, f"Group {k}", _flags(st, k)),
        '<div class="cols"><div>',
        _kv_table(rows),
        f'<h2>Code norm histogram</h2><img alt="group norm histogram" src="{hist}">',
        "</div><div>",
        "<h2>Code on the top two singular directions</h2>",
        f'<img alt="group code scatter" src="{scatter}">',
        '<p class="note">Each point is one active token: the group\'s decoded vector '
        "f<sub>k</sub> D<sub>k</sub> on the block's first two right singular vectors (a circle "
        "feature draws a circle).</p>",
        "</div></div>",
        f"<h2>Top contexts by group norm ({pos.numel():,} active tokens)</h2>",
        _contexts(ctx, el, grid, _top_positions(pos, norms, ctx.n_contexts),
                  float(norms.max()) if norms.numel() else 1.0, "‖f_k‖"),
        "<h2>Logit effect of the singular directions (v &middot; W_U)</h2>",
        *logit_blocks,
    ]  # fmt: skip
    return page(f"Group {k} · {ctx.title}", "\n".join(body), el)


def scaffold_page(ctx: PageContext, min_count: int = 3) -> str:
    """The scaffold component ``s``: its share ‖s‖²/‖x̃‖² of each token's (centred) input, the
    tokens where that share is largest, and the logit effects of its main output directions."""
    c = ctx.collected
    assert c.scaffold_share is not None and c.scaffold_energy is not None
    assert c.scaffold_gram is not None
    share = c.scaffold_share
    kept = c.kept & ~torch.isnan(share)
    vals = share[kept]
    ids = c.tokens[kept]
    s_energy, x_energy = c.scaffold_energy
    # mean share per vocabulary token seen at least min_count times
    uniq, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, vals.double())
    means = sums / counts
    ok = counts >= min_count
    order = torch.argsort(torch.where(ok, means, torch.tensor(-1.0, dtype=torch.float64)),
                          descending=True, stable=True)[: int(ok.sum())]  # fmt: skip
    rank = int(c.spec.ablation_pca_rank or 0)
    eig, vec = torch.linalg.eigh(c.scaffold_gram)
    eig, vec = eig.flip(0).clamp_min(0), vec.flip(1)
    n_dir = min(3, rank or 3, int((eig > 1e-12 * eig.sum()).sum()))

    def token_rows(sel: torch.Tensor) -> str:
        return "".join(
            f"<tr><td>{esc(repr(ctx.text(int(uniq[j]))))}</td><td>{float(means[j]):.3f}</td>"
            f"<td>{int(counts[j])}</td></tr>"
            for j in sel.tolist()
        )

    head = "<tr><th>token</th><th>mean share</th><th>count</th></tr>"
    el = Elements()
    flat_kept = torch.nonzero(kept.view(-1)).flatten()
    top_pos = _top_positions(flat_kept, share.view(-1)[flat_kept], ctx.n_contexts)
    rows = [
        ("scaffold rank r", str(rank) if rank else "–"),
        ("share of input energy Σ‖s‖² / Σ‖x̃‖²", _fmt(s_energy / x_energy if x_energy else None, ".3f")),
        ("mean / median per-token share", f"{_fmt(float(vals.mean()), '.3f')} / {_fmt(float(vals.median()), '.3f')}"),
    ]  # fmt: skip
    hist = _histogram(vals, "‖s‖² / ‖x̃‖² per token", f"scaffold share over {vals.numel():,} tokens")
    dirs = [
        f"<h3>output direction {j + 1} ({float(eig[j] / eig.sum()):.1%} of Σ‖s‖²)</h3>"
        + _logit_lists(ctx, vec[:, j], ("+ direction promotes", "− direction promotes"))
        for j in range(n_dir)
    ]
    body = [
        _header(ctx, "Scaffold component"),
        '<p class="note">s = (x̃ V) U is the scaffold\'s part of the reconstruction; x̃ is the '
        "SAE's input after its normalisation and b_dec centring. Share = ‖s‖² / ‖x̃‖² per token.</p>",
        '<div class="cols"><div>',
        _kv_table(rows),
        f'<h2>Per-token share</h2><img alt="scaffold share histogram" src="{hist}">',
        "</div><div>",
        f"<h2>Tokens by mean share (seen ≥ {min_count} times)</h2>",
        '<div class="cols"><div><h3>largest</h3>'
        f'<table class="tokens">{head}{token_rows(order[: ctx.n_logit_tokens])}</table></div>'
        '<div><h3>smallest</h3>'
        f'<table class="tokens">{head}{token_rows(order.flip(0)[: ctx.n_logit_tokens])}</table>'
        "</div></div>",
        "</div></div>",
        "<h2>Top contexts by scaffold share</h2>",
        _contexts(ctx, el, share.nan_to_num(0.0), top_pos, float(vals.max()) if vals.numel() else 1.0, "share"),
        "<h2>Main output directions of the scaffold (eigenvectors of Σ sᵀs) through W_U</h2>",
        *dirs,
    ]  # fmt: skip
    return page(f"Scaffold · {ctx.title}", "\n".join(body), el)


def unit_href(kind: str, i: int) -> str:
    """File name of unit ``i``'s page (``latent_00017.html``, ``group_00003.html``)."""
    return f"{kind}_{i:05d}.html"


def index_page(
    ctx: PageContext,
    pages: dict[int, str],
    scaffold_href: str | None,
    summary: list[tuple[str, str]],
) -> str:
    """The sortable index of every latent (or group) with links to the pages that were built."""
    st = ctx.stats
    kind = st.kind
    cols = [("id", kind), ("firing_rate", "firing rate"), ("mean_abs", "mean |act| (firing)"),
            ("activity", "mean |act| (all)")]  # fmt: skip
    if st.bipolar_share is not None:
        cols += [("positive_share", "positive share"), ("bipolar_share", "bipolar share")]
    if st.stable_rank is not None:
        cols += [("stable_rank", "stable rank"), ("rank90", "rank90")]
    cols += [("flags", "flags")]
    rows = []
    for i in range(len(st)):
        link = f'<a href="{pages[i]}">{i}</a>' if i in pages else str(i)
        fr, ma, ac = float(st.firing_rate[i]), float(st.mean_abs[i]), float(st.activity[i])
        row: list[tuple[str, float | str | None]] = [
            (link, i),
            (_fmt(fr), fr),
            (_fmt(ma), ma),
            (_fmt(ac), ac),
        ]
        if st.positive_share is not None and st.bipolar_share is not None:
            ps, bs = float(st.positive_share[i]), float(st.bipolar_share[i])
            row += [(_fmt(ps, ".3f"), ps), (_fmt(bs, ".3f"), bs)]
        if st.stable_rank is not None and st.rank90 is not None:
            sr, r9 = float(st.stable_rank[i]), int(st.rank90[i])
            row += [(_fmt(sr, ".3f"), sr), (str(r9), r9)]
        row.append((_flags(st, i), " ".join(
            n for n, m in (("dead", st.dead), ("dense", st.dense), ("bipolar", st.bipolar))
            if m is not None and bool(m[i])
        )))  # fmt: skip
        rows.append(row)
    links = (
        f'<p><a href="{scaffold_href}">Scaffold component &rarr;</a></p>' if scaffold_href else ""
    )
    body = [
        f"<h1>SAE dashboard: {esc(ctx.title)}</h1>",
        _kv_table(summary),
        links,
        f"<h2>{kind.capitalize()}s ({len(st):,}; {len(pages)} with a page)</h2>",
        f'<p class="note">Click a header to sort. Dead: never fires; dense: fires on more than '
        f"{DENSE_THRESHOLD:.0%} of tokens; bipolar: each sign on at least {MIN_SIGN_SHARE:.0%} "
        "of its firings.</p>",
        sortable_table(cols, rows),
    ]
    return page(f"Dashboard · {ctx.title}", "\n".join(body), sortable=True)
