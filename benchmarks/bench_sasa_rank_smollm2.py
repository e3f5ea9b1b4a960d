"""SASA's group-rank trade-off on SmolLM2, read from a finished sweep (issue 18 item 3).

The grid's SASA lines (``sasa``, ``sasa_batchtopk``) hold the active columns s·r fixed while the
group rank r varies; its ``topk`` / ``batchtopk`` runs at k = s·r are the baselines
(:data:`sae_ext.sweep.BASELINE_ARCHITECTURE`). Per SASA run: its nuclear-norm coefficient λ_nuc as
trained (a grid may mix them), R², CE / KL loss recovered, dead and dense latents, the mean stable
rank of the decoder groups, the gaps to the baseline run of the same active columns at the full
budget and with SASA at half the tokens (its half-budget run, the paper's "matches at ~½ the
tokens"), and, given the probes report of the same grid
(``bench_probes_smollm2.py``), first-letter absorption and split features. The recommended r of
each architecture is its converged run with the best held-out R². Writes
``benchmarks/results/sasa_rank_smollm2_<grid>.{md,json,png}``.

    python benchmarks/bench_sasa_rank_smollm2.py --grid benchmarks/sweeps/sasa_rank_resid_mid.toml
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from sae_ext.eval_report import fmt
from sae_ext.eval_result import json_safe
from sae_ext.sweep import (
    BASELINE_ARCHITECTURE,
    SASA_ARCHITECTURES,
    active_columns,
    add_report_arguments,
    config_value,
    curve_of,
    finished_report,
    group_rank_of,
)

RESULTS = Path(__file__).parent / "results"
#: per-run metrics of the sweep report compared with the baseline (higher is better for all)
GAP_METRICS = ("r2", "ce_loss_recovered", "kl_score")
#: probe metrics taken from the probes report when given (lower is better for all)
PROBE_METRICS = ("absorption_fraction", "full_absorption_rate", "split_features")


def _mean(rows: list[dict[str, Any]], metric: str) -> float:
    vals = [r[metric] for r in rows if r.get(metric) is not None]
    return sum(vals) / len(vals) if vals else math.nan


def _num(v: float | None) -> float:
    return math.nan if v is None else v


def _probe_key(r: dict[str, Any]) -> tuple[str, Any, int]:
    return (r["line"], r["value"], r["seed"])


def rank_rows(records: list[dict[str, Any]], probes: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per SASA run: its group rank, metrics, and gaps to the converged baseline runs of the
    same active columns (seeds averaged; NaN where there is none). ``probes``: rows of a probes
    report of the same grid, matched by line, knob value and seed."""
    by_run = {_probe_key(p): p for p in probes or []}
    rows = []
    for r in records:
        if r["architecture"] not in SASA_ARCHITECTURES:
            continue
        cols = active_columns(r)
        row: dict[str, Any] = {
            "line": curve_of(r), "architecture": r["architecture"], "group_rank": group_rank_of(r),
            "n_active_groups": r["value"], "nuclear_coefficient": config_value(r, "nuclear_coefficient"),
            "active_columns": cols, "seed": r["seed"], "l0": r["l0"],
            "converged": r["converged"], "r2_half": r["r2_half"], "dead_fraction": r["dead_fraction"],
            "dense_fraction": r["dense_fraction"], "mean_group_stable_rank": r.get("mean_group_stable_rank"),
        }
        for base in dict.fromkeys([BASELINE_ARCHITECTURE[r["architecture"]], "topk"]):
            same = [b for b in records if b["architecture"] == base and b["converged"] and active_columns(b) == cols]
            for m in GAP_METRICS:
                row[m] = r[m]
                row[f"{m}_{base}"] = _mean(same, m)
                row[f"{m}_gap_{base}"] = r[m] - row[f"{m}_{base}"]
            row[f"r2_half_gap_{base}"] = _num(r["r2_half"]) - row[f"r2_{base}"]
            for m in PROBE_METRICS:
                base_probes = [by_run[_probe_key(b)] for b in same if _probe_key(b) in by_run]
                row[f"{m}_{base}"] = _mean(base_probes, m)
        for m in PROBE_METRICS:
            row[m] = by_run.get(_probe_key(r), {}).get(m, math.nan)
        rows.append(row)
    return sorted(rows, key=lambda x: (x["architecture"], x["active_columns"], x["group_rank"], x["seed"]))


def recommend(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Architecture → its converged run with the best R² (group rank, R², CE loss recovered)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["converged"] and (r["architecture"] not in best or r["r2"] > best[r["architecture"]]["r2"]):
            best[r["architecture"]] = r
    return {a: {"group_rank": r["group_rank"], "r2": r["r2"], "ce_loss_recovered": r["ce_loss_recovered"]}
            for a, r in best.items()}


def _f(v: Any, p: str = ".4f") -> str:
    return fmt(v, p)


def markdown(grid_name: str, hook: str, rows: list[dict[str, Any]], best: dict[str, dict[str, Any]],
             command: str, png: str) -> str:
    """The report: every SASA run against its baseline and TopK, and the recommended r."""
    out = [
        f"# SASA rank trade-off on SmolLM2 at `{hook}` (sweep `{grid_name}`)", "",
        "SPEC §8 runs of one sweep (special tokens out of training and every statistic; converged = held-out R² "
        "moved ≤ 0.01 from the half-budget run). Fixed active columns s·r, group rank r varied. Gaps are the SASA "
        "run minus the converged baseline run of the same active columns (`sasa` ↔ `topk`, `sasa_batchtopk` ↔ "
        "`batchtopk`; both ↔ `topk` in the last columns); \"R² @½\" is SASA's half-budget run against the "
        "baseline's full budget.", "",
        f"Command: `{command}`", "",
        "| line | r | s | λ_nuc | L0 | conv. | R² | ΔR² base | R² @½ − base | CE rec. | ΔCE base | ΔKL base | "
        "ΔR² TopK | dead | dense | group stable rank | absorption (base) | split (base) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = BASELINE_ARCHITECTURE[r["architecture"]]
        out.append(
            f"| {r['line']} | {r['group_rank']} | {r['n_active_groups']} | {r['nuclear_coefficient']:g} | {r['l0']:.1f} | "
            f"{'yes' if r['converged'] else 'no'} | {_f(r['r2'])} | {_f(r['r2_gap_' + base], '+.4f')} | "
            f"{_f(r['r2_half_gap_' + base], '+.4f')} | {_f(r['ce_loss_recovered'])} | "
            f"{_f(r['ce_loss_recovered_gap_' + base], '+.4f')} | {_f(r['kl_score_gap_' + base], '+.4f')} | "
            f"{_f(r['r2_gap_topk'], '+.4f')} | {_f(r['dead_fraction'], '.3f')} | {_f(r['dense_fraction'], '.3f')} | "
            f"{_f(r['mean_group_stable_rank'], '.2f')} | {_f(r['absorption_fraction'], '.3f')} "
            f"({_f(r['absorption_fraction_' + base], '.3f')}) | {_f(r['split_features'], '.2f')} "
            f"({_f(r['split_features_' + base], '.2f')}) |")
    out += ["", "## Recommended group rank (best converged held-out R²)", ""]
    out += [f"- `{a}`: r = {b['group_rank']} (R² {b['r2']:.4f}, CE loss recovered {_f(b['ce_loss_recovered'])})"
            for a, b in sorted(best.items())] or ["- no converged SASA run"]
    return "\n".join(out + ["", f"![R² and CE loss recovered against the group rank]({png})", ""])


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """R² and CE loss recovered against r (log₂ axis), one line per SASA architecture and active
    columns through its converged runs (unconverged runs as open markers), the baselines of the
    same active columns as dashed horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, label in zip(axes, ("r2", "ce_loss_recovered"), ("held-out R²", "CE loss recovered")):
        baselines: dict[tuple[str, Any], float] = {}
        for arch in SASA_ARCHITECTURES:
            for cols in sorted({r["active_columns"] for r in rows if r["architecture"] == arch}):
                line = [r for r in rows if r["architecture"] == arch and r["active_columns"] == cols]
                pts = sorted((r["group_rank"], r[metric]) for r in line if r["converged"])
                off = sorted((r["group_rank"], r[metric]) for r in line if not r["converged"])
                colour = f"C{SASA_ARCHITECTURES.index(arch)}"
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, label=f"{arch}, s·r = {cols}")
                if off:  # shown, not joined: a run that did not converge is no point of the curve
                    ax.scatter([p[0] for p in off], [p[1] for p in off], marker="o", facecolors="none",
                               edgecolors=colour, label=f"{arch}, s·r = {cols}, not converged")
                base = BASELINE_ARCHITECTURE[arch]
                vals = [r[f"{metric}_{base}"] for r in rows if r["architecture"] == arch and r["active_columns"] == cols]
                if vals and math.isfinite(vals[0]):
                    baselines[(base, cols)] = vals[0]
        for (base, cols), v in sorted(baselines.items()):
            ax.axhline(v, ls="--", lw=1, color="grey" if base == "topk" else "black", label=f"{base}, k = {cols}")
        ax.set_xscale("log", base=2)
        ranks = sorted({r["group_rank"] for r in rows})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("group rank r (s·r fixed)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_report_arguments(p, RESULTS / "sweeps")
    p.add_argument("--probes", type=Path, default=None,
                   help="probes report of the grid (default: results/probes_smollm2_<grid>.json when present)")
    args = p.parse_args()
    grid, report, records = finished_report(args.grid, args.results)
    probes_path = args.probes or RESULTS / f"probes_smollm2_{grid.name}.json"
    if args.probes is not None and not probes_path.is_file():
        raise SystemExit(f"--probes {probes_path}: no such file")
    probes = json.loads(probes_path.read_text())["runs"] if probes_path.is_file() else None
    rows = rank_rows(records, probes)
    if not rows:
        raise SystemExit(f"{report} has no run of {' / '.join(SASA_ARCHITECTURES)}")
    best = recommend(rows)
    tag = f"sasa_rank_smollm2_{grid.name}"
    png = RESULTS / f"{tag}.png"
    plot(rows, png, f"{grid.name}: SASA group rank at fixed s·r ({grid.hook})")
    command = "python benchmarks/bench_sasa_rank_smollm2.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{tag}.json").write_text(json.dumps(json_safe({
        "grid": str(args.grid), "hook": grid.hook, "report": str(report), "command": command,
        "probes": str(probes_path) if probes is not None else None, "runs": rows, "recommended": best,
    }), indent=2, allow_nan=False))
    (RESULTS / f"{tag}.md").write_text(markdown(grid.name, grid.hook, rows, best, command, png.name))
    print(f"wrote {RESULTS / tag}.{{md,json,png}}")


if __name__ == "__main__":
    main()
