"""One-call evaluation of an SAE on a model: SAELens ``run_evals`` metrics, dark matter,
dictionary statistics, error-node ablation and (for scaffolded SAEs) the scaffold ablation
against top-r PCA removal; writes ``eval.json``, ``eval.md`` and ``firing_rate_hist.png``.

The CLI (``sae-ext eval SAE_DIR [--tokens N] [--hook NAME] [--out DIR]``) is wired by
``sae_ext.cli`` through :func:`add_eval_arguments` and :func:`run_eval_command`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_ext.metrics.dark_matter import DarkMatterAccumulator, encode_decode
from sae_ext.metrics.dictionary import (
    DictionaryStats,
    DictionaryStatsAccumulator,
    unit_decoder_rows,
)
from sae_ext.splicing import (
    PCAAccumulator,
    ablate_hook,
    as_token_tensor,
    dark_matter_ce,
    error_node_ablation,
    iter_activations,
    loss_recovered,
    remove_directions_ce,
    validate_splice_inputs,
)

__all__ = ["add_eval_arguments", "evaluate_sae", "run_eval_command", "write_report"]

SCAFFOLD_HOOK = "hook_scaffold"
DEFAULT_EVAL_TOKENS = 32_768


def _special_token_ids(model: Any) -> list[int]:
    """Special-token ids (BOS/EOS/PAD…) of the model's tokenizer: the statistics skip them, as
    SAELens's ``run_evals`` does, because e.g. BOS residuals have outlier norms that would
    dominate every sum of squares."""
    from sae_lens.util import get_special_token_ids

    tokenizer = getattr(model, "tokenizer", None)
    return sorted(get_special_token_ids(tokenizer)) if tokenizer is not None else []


def _json_safe(obj: Any) -> Any:
    """Plain JSON types; NaN/Inf become ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):
        return _json_safe(obj.item())
    return str(obj)


def _check_out_dir(out_dir: str | Path | None) -> Path | None:
    if out_dir is None:
        return None
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir {str(path)!r} exists and is not a directory")
    return path


def _scaffold_rank(sae: Any) -> int | None:
    for name in ("scaffold_rank", "rank"):
        r = getattr(sae.cfg, name, None)
        if isinstance(r, int) and r > 0:
            return r
    return None


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    model: Any,
    tokens_dataset: Any,
    *,
    n_tokens: int,
    hook_name: str | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    test_fraction: float = 0.5,
    fit_intercept: bool = False,
    seed: int = 0,
    pca_rank: int | None = None,
    splices: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``sae`` spliced into ``model`` on the first ``n_tokens`` tokens (whole rows,
    rounded up) of ``tokens_dataset`` (a tokenized ``Dataset``, a tensor ``[rows, context]`` or lists).

    Computes: SAELens ``run_evals`` (CE/KL loss recovered, explained variance, L0, …), dark
    matter (error/norm R², FVU, nonlinear FVU) and its CE splices, dictionary statistics,
    zero and mean error-node ablation, and — when the SAE has a ``hook_scaffold`` hook point —
    the scaffold ablation vs removing the top-r PCA directions (``r = cfg.scaffold_rank`` or
    ``pca_rank``). Activations are streamed (one pass, ``O(d_in²)`` memory). The dark-matter
    CE splices use ``W*`` on all ``n_tokens`` tokens (about half of them were its train split);
    the R²/FVU scores are test-split only. Returns a
    JSON-safe dict; with ``out_dir`` also writes ``eval.json``, ``eval.md`` and
    ``firing_rate_hist.png`` there. Everything is validated before any work.
    ``splices=False`` skips the extra model passes (dark-matter CE splices, error-node and
    scaffold ablations) and keeps ``run_evals``, dark-matter statistics and dictionary stats.
    """
    if not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens must be an integer >= 2, got {n_tokens!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    if pca_rank is not None and not 1 <= pca_rank <= sae.cfg.d_in:
        raise ValueError(f"pca_rank must lie in [1, d_in = {sae.cfg.d_in}], got {pca_rank}")
    out_path = _check_out_dir(out_dir)
    toks = as_token_tensor(tokens_dataset, n_tokens=n_tokens)
    hook, toks = validate_splice_inputs(model, sae, toks, hook_name)
    has_scaffold = SCAFFOLD_HOOK in sae.hook_dict
    r_pca = pca_rank or _scaffold_rank(sae)

    steps = ["run_evals", "activations", "dark-matter CE", "error node", "scaffold"]
    bar = tqdm(total=len(steps), desc="evaluate_sae", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    step("run_evals")
    run_evals_metrics = loss_recovered(
        model, sae, toks, batch_size_prompts=batch_size, hook_name=hook, progress=progress
    )
    bar.update()

    step("activations")
    dm_acc = DarkMatterAccumulator(int(sae.cfg.d_in), test_fraction=test_fraction, seed=seed)
    group_rank = getattr(sae.cfg, "group_rank", None) or None
    dict_acc = DictionaryStatsAccumulator(int(sae.cfg.d_sae), group_rank=group_rank)
    pca_acc = PCAAccumulator() if has_scaffold and r_pca else None
    for x in iter_activations(
        model,
        hook,
        toks,
        batch_size=batch_size,
        head_index=sae.cfg.metadata.hook_head_index,
        exclude_tokens=_special_token_ids(model),
        progress=progress,
    ):
        feats, out = encode_decode(sae, x)
        dm_acc.update(x, out)
        dict_acc.update(feats)
        if pca_acc is not None:
            pca_acc.update(x)
    dm = dm_acc.result(fit_intercept=fit_intercept)
    stats = dict_acc.result(W_dec=unit_decoder_rows(sae) if group_rank else None)
    bar.update()

    step("dark-matter CE")
    dm_ce = (
        dark_matter_ce(model, sae, toks, dm.W, hook_name=hook, batch_size=batch_size, progress=progress)
        if splices
        else None
    )
    bar.update()

    step("error node")
    err: dict[str, Any] | None = None
    if splices:
        err = {
            mode: error_node_ablation(
                model,
                sae,
                toks,
                mode,
                hook_name=hook,
                mean_error=dm_acc.mean_error() if mode == "mean" else None,
                batch_size=batch_size,
                progress=progress,
            ).to_dict()
            for mode in ("zero", "mean")
        }
    bar.update()

    step("scaffold")
    scaffold: dict[str, Any] | None = None
    if has_scaffold and splices:
        abl = ablate_hook(
            model,
            sae,
            toks,
            SCAFFOLD_HOOK,
            hook_name=hook,
            batch_size=batch_size,
            progress=progress,
        )
        scaffold = {"ablation": abl.to_dict(), "pca_removal": None, "pca_rank": r_pca}
        if pca_acc is not None and r_pca:
            pca = pca_acc.result(r_pca)
            rem = remove_directions_ce(
                model, hook, pca.basis, toks, batch_size=batch_size, progress=progress
            )
            scaffold["pca_removal"] = rem.to_dict()
            scaffold["pca_explained_variance"] = float(pca.explained_variance_ratio.sum().item())
            if rem.ce_increase != 0:
                scaffold["increase_ratio_scaffold_vs_pca"] = abl.ce_increase / rem.ce_increase
    bar.update()
    bar.close()

    result: dict[str, Any] = {
        "sae": {
            "architecture": sae.cfg.architecture(),
            "d_in": int(sae.cfg.d_in),
            "d_sae": int(sae.cfg.d_sae),
            "hook_name": hook,
            "requested_hook_name": hook_name or sae.cfg.metadata.hook_name,
            "model": type(model).__name__,
        },
        "n_tokens": int(toks.numel()),
        "n_sequences": int(toks.shape[0]),
        "context_size": int(toks.shape[1]),
        "run_evals": run_evals_metrics,
        "dark_matter": dm.to_dict(),
        "dark_matter_ce": dm_ce.to_dict() if dm_ce is not None else None,
        "dictionary": stats.to_dict(),
        "error_node_ablation": err,
        "scaffold": scaffold,
    }
    result = _json_safe(result)
    if out_path is not None:
        write_report(result, out_path, stats=stats)
    return result


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return lines


def _markdown(res: dict[str, Any]) -> str:
    s = res["sae"]
    ev, dm, dmc, dic = (
        res["run_evals"],
        res["dark_matter"],
        res["dark_matter_ce"] or {},
        res["dictionary"],
    )
    out = [
        f"# SAE evaluation: `{s['architecture']}` at `{s['hook_name']}`",
        "",
        f"d_in = {s['d_in']}, d_sae = {s['d_sae']}, model `{s['model']}`, "
        f"{res['n_tokens']:,} tokens ({res['n_sequences']} × {res['context_size']}).",
        "",
        "## Reconstruction and loss recovered (SAELens `run_evals`)",
        "",
        *_table(
            [
                ("CE loss recovered", ev.get("ce_loss_score")),
                ("KL score", ev.get("kl_div_score")),
                ("CE clean", ev.get("ce_loss_without_sae")),
                ("CE with SAE", ev.get("ce_loss_with_sae")),
                ("CE zero-ablated", ev.get("ce_loss_with_ablation")),
                ("explained variance", ev.get("explained_variance")),
                ("L0", ev.get("l0")),
                ("cosine similarity", ev.get("cossim")),
            ]
        ),
        "",
        "## Dark matter (Engels et al.; test split)",
        "",
        *_table(
            [
                ("error R² (linear prediction of e from x)", dm.get("error_r2")),
                ("norm R² (‖e‖² from x)", dm.get("norm_r2")),
                ("FVU", dm.get("fvu")),
                ("nonlinear FVU (SAE(x) + x W*)", dm.get("nonlinear_fvu")),
                ("linear share of ‖e‖²", dm.get("linear_error_norm_share")),
                ("train / test tokens", f"{dm.get('n_train')} / {dm.get('n_test')}"),
                ("CE clean", dmc.get("ce_clean")),
                ("CE SAE(x)", dmc.get("ce_sae")),
                ("CE SAE(x) + linear error", dmc.get("ce_sae_linear")),
                ("CE SAE(x) + nonlinear error", dmc.get("ce_sae_nonlinear")),
                ("% CE gap closed by linear error", dmc.get("pct_recovered_linear")),
                ("% CE gap closed by nonlinear error", dmc.get("pct_recovered_nonlinear")),
            ]
        ),
        "",
        "## Dictionary",
        "",
        *_table(
            [
                ("L0", dic.get("l0")),
                ("dead fraction", dic.get("dead_fraction")),
                (
                    f"dense fraction (> {dic.get('dense_threshold')} firing)",
                    dic.get("dense_fraction"),
                ),
                ("signed latents seen", dic.get("is_signed")),
                ("bipolar fraction", dic.get("bipolar_fraction")),
            ]
        ),
        "",
        "![firing-rate histogram](firing_rate_hist.png)",
        "",
    ]
    groups = dic.get("groups")
    if groups:
        out += [
            "### Groups",
            "",
            *_table(
                [
                    ("group rank r", groups.get("group_rank")),
                    ("groups", groups.get("n_groups")),
                    ("mean stable rank", groups.get("mean_stable_rank")),
                    ("mean rank90", groups.get("mean_rank90")),
                    ("group L0", groups.get("group_l0")),
                    ("dead groups", groups.get("group_dead_fraction")),
                    ("dense groups", groups.get("group_dense_fraction")),
                ]
            ),
            "",
        ]
    rows: list[tuple[str, Any]] = []
    if res["error_node_ablation"] is None:
        return "\n".join(out) + "\n"
    out += ["## Error-node ablation", ""]
    for mode in ("zero", "mean"):
        e = res["error_node_ablation"][mode]
        rows += [
            (f"{mode}: CE ablated", e.get("ce_ablated")),
            (f"{mode}: ΔCE vs clean", e.get("delta_ce_vs_clean")),
            (f"{mode}: ΔCE vs plain splice", e.get("delta_ce_vs_sae")),
            (f"{mode}: KL vs clean", e.get("kl_ablated_vs_clean")),
        ]
    e0 = res["error_node_ablation"]["zero"]
    rows += [
        ("CE with error term (must equal clean)", e0.get("ce_spliced")),
        ("max abs Δlogit with error term", e0.get("max_abs_logit_diff_spliced")),
    ]
    out += [*_table(rows), ""]
    sc = res.get("scaffold")
    if sc:
        abl, rem = sc["ablation"], sc.get("pca_removal")
        rows = [
            ("CE clean", abl.get("ce_clean")),
            ("CE scaffold zeroed", abl.get("ce_ablated")),
            ("× CE (scaffold)", abl.get("ce_ratio")),
        ]
        if rem:
            rows += [
                (f"CE top-{sc.get('pca_rank')} PCA removed", rem.get("ce_removed")),
                ("× CE (PCA)", rem.get("ce_ratio")),
                ("ΔCE scaffold / ΔCE PCA", sc.get("increase_ratio_scaffold_vs_pca")),
            ]
        out += ["## Scaffold ablation vs top-r PCA removal", "", *_table(rows), ""]
    return "\n".join(out)


def _plot_hist(stats_dict: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = stats_dict["firing_rate_hist"]
    edges, counts = hist["log10_edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(5, 3))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="none")
    thr = stats_dict.get("dense_threshold")
    if thr:
        ax.axvline(math.log10(thr), color="tab:red", ls="--", lw=1, label=f"dense (> {thr:g})")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("log10 firing rate")
    ax.set_ylabel("alive latents")
    ax.set_title(f"{stats_dict['n_dead']} dead of {stats_dict['d_sae']} latents", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    result: dict[str, Any], out_dir: str | Path, *, stats: DictionaryStats | None = None
) -> list[Path]:
    """Write ``eval.json``, ``eval.md`` and ``firing_rate_hist.png`` for an :func:`evaluate_sae` result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "firing_rate_hist.png"]
    paths[0].write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    paths[1].write_text(_markdown(result) + "\n")
    _plot_hist(stats.to_dict() if stats is not None else result["dictionary"], paths[2])
    return paths


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``sae-ext eval``."""
    parser.add_argument("sae_dir", type=Path, help="folder of a saved SAE (cfg.json + weights)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_EVAL_TOKENS,
        help=f"held-out tokens to evaluate on (default {DEFAULT_EVAL_TOKENS})",
    )
    parser.add_argument(
        "--hook", default=None, help="hook name (default: the SAE's cfg.metadata.hook_name)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: SAE_DIR/eval)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the dark-matter train/test split"
    )
    return parser


def run_eval_command(args: argparse.Namespace) -> int:
    """``sae-ext eval``: load the SAE and the default model/text, evaluate, write the report."""
    sae_dir = Path(args.sae_dir)
    if not (sae_dir / "cfg.json").is_file():
        raise ValueError(f"{str(sae_dir)!r} is not a saved SAE folder (no cfg.json)")
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    out_dir = _check_out_dir(args.out if args.out is not None else sae_dir / "eval")
    assert out_dir is not None

    from sae_lens import SAE

    import sae_ext  # noqa: F401  (registers the plugin architectures before loading)
    from sae_ext.data import default_token_dataset
    from sae_ext.models import load_default_model

    sae = SAE.load_from_disk(str(sae_dir))
    model = load_default_model()
    context_size = int(sae.cfg.metadata.context_size or 128)
    n_request = math.ceil(args.tokens / context_size) * context_size
    dataset = default_token_dataset(model.tokenizer, context_size, n_tokens=n_request, split="eval")
    result = evaluate_sae(
        sae,
        model,
        dataset,
        n_tokens=args.tokens,
        hook_name=args.hook,
        out_dir=out_dir,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    ev, dm = result["run_evals"], result["dark_matter"]
    print(
        f"wrote {out_dir / 'eval.md'}: CE loss recovered {_fmt(ev.get('ce_loss_score'))}, "
        f"explained variance {_fmt(ev.get('explained_variance'))}, L0 {_fmt(ev.get('l0'))}, "
        f"error R² {_fmt(dm.get('error_r2'))}, norm R² {_fmt(dm.get('norm_r2'))}"
    )
    return 0
