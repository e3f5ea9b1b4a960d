"""`sae-ext demo`: the main job.

Capture activations of the embedded SmolLM2-135M at one hook on the embedded text once, train
every demo SAE on the stored activations through SAELens's runner, evaluate each with SAELens's
``run_evals`` on held-out text (explained variance, L0, dead fraction, CE/KL loss recovered by
splicing), and write ``report.md``, ``report.json`` and an R²-vs-L0 plot.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, ActivationsStore
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler

DEFAULT_HOOK = "blocks.15.hook_mlp_out"


@dataclass
class DemoEntry:
    """One SAE of the demo: a row of the table."""

    name: str
    architecture: str
    d_sae: Callable[[int, int], int]  # (d_in, width) -> d_sae
    kwargs: dict[str, Any] = field(default_factory=dict)
    sibling_of: str | None = None  # name of the plugin entry this SAELens SAE is compared with

    def config(self, d_in: int, width: int) -> TrainingSAEConfig:
        cfg_cls = get_sae_training_class(self.architecture)[1]
        return cfg_cls(d_in=d_in, d_sae=self.d_sae(d_in, width), **self.kwargs)


def demo_entries(k: int = 32) -> list[DemoEntry]:
    """The SAEs the demo trains; each plugin architecture sits beside its SAELens sibling."""
    return [
        DemoEntry("gated@2H", "gated", lambda d, w: 2 * w, {"l1_coefficient": 2.0}),
        DemoEntry("batchtopk", "batchtopk", lambda d, w: 2 * w, {"k": k}),
    ]


def evaluate_sae(
    sae: SAE[Any], model: Any, eval_dataset: Any, n_batches: int = 8, batch_prompts: int = 8
) -> dict[str, float]:
    """SAELens ``run_evals`` on held-out token rows: reconstruction, sparsity and CE/KL splicing."""
    context_size = len(eval_dataset[0]["input_ids"])
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=eval_dataset,
        context_size=context_size,
        streaming=False,
        store_batch_size_prompts=batch_prompts,
        n_batches_in_buffer=2,
        train_batch_size_tokens=batch_prompts * context_size,
    )
    cfg = EvalConfig(
        batch_size_prompts=batch_prompts,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    metrics, feature_metrics = run_evals(
        sae, store, model, ActivationScaler(), cfg, exclude_special_tokens=True
    )
    density = torch.as_tensor(feature_metrics["feature_density"])
    flat = _flatten(metrics)
    return {
        "explained_variance": flat["reconstruction_quality/explained_variance"],
        "l0": flat["sparsity/l0"],
        "dead_fraction": float((density == 0).float().mean()),
        "dense_fraction": float((density > 0.1).float().mean()),
        "ce_clean": flat["model_performance_preservation/ce_loss_without_sae"],
        "ce_sae": flat["model_performance_preservation/ce_loss_with_sae"],
        "ce_zero_ablation": flat["model_performance_preservation/ce_loss_with_ablation"],
        "ce_loss_recovered": flat["model_performance_preservation/ce_loss_score"],
        "kl_score": flat["model_behavior_preservation/kl_div_score"],
        "kl_with_sae": flat["model_behavior_preservation/kl_div_with_sae"],
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


COLUMNS = [
    ("name", "SAE", "{}"),
    ("architecture", "architecture", "{}"),
    ("d_sae", "d_sae", "{}"),
    ("l0", "L0", "{:.1f}"),
    ("explained_variance", "R²", "{:.3f}"),
    ("dead_fraction", "dead", "{:.3f}"),
    ("dense_fraction", "dense", "{:.3f}"),
    ("ce_sae", "CE with SAE", "{:.4f}"),
    ("ce_loss_recovered", "CE loss rec.", "{:.3f}"),
    ("kl_score", "KL score", "{:.3f}"),
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


def plot_r2_vs_l0(rows: list[dict[str, Any]], path: Path) -> None:
    """Scatter of explained variance against L0, one labelled point per SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        marker = "o" if r["architecture"] in _plugin_archs() else "s"
        ax.scatter(r["l0"], r["explained_variance"], marker=marker, s=50)
        ax.annotate(r["name"], (r["l0"], r["explained_variance"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("explained variance R²")
    ax.set_title("R² vs L0 (circles: sae_ext, squares: SAELens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plugin_archs() -> set[str]:
    from sae_ext.registry import PLUGIN_TRAINING_ARCHITECTURES

    return set(PLUGIN_TRAINING_ARCHITECTURES)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=300_000, help="training tokens per SAE (default 300k)")
    p.add_argument("--capture-tokens", type=int, default=100_000, help="activations captured once and reused (default 100k)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 8×128 tokens for run_evals")
    p.add_argument("--hook", default=DEFAULT_HOOK, help=f"TransformerLens hook (default {DEFAULT_HOOK})")
    p.add_argument("--width", type=int, default=1152, help="H: the plugin SAEs' width; siblings get 2H where the paper says so")
    p.add_argument("--k", type=int, default=32, help="active latents per token for the TopK family")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size in tokens")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", nargs="*", help="train only these demo entries (by name)")
    p.add_argument("--out", default="sae_ext_out/demo", help="output directory")


def run_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the main job and return its table rows."""
    from sae_ext.capture import capture_activations, train_on_cache
    from sae_ext.data import default_token_dataset
    from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model

    entries = demo_entries(args.k)
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in entries})
        if unknown:
            raise ValueError(f"unknown demo entries {unknown}; choose from {[e.name for e in entries]}")
        entries = [e for e in entries if e.name in args.only]
    for name, value in [("--tokens", args.tokens), ("--capture-tokens", args.capture_tokens), ("--width", args.width)]:
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    model = load_default_model()
    from sae_ext.capture import check_hook_name, hook_width

    check_hook_name(model, args.hook)
    d_in = hook_width(model, args.hook)
    configs = {e.name: e.config(d_in, args.width) for e in entries}  # validate before work
    phases["load model"] = time.perf_counter() - t0

    t = time.perf_counter()
    train_ds = default_token_dataset(model.tokenizer, args.context_size, n_tokens=args.capture_tokens, split="train")
    eval_ds = default_token_dataset(
        model.tokenizer, args.context_size, n_tokens=args.eval_batches * 8 * args.context_size, split="eval"
    )
    safe_hook = args.hook.replace(".", "_")
    cache = capture_activations(
        model,
        train_ds,
        args.hook,
        out / "activations" / f"{DEFAULT_MODEL_NAME}_{safe_hook}_{args.context_size}_{len(train_ds)}",
        n_tokens=len(train_ds) * args.context_size,
        model_name=DEFAULT_MODEL_NAME,
    )
    phases["tokenize + capture"] = time.perf_counter() - t

    rows: list[dict[str, Any]] = []
    for entry in entries:
        t = time.perf_counter()
        sae_dir = out / "saes" / entry.name.replace("@", "_at_")
        train_on_cache(
            configs[entry.name],
            cache,
            model,
            train_ds,
            sae_dir,
            training_tokens=args.tokens,
            train_batch_size_tokens=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        sae = SAE.load_from_disk(sae_dir)
        metrics = evaluate_sae(sae, model, eval_ds, n_batches=args.eval_batches)
        phases[f"train {entry.name}"] = train_s
        phases[f"eval {entry.name}"] = time.perf_counter() - t
        rows.append(
            {"name": entry.name, "architecture": entry.architecture, "d_sae": sae.cfg.d_sae,
             "train_seconds": train_s, "path": str(sae_dir), **metrics}
        )
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
    plot_r2_vs_l0(rows, out / "r2_vs_l0.png")
    table = markdown_table(rows)
    md = [
        f"# sae-ext demo — {DEFAULT_MODEL_NAME} `{args.hook}`",
        "",
        f"{cache.n_tokens:,} captured tokens of Python-docs prose (trained {args.tokens:,} tokens per SAE), "
        f"evaluated on {report['eval_tokens']:,} held-out tokens. CE without SAE: {report['ce_clean']:.4f}.",
        "",
        table,
        "",
        "![R² vs L0](r2_vs_l0.png)",
        "",
        "Phase wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()),
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(f"\nCE without SAE: {report['ce_clean']:.4f}\n")
    print(table)
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'}, {out / 'r2_vs_l0.png'}")
    return rows
