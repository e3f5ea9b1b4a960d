"""`sae-ext demo`: the main job.

Capture activations of the embedded SmolLM2-135M at one hook on the embedded text once, train
every demo SAE (each plugin architecture beside its SAELens sibling) on the stored activations
with SAELens's trainer (``sae_ext.capture.train_on_cache``, SPEC §8), evaluate each on held-out text with :func:`sae_ext.evaluate.evaluate_sae`
(SAELens ``run_evals``: explained variance, L0, CE/KL loss recovered by splicing; dark matter;
dead / dense / bipolar / group statistics), and write ``report.md``, ``report.json`` and plots.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAEConfig

#: The demo's hook: at ``resid_mid`` the demo's budget reaches ≥ 0.9 of converged held-out R² for every
#: demo SAE (``benchmarks/results/demo_reference.md``); at ``mlp_out`` TopK needs ~8 M tokens to converge.
DEFAULT_HOOK = "blocks.15.hook_resid_mid"
#: What the report says of its own figures (SPEC §8): they are demo-scale, not the benchmarks'.
DEMO_SCALE_NOTE = (
    "**Demo-scale figures.** Training follows SPEC §8 (special tokens out of training, normalisation and "
    "statistics; dead-feature window 10 % of the run; lr warm-up and decay; `R² at ½ budget` is a second run "
    "of half the tokens, `converged` when R² moved ≤ 0.01), but the budget is chosen to fit a few minutes on "
    "a CPU, not for convergence. Converged references of every demo SAE (the same settings, up to 2 M tokens) "
    "are in `benchmarks/results/convergence.md`, and `benchmarks/results/demo_reference.md` sets the default "
    "demo beside them; architecture verdicts come from the converged curves in `benchmarks/RESULTS.md`, "
    "never from this table."
)


@dataclass
class DemoEntry:
    """One SAE of the demo: a row of the table."""

    name: str
    architecture: str
    d_sae: Callable[[int, int], int]  # (d_in, width H) -> d_sae
    kwargs: dict[str, Any] = field(default_factory=dict)

    def config(self, d_in: int, width: int) -> TrainingSAEConfig:
        cfg_cls = get_sae_training_class(self.architecture)[1]
        return cfg_cls(d_in=d_in, d_sae=self.d_sae(d_in, width), **self.kwargs)


def demo_entries(k: int = 32, group_rank: int = 4, l1_coefficient: float = 10.0) -> list[DemoEntry]:
    """The SAEs the demo trains; each plugin architecture sits beside its SAELens sibling.

    Widths follow the papers' comparisons: SA-GSAE at H vs Gated at 2H; the scaffold and SASA
    at the same width (2H) and sparsity as BatchTopK / TopK (SASA: s·r = k active columns).
    All train on inputs normalised to E‖x‖² = d_in (folded back into the weights on save), so
    the coefficients below are scale-free.
    """
    if k < 1 or group_rank < 1 or k % group_rank:
        raise ValueError(f"--k ({k}) must be a positive multiple of --group-rank ({group_rank})")
    if not l1_coefficient >= 0:
        raise ValueError(f"--l1-coefficient must be >= 0, got {l1_coefficient}")
    norm = {"normalize_activations": "expected_average_only_in"}
    sasa = {"group_rank": group_rank, "n_active_groups": k // group_rank, "nuclear_coefficient": 3.0}
    return [
        DemoEntry("gated@2H", "gated", lambda d, w: 2 * w, {"l1_coefficient": l1_coefficient, **norm}),
        # λ₀ from the synthetic sweep; thresholds start at 2 (not 0.01) because Adam moves a linear
        # threshold by ~lr per step, and a demo-length run could not raise them far enough otherwise
        DemoEntry("sign_aware_gated@H", "sign_aware_gated", lambda d, w: w,
                  {"l0_coefficient": 1.0, "initial_threshold": 2.0, "decoder_init_norm": 1.0, **norm}),
        DemoEntry("batchtopk", "batchtopk", lambda d, w: 2 * w, {"k": k, **norm}),
        DemoEntry("scaffold_batchtopk", "scaffold_batchtopk", lambda d, w: 2 * w, {"k": k, **norm}),
        DemoEntry("topk", "topk", lambda d, w: 2 * w, {"k": k, **norm}),
        DemoEntry("sasa", "sasa", lambda d, w: 2 * w, {**sasa, **norm}),
    ]


def summarize(name: str, architecture: str, res: Any) -> dict[str, Any]:
    """One table row (JSON-safe: NaN as None) from the :class:`~sae_ext.eval_result.EvaluationResult`
    of :func:`sae_ext.evaluate.evaluate_sae`, read by attribute."""
    from sae_ext.eval_result import json_safe

    ev, dm, dic, dmc, sc = res.run_evals, res.dark_matter, res.dictionary, res.dark_matter_ce, res.scaffold
    return json_safe({
        "name": name,
        "architecture": architecture,
        "d_sae": res.sae.d_sae,
        "l0": ev.l0,
        "explained_variance": ev.explained_variance,
        "dead_fraction": dic.dead_fraction,
        "dense_fraction": dic.dense_fraction,
        "ce_clean": ev.ce_loss_without_sae,
        "ce_sae": ev.ce_loss_with_sae,
        "ce_zero_ablation": ev.ce_loss_with_ablation,
        "ce_loss_recovered": ev.ce_loss_score,
        "kl_score": ev.kl_div_score,
        "error_r2": dm.error_r2,
        "norm_r2": dm.norm_r2,
        "fvu": dm.fvu,
        "nonlinear_fvu": dm.nonlinear_fvu,
        "ce_sae_linear": dmc.ce_sae_linear if dmc else None,
        "ce_sae_nonlinear": dmc.ce_sae_nonlinear if dmc else None,
        "bipolar_fraction": dic.bipolar_fraction,
        "positive_share_hist": dic.positive_share_hist,
        "mean_group_stable_rank": dic.mean_group_stable_rank,
        "group_rank90_counts": dic.group_rank90_counts,
        "scaffold_ce_ratio": sc.ablation.ce_ratio if sc else None,
        "pca_removal_ce_ratio": sc.pca_removal.ce_ratio if sc and sc.pca_removal else None,
    })


COLUMNS = [
    ("name", "SAE", "{}"),
    ("architecture", "architecture", "{}"),
    ("d_sae", "d_sae", "{}"),
    ("l0", "L0", "{:.1f}"),
    ("explained_variance", "R²", "{:.3f}"),
    ("r2_half", "R² at ½ budget", "{:.3f}"),
    ("converged", "converged", "{}"),
    ("dead_fraction", "dead", "{:.3f}"),
    ("dense_fraction", "dense", "{:.3f}"),
    ("bipolar_fraction", "bipolar", "{:.2f}"),
    ("ce_sae", "CE with SAE", "{:.4f}"),
    ("ce_loss_recovered", "CE loss rec.", "{:.3f}"),
    ("kl_score", "KL score", "{:.3f}"),
    ("error_r2", "error R²", "{:.2f}"),
    ("norm_r2", "norm R²", "{:.2f}"),
    ("train_seconds", "train s", "{:.0f}"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The demo table as markdown."""
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = [
        "| " + " | ".join(fmt.format(r[key]) if r.get(key) is not None else "–" for key, _, fmt in COLUMNS) + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


def _plugin_archs() -> set[str]:
    from sae_ext.registry import PLUGIN_TRAINING_ARCHITECTURES

    return set(PLUGIN_TRAINING_ARCHITECTURES)


def plot_report(rows: list[dict[str, Any]], path: Path) -> None:
    """Four panels: R² vs L0 (Pareto view), dead and dense fractions, dark matter (error and
    norm R²), and the bipolar census (SA-GSAE) with the group rank90 histogram (SASA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plugin = _plugin_archs()
    names = [r["name"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    for r in rows:
        ax.scatter(r["l0"], r["explained_variance"], marker="o" if r["architecture"] in plugin else "s", s=50)
        ax.annotate(r["name"], (r["l0"], r["explained_variance"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="L0 (active latents per token)", ylabel="explained variance R²",
           title="R² vs L0 (circles: sae_ext, squares: SAELens)")
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    ax.bar([i - 0.2 for i in x], [r["dead_fraction"] for r in rows], 0.4, label="dead")
    ax.bar([i + 0.2 for i in x], [r["dense_fraction"] for r in rows], 0.4, label="dense (>10 %)")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(title="dead and dense latent fractions", ylabel="fraction of latents")
    ax.legend()
    ax = axes[1, 0]
    ax.bar([i - 0.2 for i in x], [r["error_r2"] or 0 for r in rows], 0.4, label="error R² (e from x)")
    ax.bar([i + 0.2 for i in x], [r["norm_r2"] or 0 for r in rows], 0.4, label="norm R² (‖e‖² from x)")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(title="SAE dark matter: linearly predictable error", ylabel="R² (held-out tokens)")
    ax.legend()
    ax = axes[1, 1]
    for r in rows:
        if r.get("positive_share_hist"):
            ax.plot([i / 10 + 0.05 for i in range(10)], r["positive_share_hist"], "o-",
                    label=f"{r['name']}: latents by positive share of firings")
        if r.get("group_rank90_counts"):
            ks = sorted(r["group_rank90_counts"], key=int)
            ax.bar([int(k) / 10 for k in ks], [r["group_rank90_counts"][k] for k in ks], 0.05, alpha=0.6,
                   label=f"{r['name']}: groups by rank90 (x = rank / 10)")
    ax.set(title="bipolar census and SASA group ranks", xlabel="share", ylabel="latents / groups")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=200_000,
                   help="training tokens per SAE (default 200k: demo-scale; at the default hook it reaches "
                        "≥ 0.9 of converged R², benchmarks/results/demo_reference.md)")
    p.add_argument("--capture-tokens", type=int, default=64_000,
                   help="activations captured once and reused by every SAE (default 64k)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for the evaluation")
    p.add_argument("--full-eval", action="store_true",
                   help="also the dark-matter CE splices, error-node and scaffold ablations (more model passes)")
    p.add_argument("--hook", default=DEFAULT_HOOK, help=f"TransformerLens hook (default {DEFAULT_HOOK})")
    p.add_argument("--width", type=int, default=576, help="H: SA-GSAE's width; every other SAE gets 2H")
    p.add_argument("--k", type=int, default=32, help="active latents per token for the TopK family")
    p.add_argument("--group-rank", type=int, default=4, help="SASA group rank r (s = k / r groups active)")
    p.add_argument("--l1-coefficient", type=float, default=10.0,
                   help="λ of gated@2H (L1); at the demo budget λ = 10 puts it near the TopK family's L0 "
                        "(λ = 1 leaves it dense). SA-GSAE@H trains with an L0 penalty (λ₀ = 1)")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size in tokens")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", nargs="*", help="train only these demo entries (by name)")
    p.add_argument("--out", default="sae_ext_out/demo", help="output directory")
    p.add_argument("--activations-dir", default=None,
                   help="where the capture is stored and reused (default OUT/activations)")


def capture_dir(activations_dir: str | Path, hook: str, context_size: int, n_rows: int) -> Path:
    """Where the demo stores (and finds again) the default model's capture of ``n_rows`` sequences
    at ``hook``; benchmarks that share a capture with a demo run use the same path."""
    from sae_ext.models import DEFAULT_MODEL_NAME

    if not hook or "/" in hook:
        raise ValueError(f"hook must be a hook name such as 'blocks.15.hook_mlp_out', got {hook!r}")
    for name, value in (("context_size", context_size), ("n_rows", n_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return Path(activations_dir) / f"{DEFAULT_MODEL_NAME}_{hook.replace('.', '_')}_{context_size}_{n_rows}"


def run_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the main job and return its table rows."""
    from sae_ext.capture import capture_activations, check_hook_name, hook_width
    from sae_ext.convergence import run_convergence, train_with_half_budget
    from sae_ext.dashboard import write_demo_dashboard
    from sae_ext.data import default_token_dataset
    from sae_ext.evaluate import evaluate_sae
    from sae_ext.model_io import special_token_ids
    from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model

    for name, value in [("--tokens", args.tokens), ("--capture-tokens", args.capture_tokens),
                        ("--width", args.width), ("--eval-tokens", args.eval_tokens), ("--k", args.k)]:
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    entries = demo_entries(args.k, args.group_rank, args.l1_coefficient)
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in entries})
        if unknown:
            raise ValueError(f"unknown demo entries {unknown}; choose from {[e.name for e in entries]}")
        entries = [e for e in entries if e.name in args.only]
    out = Path(args.out)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    model = load_default_model()
    check_hook_name(model, args.hook)
    d_in = hook_width(model, args.hook)
    configs = {e.name: e.config(d_in, args.width) for e in entries}  # validate before any work
    out.mkdir(parents=True, exist_ok=True)
    phases["load model"] = time.perf_counter() - t0

    t = time.perf_counter()
    train_ds = default_token_dataset(model.tokenizer, args.context_size, n_tokens=args.capture_tokens, split="train")
    eval_ds = default_token_dataset(model.tokenizer, args.context_size, n_tokens=args.eval_tokens, split="eval")
    acts_dir = Path(args.activations_dir or out / "activations")
    cache = capture_activations(
        model, train_ds, args.hook, capture_dir(acts_dir, args.hook, args.context_size, len(train_ds)),
        model_name=DEFAULT_MODEL_NAME,
    )
    # held-out activations at the hook, special positions out (SPEC §8), for the convergence check
    eval_cache = capture_activations(
        model, eval_ds, args.hook, capture_dir(acts_dir / "eval", args.hook, args.context_size, len(eval_ds)),
        model_name=DEFAULT_MODEL_NAME,
    )
    x_eval = eval_cache.kept_activations(special_token_ids(model))
    phases["tokenize + capture"] = time.perf_counter() - t

    rows: list[dict[str, Any]] = []
    for entry in entries:
        t = time.perf_counter()
        sae_dir = out / "saes" / entry.name.replace("@", "_at_")
        train_with_half_budget(  # the run and its half-budget twin: the convergence check (SPEC §8)
            configs[entry.name], cache, model, sae_dir,
            training_tokens=args.tokens, train_batch_size_tokens=args.batch_size, lr=args.lr, seed=args.seed,
        )
        train_s = time.perf_counter() - t
        conv = run_convergence(sae_dir, x_eval)
        t = time.perf_counter()
        sae = SAE.load_from_disk(sae_dir)
        res = evaluate_sae(
            sae, model, eval_ds, n_tokens=len(eval_ds) * args.context_size, out_dir=sae_dir / "eval",
            splices=args.full_eval,
        )
        phases[f"train {entry.name}"] = train_s
        phases[f"eval {entry.name}"] = time.perf_counter() - t
        write_demo_dashboard(sae_dir.name, entry.architecture, sae, model, eval_ds, out)
        rows.append({**summarize(entry.name, entry.architecture, res), "r2_half": conv.r2_half,
                     "converged": conv.converged, "train_seconds": train_s, "path": str(sae_dir)})
    phases["total"] = time.perf_counter() - t0
    report = {
        "model": DEFAULT_MODEL_NAME,
        "hook": args.hook,
        "d_in": d_in,
        "captured_tokens": cache.n_tokens,
        "training_tokens": args.tokens,
        "eval_tokens": len(eval_ds) * args.context_size,
        "ce_clean": rows[0]["ce_clean"] if rows else None,
        "rows": rows,
        "phase_seconds": phases,
        "args": vars(args),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plot_report(rows, out / "report.png")
    table = markdown_table(rows)
    md = [
        f"# sae-ext demo — {DEFAULT_MODEL_NAME} `{args.hook}`",
        "",
        f"{cache.n_tokens:,} captured tokens of Python-docs prose (each SAE trained on {args.tokens:,} tokens "
        f"from them), evaluated on {report['eval_tokens']:,} held-out tokens. CE without SAE: {report['ce_clean']:.4f}.",
        "",
        DEMO_SCALE_NOTE,
        "",
        table,
        "",
        "![R² vs L0, dead/dense fractions, dark matter, bipolar census and group ranks](report.png)",
        "",
        "Phase wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()),
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(f"\nCE without SAE: {report['ce_clean']:.4f}\n")
    print(table)
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return rows
