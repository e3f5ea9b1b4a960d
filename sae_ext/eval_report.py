"""The report of an SAE evaluation: ``eval.json``, ``eval.md`` and ``firing_rate_hist.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sae_ext.eval_result import EvaluationResult

__all__ = ["fmt", "markdown", "write_report"]


def fmt(v: Any, spec: str | None = None) -> str:
    """A table cell: ``–`` for missing or non-finite values; a number in ``spec`` when given, else
    4 significant digits for floats (the one cell formatter of the reports)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if spec is not None and isinstance(v, int | float):
        return format(v, spec)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| metric | value |", "|---|---|", *[f"| {k} | {fmt(v)} |" for k, v in rows]]


def markdown(res: EvaluationResult) -> str:
    """``eval.md``: one table per section."""
    s, ev, dm, dic = res.sae, res.run_evals, res.dark_matter, res.dictionary
    dmc = res.dark_matter_ce
    out = [
        f"# SAE evaluation: `{s.architecture}` at `{s.hook_name}`",
        "",
        f"d_in = {s.d_in}, d_sae = {s.d_sae}, model `{s.model}`, "
        f"{res.n_tokens:,} tokens ({res.n_sequences} × {res.context_size}); "
        f"{res.n_special_positions:,} special-token positions left unspliced and uncounted.",
        "",
        "## Reconstruction and loss recovered (SAELens `run_evals` conventions)",
        "",
        *_table(
            [
                ("CE loss recovered", ev.ce_loss_score),
                ("KL score", ev.kl_div_score),
                ("CE clean", ev.ce_loss_without_sae),
                ("CE with SAE", ev.ce_loss_with_sae),
                ("CE zero-ablated", ev.ce_loss_with_ablation),
                ("explained variance", ev.explained_variance),
                ("L0", ev.l0),
                ("cosine similarity", ev.cossim),
            ]
        ),
        "",
        "## Dark matter (Engels et al.; test split)",
        "",
        *_table(
            [
                ("error R² (linear prediction of e from x)", dm.error_r2),
                ("norm R² (‖e‖² from x)", dm.norm_r2),
                ("FVU", dm.fvu),
                ("nonlinear FVU (SAE(x) + x W*)", dm.nonlinear_fvu),
                ("linear share of ‖e‖²", dm.linear_error_norm_share),
                ("train / test tokens", f"{dm.n_train} / {dm.n_test}"),
                ("CE clean", dmc.ce_clean if dmc else None),
                ("CE SAE(x)", dmc.ce_sae if dmc else None),
                ("CE SAE(x) + linear error", dmc.ce_sae_linear if dmc else None),
                ("CE SAE(x) + nonlinear error", dmc.ce_sae_nonlinear if dmc else None),
                ("% CE gap closed by linear error", dmc.pct_recovered_linear if dmc else None),
                ("% CE gap closed by nonlinear error", dmc.pct_recovered_nonlinear if dmc else None),
            ]
        ),
        "",
        "## Dictionary",
        "",
        *_table(
            [
                ("L0", dic.l0),
                ("dead fraction", dic.dead_fraction),
                (f"dense fraction (> {dic.dense_threshold} firing)", dic.dense_fraction),
                ("signed latents seen", dic.is_signed),
                ("bipolar fraction", dic.bipolar_fraction),
            ]
        ),
        "",
        "![firing-rate histogram](firing_rate_hist.png)",
        "",
    ]
    if dic.group_rank is not None:
        assert dic.group_stable_rank is not None and dic.group_rank90 is not None
        out += [
            "### Groups",
            "",
            *_table(
                [
                    ("group rank r", dic.group_rank),
                    ("groups", int(dic.group_stable_rank.numel())),
                    ("mean stable rank", dic.mean_group_stable_rank),
                    ("mean rank90", float(dic.group_rank90.double().mean().item())),
                    ("group L0", dic.group_l0),
                    ("dead groups", dic.group_dead_fraction),
                    ("dense groups", dic.group_dense_fraction),
                ]
            ),
            "",
        ]
    if res.error_node_ablation is None:
        return "\n".join(out) + "\n"
    rows: list[tuple[str, Any]] = []
    for mode, e in res.error_node_ablation.items():
        rows += [
            (f"{mode}: CE ablated", e.ce_ablated),
            (f"{mode}: ΔCE vs clean", e.delta_ce_vs_clean),
            (f"{mode}: ΔCE vs plain splice", e.delta_ce_vs_sae),
            (f"{mode}: KL vs clean", e.kl_ablated_vs_clean),
        ]
    e0 = next(iter(res.error_node_ablation.values()))
    rows += [
        ("CE with error term (must equal clean)", e0.ce_spliced),
        ("max abs Δlogit with error term", e0.max_abs_logit_diff_spliced),
    ]
    out += ["## Error-node ablation", "", *_table(rows), ""]
    sc = res.scaffold
    if sc is not None:
        abl, rem = sc.ablation, sc.pca_removal
        rows = [
            ("CE clean", abl.ce_clean),
            (f"CE {abl.sae_hook} zeroed", abl.ce_ablated),
            ("× CE (component)", abl.ce_ratio),
        ]
        if rem is not None:
            rows += [
                (f"CE top-{sc.pca_rank} PCA removed", rem.ce_removed),
                ("× CE (PCA)", rem.ce_ratio),
                ("ΔCE component / ΔCE PCA", sc.increase_ratio_vs_pca),
            ]
        if sc.principal_angles_deg:
            a = sc.principal_angles_deg
            rows += [
                (
                    f"principal angles to top-{sc.pca_rank} PCA (°, min / median / max)",
                    f"{a[0]:.1f} / {a[len(a) // 2]:.1f} / {a[-1]:.1f}",
                )
            ]
        out += ["## Scaffold ablation vs top-r PCA removal", "", *_table(rows), ""]
    return "\n".join(out)


def _plot_hist(res: EvaluationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dic = res.dictionary
    edges, counts = dic.hist_edges, dic.hist_counts
    fig, ax = plt.subplots(figsize=(5, 3))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="none")
    thr = dic.dense_threshold
    if thr:
        ax.axvline(math.log10(thr), color="tab:red", ls="--", lw=1, label=f"dense (> {thr:g})")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("log10 firing rate")
    ax.set_ylabel("alive latents")
    ax.set_title(f"{dic.n_dead} dead of {dic.d_sae} latents", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: EvaluationResult, out_dir: str | Path) -> list[Path]:
    """Write ``eval.json``, ``eval.md`` and ``firing_rate_hist.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "firing_rate_hist.png"]
    paths[0].write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    paths[1].write_text(markdown(result) + "\n")
    _plot_hist(result, paths[2])
    return paths
