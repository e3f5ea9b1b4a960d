"""SAE dark matter of a finished sweep's SAEs on SmolLM2 (SPEC §4 and §8; issue 19 item 4).

Engels et al. (seed 003): about half of the SAE error vector and > 90 % of its norm can be
linearly predicted from the activation, and per-token error norms are predictable from one SAE
to another. This reads a grid's report and its saved SAEs (as the other sweep benches), streams the
held-out non-special activations at the grid's hook once, and per converged SAE fits SPEC §4's
linear map ``x W ≈ e`` on half of those tokens and scores it on the other half
(:func:`sae_ext.metrics.dark_matter.dark_matter`): error R², norm R², the linear share of the
squared error, FVU and nonlinear FVU. At the residual streams it does so twice, with every token
and without the massive (attention-sink) tokens of RESULTS §0d, which hold most of the held-out
sum of squares there. Per curve, the per-token error norm of its densest converged run is
regressed on its sparsest run's ([‖e_i‖, 1], the paper's cross-size test read along L0) and, as a
control, on ‖x‖. Only converged runs (SPEC §8) are read. Writes
``benchmarks/results/dark_matter_smollm2_<grid>.{json,md,png}``.

    python benchmarks/bench_dark_matter_smollm2.py --grid benchmarks/sweeps/sasa_rank_mlp_out.toml
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

from sae_ext.eval_report import fmt
from sae_ext.eval_result import json_safe
from sae_ext.sweep import add_report_arguments, curve_of, finished_saved_runs

RESULTS = Path(__file__).parent / "results"
#: the scores of :class:`sae_ext.metrics.dark_matter.DarkMatterResult` this bench reports
SCORES = ("error_r2", "norm_r2", "linear_error_norm_share", "fvu", "nonlinear_fvu")
#: the paper's headline figures: the error vector's share (~½) and its norm's (> 90 %) predicted linearly
PAPER = {"error_r2": 0.5, "norm_r2": 0.9}


def heldout_activations(model: Any, hook: str, tokens: Any, n_tokens: int) -> torch.Tensor:
    """Held-out activations ``[n, d_in]`` at ``hook``, special-token positions dropped (SPEC §8)."""
    from sae_ext.model_io import as_token_tensor
    from sae_ext.splicer import Splicer

    toks = as_token_tensor(tokens, n_tokens=n_tokens)
    return torch.cat(list(Splicer(model, None, toks, hook_name=hook, progress=False).activations())).float()


def token_sets(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"all": x}``, plus ``"no_massive"`` (:func:`sae_ext.protocol.massive_token_mask` rows out)
    when the activations hold any massive token."""
    from sae_ext.protocol import massive_token_mask

    massive = massive_token_mask(x)
    return {"all": x, "no_massive": x[~massive]} if bool(massive.any()) else {"all": x}


def dark_matter_rows(found: list[tuple[dict[str, Any], Path]], sets: dict[str, torch.Tensor],
                     seed: int = 0) -> tuple[list[dict[str, Any]], dict[tuple[str, int, float], torch.Tensor]]:
    """Per saved run, SPEC §4's scores on every token set (``<score>_<set>``), and the per-token
    error norms on the last set (the one without massive tokens where there is one), by (curve, seed, L0)."""
    from sae_lens import SAE

    from sae_ext.metrics.dark_matter import dark_matter, sae_error_norms

    rows, norms = [], {}
    last = list(sets)[-1]
    for r, d in tqdm(found, desc="dark matter"):
        sae = SAE.load_from_disk(str(d))
        row = {"curve": curve_of(r), "architecture": r["architecture"], "knob": r["knob"], "value": r["value"],
               "seed": r["seed"], "l0": r["l0"], "r2": r["r2"]}
        for name, xs in sets.items():
            res = dark_matter(sae, xs, seed=seed, progress=False)
            row.update({f"{s}_{name}": getattr(res, s) for s in SCORES})
            row[f"n_test_{name}"] = res.n_test
        rows.append(row)
        norms[(row["curve"], int(r["seed"]), float(r["l0"]))] = sae_error_norms(sae, sets[last], progress=False)
    return rows, norms


def norm_scaling(norms: dict[tuple[str, int, float], torch.Tensor], x: torch.Tensor) -> list[dict[str, Any]]:
    """Per curve and seed with two or more runs: ‖e‖ of the densest run regressed on the sparsest
    run's, and on ‖x‖ (seeds kept apart, so a pair is always one training seed's)."""
    from sae_ext.metrics.dark_matter import error_norm_predictability

    out = []
    for curve, seed in sorted({(c, s) for c, s, _ in norms}):
        l0s = sorted(l0 for c, s, l0 in norms if (c, s) == (curve, seed))
        if len(l0s) < 2:
            continue
        lo, hi = norms[(curve, seed, l0s[0])], norms[(curve, seed, l0s[-1])]
        out.append({
            "curve": curve, "seed": seed, "l0_sparse": l0s[0], "l0_dense": l0s[-1],
            "r2_from_sparsest": error_norm_predictability(lo, hi).r2,
            "r2_from_x_norm": error_norm_predictability(x.norm(dim=-1), hi).r2,
            "error_norm_ratio": float(hi.mean() / lo.mean()),
        })
    return out


def summary(rows: list[dict[str, Any]], sets: list[str]) -> dict[str, dict[str, float]]:
    """Min / median / max of every score over the runs, per token set."""
    out = {}
    for name in sets:
        for s in SCORES:
            vals = sorted(v for r in rows if (v := r.get(f"{s}_{name}")) is not None and math.isfinite(v))
            if vals:
                out[f"{s}_{name}"] = {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]}
    return out


def plot(rows: list[dict[str, Any]], sets: list[str], path: Path, title: str) -> None:
    """Error R² and norm R² against L0 (log), one line per curve, per token set (dashed: with massive tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, score in zip(axes, ("error_r2", "norm_r2")):
        for i, curve in enumerate(sorted({r["curve"] for r in rows})):
            pts = sorted((r["l0"], r) for r in rows if r["curve"] == curve)
            for name in sets:
                ax.plot([p[0] for p in pts], [p[1][f"{score}_{name}"] for p in pts], "o-" if name == sets[-1] else "x--",
                        color=f"C{i % 10}", label=f"{curve}" + (" (every token)" if name != sets[-1] else ""))
        ax.axhline(PAPER[score], ls=":", color="grey", label=f"paper ({PAPER[score]:g})")
        ax.set_xscale("log")
        ax.set_xlabel("L0")
        ax.set_ylabel({"error_r2": "error R² (x W ≈ e)", "norm_r2": "norm R² (‖e‖² from x)"}[score])
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(grid_name: str, hook: str, rows: list[dict[str, Any]], scaling: list[dict[str, Any]],
             sets: list[str], n_tokens: dict[str, int], command: str, png: str) -> str:
    md = [f"# SAE dark matter on SmolLM2 at `{hook}` (sweep `{grid_name}`)", "",
          "Converged SAEs of the sweep (SPEC §8: special tokens out of training, normalisation and every "
          "statistic). SPEC §4: `x W ≈ e` fitted by least squares (no intercept, as the authors) on half of the "
          "held-out tokens and scored on the other half; error R² is the mean over error dimensions, norm R² the "
          "regression of ‖e‖² on x, linear share Σ‖xW‖² / (Σ‖xW‖² + Σ‖e − xW‖²). Paper (Engels et al.): about "
          "half of the error vector (error R² ≈ 0.5) and > 90 % of its norm are linearly predictable.", "",
          "Held-out non-special tokens: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in n_tokens.items())
          + (" (massive = ‖x‖ > 10 × the median, RESULTS §0d)" if "no_massive" in sets else "") + ".", "",
          f"Command: `{command}`", ""]
    for name in sets:
        md += [f"## Every run, {'without massive tokens' if name == 'no_massive' else 'every token'}", "",
               "| curve | knob | value | L0 | R² | error R² | norm R² | linear share | FVU | nonlinear FVU |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['curve']} | {r['knob']} | {r['value']} | {fmt(r['l0'], '.1f')} | {fmt(r['r2'], '.4f')} | "
               + " | ".join(fmt(r[f'{s}_{name}']) for s in SCORES) + " |"
               for r in sorted(rows, key=lambda r: (r["curve"], r["l0"]))]
        md.append("")
    if scaling:
        md += ["## Per-token error norms along each curve", "",
               f"‖e‖ of the densest run regressed on the sparsest run's ([‖e_i‖, 1]) and on ‖x‖ (control), on "
               f"{'the tokens without massive ones' if 'no_massive' in sets else 'every token'}. The paper reads this "
               "across SAE sizes; a sweep varies L0 at one width.", "",
               "| curve | L0 sparse → dense | R² from the sparsest | R² from ‖x‖ | mean ‖e‖ dense / sparse |",
               "|---|---|---|---|---|"]
        md += [f"| {s['curve']} | {fmt(s['l0_sparse'], '.1f')} → {fmt(s['l0_dense'], '.1f')} | "
               f"{fmt(s['r2_from_sparsest'])} | {fmt(s['r2_from_x_norm'])} | {fmt(s['error_norm_ratio'])} |"
               for s in scaling]
        md.append("")
    md += [f"![error R² and norm R² against L0]({png})", ""]
    return "\n".join(md)


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_report_arguments(p, RESULTS / "sweeps")
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens (half fit, half scored)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/score split of the tokens")
    args = p.parse_args()
    if args.eval_tokens < 1024:
        raise SystemExit(f"--eval-tokens must be >= 1024 (the fit needs more tokens than d_in), got {args.eval_tokens}")
    grid, report, found = finished_saved_runs(args.grid, args.results, args.out)
    from sae_ext.data import default_token_dataset
    from sae_ext.models import load_default_model

    t0 = time.perf_counter()
    model = load_default_model()
    tokens = default_token_dataset(model.tokenizer, 128, n_tokens=args.eval_tokens, split="eval")
    x = heldout_activations(model, grid.hook, tokens, args.eval_tokens)
    sets = token_sets(x)
    rows, norms = dark_matter_rows(found, sets, seed=args.seed)
    scaling = norm_scaling(norms, sets[list(sets)[-1]])
    tag = f"dark_matter_smollm2_{grid.name}"
    png = RESULTS / f"{tag}.png"
    plot(rows, list(sets), png, f"{grid.name}: dark matter of converged SAEs ({grid.hook})")
    command = "python benchmarks/bench_dark_matter_smollm2.py " + " ".join(sys.argv[1:])
    n_tokens = {k: len(v) for k, v in sets.items()}
    (RESULTS / f"{tag}.json").write_text(json.dumps(json_safe({
        "grid": str(args.grid), "hook": grid.hook, "report": str(report), "command": command,
        "tokens": n_tokens, "runs": rows, "summary": summary(rows, list(sets)), "norm_scaling": scaling,
        "seconds": time.perf_counter() - t0,
    }), indent=2, allow_nan=False))
    (RESULTS / f"{tag}.md").write_text(markdown(grid.name, grid.hook, rows, scaling, list(sets), n_tokens, command,
                                                png.name))
    print(f"wrote {RESULTS / tag}.{{json,md,png}}")


if __name__ == "__main__":
    main()
