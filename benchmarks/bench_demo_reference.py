"""Does `make demo` reach 0.9 of a converged held-out R²? (issue 15 item 5, SPEC §8)

Loads the SAEs a demo run wrote (``<demo>/report.json``), evaluates each on the same held-out
tokens as ``bench_convergence.py`` (the eval split's non-special tokens at the demo's hook), and
sets it beside its reference in ``benchmarks/results/convergence.json``: the same line (architecture
and settings, as ``sae_ext.demo.demo_entries`` builds it) at the largest budget whose R² moved
≤ 0.01 from its half-budget run. Lines whose sparsity depends on the budget (L1 / L0 penalties) are
shown with both L0s, so a ratio is never read without the operating point it was measured at.

    make demo                                       # writes sae_ext_out/demo
    python benchmarks/bench_convergence.py --hooks blocks.15.hook_resid_mid \\
        --archs topk batchtopk gated sign_aware_gated@H scaffold_batchtopk sasa
    python benchmarks/bench_demo_reference.py       # -> benchmarks/results/demo_reference.{md,json}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench_convergence import DEMO_LINES, KNOBS, RESULTS, captures, heldout_metrics, ladder
from sae_lens import SAE
from tqdm.auto import tqdm

import sae_ext  # noqa: F401  (registers the plugin architectures)
from sae_ext.demo import demo_entries
from sae_ext.eval_report import fmt
from sae_ext.model_io import special_token_ids

#: Issue 15 item 5: every demo SAE reaches this share of its converged held-out R².
TARGET_SHARE = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="sae_ext_out/demo", help="the demo's output directory (holds report.json)")
    p.add_argument("--convergence", default=str(RESULTS / "convergence.json"))
    p.add_argument("--captures", default="sae_ext_out/captures", help="bench_convergence's captures")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=32_768)
    p.add_argument("--tag", default="demo_reference")
    args = p.parse_args(argv)
    for flag, path in (("--demo", Path(args.demo) / "report.json"), ("--convergence", Path(args.convergence))):
        if not path.is_file():
            p.error(f"{flag}: {path} does not exist (run `make demo` / bench_convergence.py first)")
    return args


def line_of(row: dict[str, Any], report: dict[str, Any]) -> tuple[str, str, Any]:
    """The convergence line of one demo row: its name there, its knob and the knob's value."""
    a = report["args"]
    entry = {e.name: e for e in demo_entries(a["k"], a["group_rank"], a["l1_coefficient"])}[row["name"]]
    if entry.name in DEMO_LINES:
        knob = DEMO_LINES[entry.name][1]
        return entry.name, knob, entry.kwargs[knob]
    knob = KNOBS[entry.architecture]
    return entry.architecture, knob, entry.kwargs[knob]


def reference(runs: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """The largest-budget converged run of one ladder, else its largest run (flagged unconverged)."""
    runs = sorted(runs, key=lambda r: r["args"]["tokens"])
    converged = [r for r in runs if r.get("converged")]
    if converged:
        return converged[-1], True
    return (runs[-1] if runs else None), False


def compare(report: dict[str, Any], results: list[dict[str, Any]], evaluated: dict[str, dict[str, float]],
            d_sae_of: dict[str, int]) -> list[dict[str, Any]]:
    """One row per demo SAE: its held-out metrics, its reference run and the R² share."""
    groups = ladder(results)
    rows = []
    for row in report["rows"]:
        arch, knob, value = line_of(row, report)
        runs = [r for (hook, a, batch), rs in groups.items() if hook == report["hook"] and a == arch
                and batch == report["args"]["batch_size"]
                for r in rs if r["args"]["value"] == value and r["args"]["d_sae"] == d_sae_of[row["name"]]]
        ref, converged = reference(runs)
        got = evaluated[row["name"]]
        rows.append({
            "name": row["name"], "knob": f"{knob} {value}", "demo_tokens": report["training_tokens"],
            "demo_r2": got["r2"], "demo_l0": got["l0"], "demo_dead": got["dead_fraction"],
            "ref_tokens": None if ref is None else ref["args"]["tokens"],
            "ref_r2": None if ref is None else ref["r2"], "ref_l0": None if ref is None else ref["l0"],
            "ref_converged": converged,
            "share": None if ref is None else got["r2"] / ref["r2"],
        })
    return rows


def write_report(rows: list[dict[str, Any]], report: dict[str, Any], tag: str) -> None:
    (RESULTS / f"{tag}.json").write_text(json.dumps({"hook": report["hook"], "demo_args": report["args"],
                                                     "target_share": TARGET_SHARE, "rows": rows}, indent=2))
    lines = [
        f"# The demo against converged references (`{report['hook']}`)",
        "",
        f"The SAEs of one `make demo` run ({report['training_tokens']:,} training tokens each from a "
        f"{report['captured_tokens']:,}-token capture, batch {report['args']['batch_size']}, seed "
        f"{report['args']['seed']}) and their references from `benchmarks/results/convergence.md` (the same line "
        "trained on the whole 704,640-token train capture, seed 0), all evaluated on the same 32k held-out "
        "non-special tokens. **reference**: the largest budget whose R² moved ≤ 0.01 from its half-budget run "
        f"(SPEC §8). **share** = demo R² / reference R²; the target is ≥ {TARGET_SHARE}.",
        "Reproduce: `make demo`, then `python benchmarks/bench_demo_reference.py`.",
        "",
        "| SAE | knob | demo R² | demo L0 | demo dead | reference | ref. R² | ref. L0 | share |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["ref_r2"] is None:
            ref = "none"
        else:
            ref = f"{r['ref_tokens'] / 1e6:.2f}M" + ("" if r["ref_converged"] else " (not converged)")
        lines.append(f"| {r['name']} | {r['knob']} | {r['demo_r2']:.3f} | {r['demo_l0']:.1f} | "
                     f"{r['demo_dead']:.3f} | {ref} | {fmt(r['ref_r2'])} | {fmt(r['ref_l0'])} | {fmt(r['share'])} |")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = json.loads((Path(args.demo) / "report.json").read_text())
    results = json.loads(Path(args.convergence).read_text())
    conv_args = argparse.Namespace(captures=args.captures, context_size=args.context_size,
                                   eval_tokens=args.eval_tokens, hooks=[report["hook"]], storage_dtype="float32")
    _, eval_caches, model = captures(conv_args)
    x_eval = eval_caches[report["hook"]].kept_activations(special_token_ids(model))
    evaluated, d_sae_of = {}, {}
    for row in tqdm(report["rows"], desc="demo SAEs"):
        sae = SAE.load_from_disk(row["path"])
        evaluated[row["name"]] = heldout_metrics(sae, x_eval)
        d_sae_of[row["name"]] = sae.cfg.d_sae
    rows = compare(report, results, evaluated, d_sae_of)
    write_report(rows, report, args.tag)
    print((RESULTS / f"{args.tag}.md").read_text())


if __name__ == "__main__":
    main()
