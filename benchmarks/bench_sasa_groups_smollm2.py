"""Where SASA's group rank goes: decoder-block stable rank against group use, on SmolLM2 (issue 18).

At ``blocks.15.hook_mlp_out`` `sasa` r 8 lost R² between its 4 M- and 8 M-token runs (RESULTS §0h).
This reads a finished grid's saved SASA SAEs — every run, converged or not, and each run's
half-budget twin — encodes the held-out non-special activations at the grid's hook once, and per
SAE reports the dead-group share and the mean stable rank (``‖D_k‖_F² / σ_max²`` ∈ [1, r]) of the
live and of the dead groups' decoder blocks, and of the live groups by quartile of their firing
rate: a collapse of the used groups towards rank 1 (or of the unused ones) shows, at both budgets,
beside the nuclear coefficient of the run. Writes
``benchmarks/results/sasa_groups_smollm2_<grid>.{json,md}``.

    python benchmarks/bench_sasa_groups_smollm2.py --grid benchmarks/sweeps/sasa_nuclear_mlp_out.toml
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_ext.convergence import HALF_BUDGET_DIR
from sae_ext.eval_report import fmt
from sae_ext.eval_result import json_safe
from sae_ext.sweep import (
    SASA_ARCHITECTURES,
    add_report_arguments,
    config_value,
    curve_of,
    finished_saved_runs,
    group_rank_of,
)

RESULTS = Path(__file__).parent / "results"
N_QUARTILES = 4


def nuclear_coefficient_of(record: dict[str, Any]) -> float:
    """λ_nuc of a SASA run as it was trained (its resolved config, else the default of its time)."""
    return float(config_value(record, "nuclear_coefficient"))


def _mean(t: torch.Tensor) -> float:
    return float(t.mean().item()) if t.numel() else math.nan


def group_use_row(stats: Any) -> dict[str, Any]:
    """Dead-group share and the stable rank of live / dead groups and of live-group quartiles of
    firing rate (rarest first) from :class:`~sae_ext.metrics.dictionary.DictionaryStats`."""
    rates, sr = stats.group_firing_rates, stats.group_stable_rank
    live = rates > 0
    order = rates[live].argsort()
    chunks = torch.tensor_split(order, N_QUARTILES) if order.numel() >= N_QUARTILES else []
    return {
        "dead_groups": stats.group_dead_fraction, "live_stable_rank": _mean(sr[live]),
        "dead_stable_rank": _mean(sr[~live]),
        "quartiles": [{"firing_rate": _mean(rates[live][c]), "stable_rank": _mean(sr[live][c])} for c in chunks],
    }


def group_rows(found: list[tuple[dict[str, Any], Path]], x: torch.Tensor) -> list[dict[str, Any]]:
    """One row per saved SASA SAE of ``found`` and per saved half-budget twin, on activations ``x``."""
    from sae_lens import SAE

    from sae_ext.metrics.dictionary import dictionary_stats

    runs = [(r, d) for r, d in found if r["architecture"] in SASA_ARCHITECTURES]
    if not runs:
        raise ValueError(f"no {' / '.join(SASA_ARCHITECTURES)} run among the {len(found)} saved runs")
    rows = []
    for r, d in tqdm(runs, desc="SASA groups", unit="run"):
        for budget, folder, r2 in [("full", d, r["r2"]), ("half", d / HALF_BUDGET_DIR, r.get("r2_half"))]:
            if not (folder / "cfg.json").is_file():
                continue
            stats = dictionary_stats(SAE.load_from_disk(str(folder)), x, progress=False)
            rows.append({
                "line": curve_of(r), "architecture": r["architecture"], "group_rank": group_rank_of(r),
                "n_active_groups": r["value"], "seed": r["seed"],
                "nuclear_coefficient": nuclear_coefficient_of(r), "budget": budget,
                "tokens": r["tokens"] if budget == "full" else r["tokens"] // 2, "converged": r["converged"],
                "r2": r2, "l0": stats.l0, **group_use_row(stats),
            })
    return rows


def markdown(grid: str, hook: str, rows: list[dict[str, Any]], n_tokens: int, command: str) -> str:
    """The report: one line per SAE, full and half budget of a run side by side in row order."""
    head = ["line", "r", "s", "λ_nuc", "tokens", "converged", "R²", "dead groups", "stable rank live / dead"]
    head += [f"live q{i + 1} rate / stable rank" for i in range(N_QUARTILES)]
    lines = [f"# SASA group use against decoder-block rank: `{grid}` ({hook})", "",
             f"`{command}`", "",
             f"Held-out non-special tokens: {n_tokens}. Stable rank ‖D_k‖_F² / σ_max² ∈ [1, r] of each group's "
             "decoder block; live = fired on a held-out token; quartiles of the live groups by firing rate, "
             "rarest first. Every saved run is read, converged or not, with its half-budget twin (both rows show "
             "the run's SPEC §8 flag, R²(B) − R²(B/2) ≤ 0.01).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["line"], r["group_rank"], r["n_active_groups"], fmt(r["nuclear_coefficient"], "g"),
                 f"{r['tokens'] / 1e6:g} M", "yes" if r["converged"] else "**no**", fmt(r["r2"], ".4f"),
                 fmt(r["dead_groups"], ".3f"), f"{fmt(r['live_stable_rank'], '.2f')} / {fmt(r['dead_stable_rank'], '.2f')}"]
        cells += [f"{fmt(q['firing_rate'], '.4f')} / {fmt(q['stable_rank'], '.2f')}" for q in r["quartiles"]]
        cells += ["–"] * (len(head) - len(cells))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    from bench_dark_matter_smollm2 import heldout_activations

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_report_arguments(p, RESULTS / "sweeps")
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens to encode")
    args = p.parse_args()
    if args.eval_tokens < 1:
        raise SystemExit(f"--eval-tokens must be >= 1, got {args.eval_tokens}")
    grid, report, found = finished_saved_runs(args.grid, args.results, args.out, converged_only=False)
    from sae_ext.data import default_token_dataset
    from sae_ext.models import load_default_model

    t0 = time.perf_counter()
    model = load_default_model()
    tokens = default_token_dataset(model.tokenizer, 128, n_tokens=args.eval_tokens, split="eval")
    x = heldout_activations(model, grid.hook, tokens, args.eval_tokens)
    rows = group_rows(found, x)
    tag = f"sasa_groups_smollm2_{grid.name}"
    command = "python benchmarks/bench_sasa_groups_smollm2.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{tag}.json").write_text(json.dumps(json_safe({
        "grid": str(args.grid), "hook": grid.hook, "report": str(report), "command": command,
        "tokens": len(x), "runs": rows, "seconds": time.perf_counter() - t0,
    }), indent=2))
    (RESULTS / f"{tag}.md").write_text(markdown(grid.name, grid.hook, rows, len(x), command))
    print(f"wrote {RESULTS / tag}.{{json,md}}")


if __name__ == "__main__":
    main()
