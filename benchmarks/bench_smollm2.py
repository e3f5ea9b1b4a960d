"""The seeds' claims on real activations: SmolLM2-135M (the embedded default model).

Runs the demo's pipeline (one capture per hook, every architecture beside its SAELens sibling,
SAELens ``run_evals`` + dark matter + dictionary stats, and with ``--full-eval`` the dark-matter
CE splices, error-node ablation and the scaffold-vs-PCA ablation) for each hook and seed, plus
SASA at a fraction of the token budget, and aggregates mean ± sd per hook into
``benchmarks/results/smollm2.{json,md}``.

    python benchmarks/bench_smollm2.py                                   # resid_post, 1 seed
    python benchmarks/bench_smollm2.py --hooks blocks.15.hook_resid_mid blocks.15.hook_mlp_out \\
        blocks.15.hook_attn_out --seeds 0 1 2                            # the full grid (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sae_ext.bench import format_mean_sd, mean_sd
from sae_ext.demo import add_demo_arguments, run_demo
from sae_ext.perf import retain_freed_memory

RESULTS = Path(__file__).parent / "results"
METRICS = [
    "l0", "explained_variance", "dead_fraction", "dense_fraction", "bipolar_fraction", "ce_sae",
    "ce_loss_recovered", "kl_score", "error_r2", "norm_r2", "fvu", "nonlinear_fvu", "ce_sae_linear",
    "ce_sae_nonlinear", "mean_group_stable_rank", "scaffold_ce_ratio", "pca_removal_ce_ratio",
]


def demo_args(**overrides: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_demo_arguments(p)
    args = p.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def finished_rows(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """Rows of a finished run in ``args.out`` whose stored arguments equal ``args``, else None (``--resume``)."""
    report = Path(args.out) / "report.json"
    if not report.exists():
        return None
    stored = json.loads(report.read_text())
    return stored["rows"] if stored.get("args") == json.loads(json.dumps(vars(args), default=str)) else None


def run_or_resume(args: argparse.Namespace, resume: bool) -> list[dict[str, Any]]:
    """Run one demo, or with ``resume`` reuse its finished report when the arguments match."""
    rows = finished_rows(args) if resume else None
    if rows is not None:
        print(f"resume: reusing {args.out}/report.json")
        return rows
    return run_demo(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hooks", nargs="+", default=["blocks.15.hook_resid_post"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--capture-tokens", type=int, default=60_000)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--half-budget", type=float, default=0.5,
                   help="SASA token fraction (paper: ~½); 0 skips the extra SASA run")
    p.add_argument("--l1-coefficient", type=float, default=10.0, help="λ of the two gated SAEs (demo default)")
    p.add_argument("--no-full-eval", action="store_true")
    p.add_argument("--only", nargs="*", help="demo entries to train (default: all)")
    p.add_argument("--out", type=Path, default=Path("sae_ext_out/bench_smollm2"))
    p.add_argument("--tag", default="smollm2", help="results go to benchmarks/results/TAG.{json,md}")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs under --out whose report.json was written with the same arguments")
    args = p.parse_args()
    retain_freed_memory()
    t0 = time.perf_counter()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    run_dirs: list[Path] = []  # every run of this invocation, resumed or not
    half_sasa = args.half_budget > 0 and (not args.only or "sasa" in args.only)
    for hook in args.hooks:
        for seed in args.seeds:
            common = dict(hook=hook, seed=seed, capture_tokens=args.capture_tokens, eval_tokens=args.eval_tokens,
                          width=args.width, k=args.k, full_eval=not args.no_full_eval,
                          l1_coefficient=args.l1_coefficient,
                          activations_dir=str(args.out / "activations"))
            run_dirs.append(args.out / hook / f"seed{seed}")
            rows = run_or_resume(demo_args(tokens=args.tokens, only=args.only, out=str(run_dirs[-1]), **common),
                                 args.resume)
            if half_sasa:
                run_dirs.append(args.out / hook / f"seed{seed}_sasa_half")
                rows += [
                    {**r, "name": f"sasa@{args.half_budget:g}×tokens"}
                    for r in run_or_resume(demo_args(tokens=int(args.tokens * args.half_budget), only=["sasa"],
                                                     out=str(run_dirs[-1]), **common), args.resume)
                ]
            for r in rows:
                runs.setdefault(hook, {}).setdefault(r["name"], []).append(r)
    summary = {
        hook: {name: {m: mean_sd([r.get(m) for r in rs]) for m in METRICS} for name, rs in by_name.items()}
        for hook, by_name in runs.items()
    }
    # compute time of every run, resumed or not: the sum of the runs' own recorded totals
    run_seconds = sum(json.loads((d / "report.json").read_text())["phase_seconds"]["total"] for d in run_dirs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs,
         "wall_seconds": time.perf_counter() - t0, "run_seconds": run_seconds}, indent=2, default=str))
    cols = ["l0", "explained_variance", "dead_fraction", "dense_fraction", "bipolar_fraction", "ce_loss_recovered",
            "error_r2", "norm_r2", "nonlinear_fvu", "scaffold_ce_ratio", "pca_removal_ce_ratio"]
    md = [f"# SmolLM2-135M results (seeds {args.seeds}, {args.tokens:,} training tokens per SAE)", ""]
    for hook, by_name in summary.items():
        md += [f"## `{hook}`", "", "| SAE | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        md += ["| " + name + " | " + " | ".join(format_mean_sd(*stats[c]) for c in cols) + " |" for name, stats in by_name.items()]
        md.append("")
    md.append(f"Wall time {time.perf_counter() - t0:.0f} s; the runs' own totals sum to {run_seconds:.0f} s "
              f"(they differ where `--resume` reused finished runs). Command: `python benchmarks/bench_smollm2.py "
              f"--hooks {' '.join(args.hooks)} --seeds {' '.join(map(str, args.seeds))} --tokens {args.tokens} "
              f"--capture-tokens {args.capture_tokens} --eval-tokens {args.eval_tokens} --tag {args.tag} "
              f"--l1-coefficient {args.l1_coefficient} --half-budget {args.half_budget}"
              + (" --no-full-eval" if args.no_full_eval else "")
              + (f" --only {' '.join(args.only)}`" if args.only else "`"))
    (RESULTS / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
