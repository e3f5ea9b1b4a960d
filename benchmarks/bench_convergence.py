"""How many tokens a SAELens SAE needs on SmolLM2 before held-out R² stops moving (SPEC §8).

One capture of the whole train split at every hook (``sae_ext.capture.capture_hooks``, one model
pass), then for each hook and architecture one run of ``--tokens`` tokens under the protocol
(special tokens out, dead window 10 % of the run, constant lr) with ``--checkpoints`` evenly spaced
SAELens checkpoints. Each checkpoint is the SAE a run of that budget would have given (constant lr),
so one run yields the whole R²-vs-tokens curve. R², L0, dead and dense fractions are measured on the
held-out eval split's non-special tokens. A run is converged at budget B when R²(B) − R²(B/2) ≤ 0.01.

    python benchmarks/bench_convergence.py                      # 4 hooks × topk/batchtopk/gated/jumprelu
    python benchmarks/bench_convergence.py --hooks blocks.15.hook_mlp_out --archs topk

Runs resume: a run whose ``result.json`` holds the same arguments is reused, so the grid can span
sessions; ``benchmarks/results/convergence.{json,md}`` are rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from tqdm.auto import tqdm

import sae_ext  # noqa: F401  (registers the plugin architectures)
from sae_ext.capture import (
    ActivationCache,
    capture_hooks,
    checkpoint_dirs,
    load_checkpoint,
    train_on_cache,
)
from sae_ext.convergence import heldout_r2
from sae_ext.metrics.dense import dense_fraction, firing_counts
from sae_ext.model_io import special_token_ids
from sae_ext.perf import retain_freed_memory
from sae_ext.protocol import CONVERGENCE_TOLERANCE, is_converged
from sae_ext.testing import small_training_config

RESULTS = Path(__file__).parent / "results"
HOOKS = ["blocks.15.hook_mlp_out", "blocks.15.hook_resid_mid", "blocks.15.hook_attn_out", "blocks.15.hook_resid_post"]
#: The sparsity knob of each SAELens baseline (gated: λ of the L1; jumprelu: λ₀ of the L0 term).
KNOBS = {"topk": "k", "batchtopk": "k", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", nargs="+", default=HOOKS)
    p.add_argument("--archs", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    p.add_argument("--d-sae", type=int, default=1152)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1-coefficient", type=float, default=10.0, help="gated λ (normalised inputs)")
    p.add_argument("--l0-coefficient", type=float, default=2.0, help="jumprelu λ₀ (normalised inputs)")
    p.add_argument("--tokens", type=int, default=3_200_000)
    p.add_argument("--checkpoints", type=int, default=7, help="evenly spaced mid-run evaluations")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=32_768)
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--captures", default="sae_ext_out/captures", help="where the captures are stored and reused")
    p.add_argument("--runs", default="sae_ext_out/convergence", help="where the SAEs are stored")
    p.add_argument("--tag", default="convergence", help="results file name under benchmarks/results/")
    return p.parse_args(argv)


def captures(args: argparse.Namespace) -> tuple[dict[str, ActivationCache], dict[str, ActivationCache], Any]:
    """The train and eval captures at every hook (made once, then reused)."""
    from sae_ext.data import default_token_dataset
    from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model

    model = load_default_model()
    base = Path(args.captures)
    suffix = f"{args.context_size}" + ("" if args.storage_dtype == "float32" else f"_{args.storage_dtype}")
    ev = default_token_dataset(model.tokenizer, args.context_size, n_tokens=args.eval_tokens, split="eval")
    tr = default_token_dataset(model.tokenizer, args.context_size, split="train")
    kw = {"model_name": DEFAULT_MODEL_NAME, "batch_size_prompts": 16, "dtype": args.storage_dtype}
    eval_caches = capture_hooks(model, ev, args.hooks, base / f"eval_{args.context_size}", **{**kw, "dtype": "float32"})
    train_caches = capture_hooks(model, tr, args.hooks, base / f"train_{suffix}", **kw)
    return train_caches, eval_caches, (model, tr)


@torch.no_grad()
def heldout_metrics(sae: SAE[Any], x: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """R² (SAELens's explained variance), L0, dead and dense fractions on the held-out ``x``."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for i in range(0, x.shape[0], batch):
        counts += firing_counts(sae.encode(x[i : i + batch])).double()
    n = x.shape[0]
    return {
        "r2": heldout_r2(sae, x, batch),
        "l0": float(counts.sum()) / n,
        "dead_fraction": float((counts == 0).double().mean()),
        "dense_fraction": float(dense_fraction(counts, n)),
    }


def sae_config(arch: str, d_in: int, args: argparse.Namespace) -> Any:
    knob = KNOBS[arch]
    value = {"k": args.k, "l1_coefficient": args.l1_coefficient, "l0_coefficient": args.l0_coefficient}[knob]
    return small_training_config(
        arch, d_in=d_in, d_sae=args.d_sae, normalize_activations="expected_average_only_in", **{knob: value}
    ), knob, value


def run_one(hook: str, arch: str, args: argparse.Namespace, train: ActivationCache, x_eval: torch.Tensor,
            model_and_rows: Any) -> dict[str, Any]:
    out = Path(args.runs) / hook.replace(".", "_") / arch
    cfg, knob, value = sae_config(arch, train.d_in, args)
    key = {"hook": hook, "arch": arch, "d_sae": args.d_sae, "knob": knob, "value": value, "tokens": args.tokens,
           "checkpoints": args.checkpoints, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "storage_dtype": args.storage_dtype, "train_tokens_captured": train.n_tokens}
    done = out / "result.json"
    if done.exists():
        stored = json.loads(done.read_text())
        if stored["args"] == key:
            print(f"resume: reusing {done}")
            return stored
    model, rows = model_and_rows
    t = time.perf_counter()
    train_on_cache(cfg, train, model, rows, out, training_tokens=args.tokens, train_batch_size_tokens=args.batch_size,
                   lr=args.lr, seed=args.seed, n_checkpoints=args.checkpoints)
    seconds = time.perf_counter() - t
    curve = [{"tokens": n, **heldout_metrics(load_checkpoint(p), x_eval)} for n, p in checkpoint_dirs(out).items()]
    curve.append({"tokens": args.tokens, **heldout_metrics(SAE.load_from_disk(out), x_eval)})
    half = min(curve[:-1], key=lambda c: abs(c["tokens"] - args.tokens / 2))
    result = {
        "args": key,
        "curve": curve,
        "half_budget_tokens": half["tokens"],
        "r2_half": half["r2"],
        "converged": is_converged(half["r2"], curve[-1]["r2"]),
        "train_seconds": seconds,
    }
    done.write_text(json.dumps(result, indent=2))
    return result


def first_converged_budget(curve: list[dict[str, Any]]) -> int | None:
    """The smallest budget B of the curve whose R² is within the tolerance of R² at ~B/2."""
    for c in curve:
        halves = [h for h in curve if abs(h["tokens"] - c["tokens"] / 2) <= c["tokens"] * 0.06]
        if halves and c["r2"] - halves[0]["r2"] <= CONVERGENCE_TOLERANCE:
            return c["tokens"]
    return None


def write_report(results: list[dict[str, Any]], tag: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Convergence of SAELens baselines on SmolLM2 under SPEC §8",
        "",
        "Held-out R² (non-special eval tokens) against training tokens; one run per row, each point a SAELens",
        "checkpoint of that run (constant lr, so a checkpoint is the SAE of that budget). `conv. at` is the",
        f"smallest budget B with R²(B) − R²(B/2) ≤ {CONVERGENCE_TOLERANCE}.",
        "",
    ]
    for r in results:
        a = r["args"]
        pts = ", ".join(f"{c['tokens'] / 1e6:.1f}M {c['r2']:.3f}" for c in r["curve"])
        last = r["curve"][-1]
        conv = first_converged_budget(r["curve"])
        lines.append(
            f"- `{a['hook']}` **{a['arch']}** ({a['knob']} {a['value']}, d_sae {a['d_sae']}): R² {pts}; "
            f"final L0 {last['l0']:.1f}, dead {last['dead_fraction']:.3f}, dense {last['dense_fraction']:.3f}; "
            f"converged at {a['tokens'] / 1e6:.1f}M: {'yes' if r['converged'] else 'no'} "
            f"(R² {r['r2_half']:.3f} → {last['r2']:.3f}); conv. at {conv / 1e6 if conv else float('nan'):.1f}M; "
            f"train {r['train_seconds']:.0f} s"
        )
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()
    train_caches, eval_caches, model_and_rows = captures(args)
    results_path = RESULTS / f"{args.tag}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    grid = [(h, a) for h in args.hooks for a in args.archs]
    for hook, arch in tqdm(grid, desc="convergence runs"):
        ev = eval_caches[hook]
        ids = ev.token_ids()
        special = torch.tensor(special_token_ids(model_and_rows[0]), dtype=torch.long)
        x_eval = ev.activations()[~torch.isin(ids, special)]
        res = run_one(hook, arch, args, train_caches[hook], x_eval, model_and_rows)
        results = [r for r in results if (r["args"]["hook"], r["args"]["arch"]) != (hook, arch)] + [res]
        write_report(results, args.tag)


if __name__ == "__main__":
    main()
