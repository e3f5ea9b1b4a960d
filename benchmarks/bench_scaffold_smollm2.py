"""Scaffolded SAEs on SmolLM2 from a finished sweep (issue 17 item 4, SPEC §2 and §8).

Reads a scaffold grid's report (``benchmarks/results/sweeps/<grid>.json``, written by
``sae-ext sweep``) and its saved SAEs (``--out/<grid>/runs/``), then, per hook:

- dense latents (firing on > 10 % of held-out non-special tokens) and dead fractions of every
  scaffold line against its plain line (``scaffold_batchtopk`` ↔ ``batchtopk``,
  ``scaffold_matryoshka_batchtopk`` ↔ ``matryoshka_batchtopk``), read at matched L0 by log-L0
  interpolation of the plain curve (the paper's "fewer dense latents at matched sparsity"), and
  plotted against L0 and against FVU = 1 − R²;
- for each converged scaffold SAE, :func:`sae_ext.evaluate.evaluate_sae` on held-out text: CE with
  the scaffold zeroed (the SAE spliced with its error term) against CE with the top-r centred PCA
  directions of the non-special activations removed (mean kept), and the principal angles between
  the scaffold's range and those directions.

Only converged runs (SPEC §8) enter a verdict. Writes ``benchmarks/results/<tag>.{json,md,png}``.

    python benchmarks/bench_scaffold_smollm2.py --grid benchmarks/sweeps/scaffold_resid_mid.toml
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

from sae_ext.eval_result import json_safe
from sae_ext.metrics.curves import value_at_l0
from sae_ext.protocol import MASSIVE_NORM_FACTOR
from sae_ext.sweep import (
    BASELINE_ARCHITECTURE,
    add_report_arguments,
    check_only,
    config_value,
    curve_of,
    curve_points,
    finished_report,
    keep_earlier,
    saved_runs,
)

RESULTS = Path(__file__).parent / "results"
#: scaffold architecture → the plain architecture it is compared with
PLAIN = {a: b for a, b in BASELINE_ARCHITECTURE.items() if a.startswith("scaffold_")}


def dense_at_matched_l0(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each converged scaffold run against its plain curve read at the run's L0 (NaN outside it), and
    against the plain run of the same k (BatchTopK's L0 is k by construction, so also matched)."""
    rows = []
    for r in sorted(records, key=lambda r: (curve_of(r), r["l0"])):
        plain = PLAIN.get(r["architecture"])
        if plain is None or not r["converged"]:
            continue
        dense = curve_points(records, plain, "dense_fraction")
        dead = curve_points(records, plain, "dead_fraction")
        r2 = curve_points(records, plain, "r2")
        at = float(r["l0"])
        pd = value_at_l0([p[0] for p in dense], [p[1] for p in dense], at) if dense else math.nan
        same = [p for p in records if p["line"] == plain and p["converged"] and p["value"] == r["value"]]
        pk = sum(p["dense_fraction"] for p in same) / len(same) if same else math.nan
        rows.append({
            "line": curve_of(r), "plain": plain, "k": r["value"], "l0": at,
            "dense": r["dense_fraction"], "dense_plain": pd,
            "dense_reduction": 1 - r["dense_fraction"] / pd if pd and pd == pd else math.nan,
            "dense_plain_same_k": pk,
            "dense_reduction_same_k": 1 - r["dense_fraction"] / pk if pk and pk == pk else math.nan,
            "dead": r["dead_fraction"],
            "dead_plain": value_at_l0([p[0] for p in dead], [p[1] for p in dead], at) if dead else math.nan,
            "r2": r["r2"], "r2_plain": value_at_l0([p[0] for p in r2], [p[1] for p in r2], at) if r2 else math.nan,
        })
    return rows


def saved_scaffold_runs(records: list[dict[str, Any]], runs: Path, only: list[str] | None = None,
                        ) -> list[tuple[dict[str, Any], Path]]:
    """The converged scaffold records (of the lines ``only`` names; None: all) whose SAE is saved
    under ``runs`` (a sweep's run folders)."""
    return saved_runs([r for r in records if r["architecture"] in PLAIN], runs, only=only)


def evaluate_scaffolds(found: list[tuple[dict[str, Any], Path]], model: Any, tokens: Any, n_tokens: int) -> list[dict[str, Any]]:
    """CE with the scaffold zeroed vs top-r PCA removed, and principal angles, for each saved run."""
    from sae_lens import SAE

    from sae_ext.evaluate import evaluate_sae

    out = []
    for r, d in tqdm(found, desc="scaffold ablations"):
        res = evaluate_sae(SAE.load_from_disk(str(d)), model, tokens, n_tokens=n_tokens, progress=False)
        sc = res.scaffold
        if sc is None or sc.pca_removal is None or not sc.principal_angles_deg:
            raise ValueError(f"{d} is not a scaffolded SAE with a declared subspace ({res.sae.architecture})")
        angles = sc.principal_angles_deg
        out.append({
            "line": curve_of(r), "k": r["value"], "seed": r["seed"], "l0": r["l0"], "rank": sc.pca_rank,
            "ce_clean": sc.ablation.ce_clean,
            "ce_ratio_scaffold": sc.ablation.ce_ratio, "ce_ratio_pca": sc.pca_removal.ce_ratio,
            "increase_ratio": sc.increase_ratio_vs_pca,
            "kl_scaffold": sc.ablation.kl_ablated_vs_clean, "kl_pca": sc.pca_removal.kl_removed_vs_clean,
            "pca_explained_variance": sc.pca_explained_variance,
            "angles_deg": angles, "angle_median": angles[len(angles) // 2],
            "n_tokens": res.n_tokens, "n_special_positions": res.n_special_positions,
        })
    return out


def keep_earlier_ablations(abl: list[dict[str, Any]], massive: dict[str, Any] | None,
                           earlier: dict[str, Any] | None, records: list[dict[str, Any]], eval_tokens: int,
                           ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Add to this call's ablations those of an earlier report of the same bench whose SAE is not
    saved here, so that a bench re-run on another machine (the SAEs of earlier sessions gone) does
    not drop them.

    An earlier row is kept only when it measured the same run (line, k, seed and L0 of a converged
    record of the report) on the same number of held-out tokens, and this call did not ablate that
    run again; kept rows carry ``"earlier": True``. The massive-token PCA section is merged the
    same way: ranks and scaffold angles that this call did not compute come from the earlier report.
    """
    if not earlier:
        return abl, massive
    if earlier.get("eval_tokens") != eval_tokens:
        print(f"earlier report measured on {earlier.get('eval_tokens')} tokens, not {eval_tokens}: not kept")
        return abl, massive
    # rows written before the bench recorded seeds came from one-seed grids (seed 0)
    rows = [{**a, "seed": a.get("seed", 0)} for a in earlier.get("scaffold_ablations") or []]
    kept = keep_earlier(abl, rows, [r for r in records if r["architecture"] in PLAIN],
                        lambda a: (a["line"], a["k"], a["seed"], a["l0"]),
                        lambda r: (curve_of(r), r["value"], r["seed"], r["l0"]))[len(abl):]
    old = earlier.get("pca_without_massive_tokens")
    if old and kept:
        keep_runs = {f"{a['line']} k={a['k']}" for a in kept}
        by_rank = {int(r): {**m, "scaffold_angles_deg": {run: v for run, v in m["scaffold_angles_deg"].items()
                                                         if run in keep_runs}}
                   for r, m in old["by_rank"].items()}
        for r, m in (massive or {}).get("by_rank", {}).items():
            by_rank[r] = {**m, "scaffold_angles_deg": {**by_rank.get(r, {}).get("scaffold_angles_deg", {}),
                                                       **m["scaffold_angles_deg"]}}
        massive = {**old, **(massive or {}), "by_rank": dict(sorted(by_rank.items()))}
    key = {line: i for i, line in enumerate(dict.fromkeys(curve_of(r) for r in sorted(records, key=curve_of)))}
    merged = sorted(abl + kept, key=lambda a: (key.get(a["line"], len(key)), a["l0"]))
    return merged, massive


def pca_without_massive_tokens(model: Any, hook: str, tokens: Any, n_tokens: int, ranks: list[int],
                               found: list[tuple[dict[str, Any], Path]]) -> dict[str, Any]:
    """The top-r PCA of the held-out non-special activations with and without massive tokens.

    At SmolLM2's residual streams a few ordinary tokens have attention-sink norms
    (:data:`sae_ext.protocol.MASSIVE_NORM_FACTOR`, RESULTS §0d); they can own the top principal
    directions, so the PCA removal that ``evaluate_sae`` compares the scaffold with may mostly
    measure destroying the sink. Here: how many there are, the variance share of the top-r
    directions both ways, the angle between the two bases, the CE of removing the PCA fitted
    without them, and each saved scaffold's principal angles to that basis.
    """
    from sae_lens import SAE

    from sae_ext.interventions import remove_directions_ce
    from sae_ext.metrics.pca import PCAAccumulator, principal_angles_degrees
    from sae_ext.model_io import as_token_tensor
    from sae_ext.protocol import massive_token_mask
    from sae_ext.splicer import Splicer

    toks = as_token_tensor(tokens, n_tokens=n_tokens)
    x = torch.cat(list(Splicer(model, None, toks, hook_name=hook, progress=False).activations())).double()
    massive = massive_token_mask(x)
    out: dict[str, Any] = {"tokens": len(x), "massive": int(massive.sum()), "by_rank": {}}
    for r in ranks:
        every, clean = PCAAccumulator(), PCAAccumulator()
        every.update(x)
        clean.update(x[~massive])
        pe, pc = every.result(r), clean.result(r)
        rem = remove_directions_ce(model, hook, pc.basis, toks, center=pc.mean, progress=False)
        out["by_rank"][r] = {
            "explained_variance_all": float(pe.explained_variance_ratio.sum()),
            "explained_variance_without_massive": float(pc.explained_variance_ratio.sum()),
            "max_angle_between_bases_deg": float(principal_angles_degrees(pe.basis, pc.basis).max()),
            "ce_ratio_pca_without_massive": rem.ce_ratio,
            "kl_pca_without_massive": rem.kl_removed_vs_clean,
        }
        out["by_rank"][r]["scaffold_angles_deg"] = {
            f"{curve_of(rec)} k={rec['value']}": principal_angles_degrees(
                SAE.load_from_disk(str(d)).scaffold_subspace(), pc.basis).tolist()
            for rec, d in found if config_value(rec, "scaffold_rank") == r
        }
    return out


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Dense fraction against L0 (log) and against FVU, one line per curve, converged runs only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for curve in sorted({curve_of(r) for r in records}):
        rs = sorted((r for r in records if curve_of(r) == curve and r["converged"]), key=lambda r: r["l0"])
        if not rs:
            continue
        (h,) = axes[0].plot([r["l0"] for r in rs], [r["dense_fraction"] for r in rs], "o-", label=curve)
        axes[1].plot([1 - r["r2"] for r in rs], [r["dense_fraction"] for r in rs], "o-", color=h.get_color(), label=curve)
    axes[0].set(xscale="log", xlabel="L0 (log)", ylabel="dense latents (> 10 % of tokens), fraction")
    axes[1].set(xscale="log", xlabel="FVU = 1 − R² (log)", ylabel="dense latents, fraction")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(grid_name: str, hook: str, dense: list[dict[str, Any]], abl: list[dict[str, Any]],
             records: list[dict[str, Any]], png: str, massive: dict[str, Any] | None = None) -> str:
    def f(v: Any, p: str = ".3f") -> str:
        return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, p)

    n_loose = sum(1 for r in records if not r["converged"])
    out = [
        f"# Scaffolded SAEs on SmolLM2 at `{hook}` (sweep `{grid_name}`)", "",
        "SPEC §8: special tokens out of training, normalisation and every statistic; converged runs only "
        f"({n_loose} unconverged run(s) of the sweep left out). Dense = firing on > 10 % of held-out tokens.", "",
        "## Dense and dead latents at matched L0 (plain curve interpolated in log L0 to the scaffold run's L0)", "",
        "| line | k | L0 | dense | dense (plain) | fewer dense | dense (plain, same k) | fewer dense (same k) | dead | dead (plain) | R² | R² (plain) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    out += [f"| {d['line']} | {d['k']} | {d['l0']:.1f} | {f(d['dense'], '.4f')} | {f(d['dense_plain'], '.4f')} | "
            f"{f(d['dense_reduction'], '.0%')} | {f(d['dense_plain_same_k'], '.4f')} | "
            f"{f(d['dense_reduction_same_k'], '.0%')} | {f(d['dead'])} | {f(d['dead_plain'])} | {f(d['r2'], '.4f')} | "
            f"{f(d['r2_plain'], '.4f')} |" for d in dense]
    out += ["", f"![dense latents vs L0 and FVU]({png})", ""]
    if abl:
        out += [
            "## Scaffold zeroed vs top-r PCA removed (held-out text, non-special positions)", "",
            "× CE = CE / clean CE. The scaffold is zeroed with the SAE spliced and its error term kept; PCA "
            "removal projects the top-r centred principal directions out of the clean activation, mean kept. "
            "Angles: principal angles between the scaffold's range and those directions.", "",
            "| line | k | L0 | r | × CE scaffold | × CE PCA | ΔCE ratio | KL scaffold | KL PCA | PCA var. | angles min / median / max (°) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        out += [f"| {a['line']} | {a['k']} | {a['l0']:.1f} | {a['rank']} | {f(a['ce_ratio_scaffold'], '.2f')} | "
                f"{f(a['ce_ratio_pca'], '.2f')} | {f(a['increase_ratio'], '.2f')} | {f(a['kl_scaffold'])} | "
                f"{f(a['kl_pca'])} | {f(a['pca_explained_variance'])} | "
                f"{min(a['angles_deg']):.1f} / {a['angle_median']:.1f} / {max(a['angles_deg']):.1f} |"
                for a in abl]
        n_earlier = sum(1 for a in abl if a.get("earlier"))
        if n_earlier:
            out += ["", f"{n_earlier} of these rows come from the earlier report of this bench (same runs, same "
                    "held-out tokens; their SAEs are not saved here, or `--only` left their lines out)."]
        done = {(a["line"], a["k"], a.get("seed")) for a in abl}
        unsaved = [f"{curve_of(r)} k={r['value']} seed {r['seed']}" for r in records
                   if r["architecture"] in PLAIN and r["converged"] and (curve_of(r), r["value"], r["seed"]) not in done]
        if unsaved:
            out += ["", f"Not ablated (no saved SAE under the sweep's `--out`): {', '.join(unsaved)}."]
    if massive:
        out += [
            "", "## The same PCA without massive tokens",
            "", f"{massive['massive']} of {massive['tokens']:,} held-out non-special tokens have ‖x‖ > "
            f"{MASSIVE_NORM_FACTOR:g} × the median (attention sinks, RESULTS §0d). The PCA above includes them; here "
            "it is fitted without them (removal still applied at every non-special position).", "",
            "| r | top-r variance share, all | without massive | max angle between the bases (°) | × CE PCA without massive | KL |",
            "|---|---|---|---|---|---|",
        ]
        for r, m in massive["by_rank"].items():
            out.append(f"| {r} | {f(m['explained_variance_all'])} | {f(m['explained_variance_without_massive'])} | "
                       f"{m['max_angle_between_bases_deg']:.1f} | {f(m['ce_ratio_pca_without_massive'], '.2f')} | "
                       f"{f(m['kl_pca_without_massive'])} |")
        out += ["", "| scaffold run | angles to the PCA without massive tokens, min / median / max (°) |", "|---|---|"]
        for m in massive["by_rank"].values():
            for run, a in m["scaffold_angles_deg"].items():
                out.append(f"| {run} | {min(a):.1f} / {a[len(a) // 2]:.1f} / {max(a):.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_report_arguments(p, RESULTS / "sweeps", only=True)
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for the CE ablations")
    p.add_argument("--no-ablations", action="store_true", help="dense/dead comparison only (no model passes)")
    p.add_argument("--tag", default=None, help="output name (default scaffold_smollm2_<grid name>)")
    args = p.parse_args()
    if args.eval_tokens < 128:
        raise SystemExit(f"--eval-tokens must be >= 128 (one row), got {args.eval_tokens}")
    if args.only is not None and args.no_ablations:
        raise SystemExit(f"--only picks the runs to ablate, and --no-ablations ablates none: got --only {args.only}")
    grid, report, records = finished_report(args.grid, args.results)
    check_only(args.only, [grid])
    t0 = time.perf_counter()
    dense = dense_at_matched_l0(records)
    abl: list[dict[str, Any]] = []
    massive: dict[str, Any] | None = None
    found = [] if args.no_ablations else saved_scaffold_runs(records, args.out / grid.name / "runs", args.only)
    if found:
        from sae_ext.data import default_token_dataset
        from sae_ext.models import load_default_model

        model = load_default_model()
        tokens = default_token_dataset(model.tokenizer, 128, n_tokens=args.eval_tokens, split="eval")
        abl = evaluate_scaffolds(found, model, tokens, args.eval_tokens)
        ranks = sorted({a["rank"] for a in abl})
        massive = pca_without_massive_tokens(model, grid.hook, tokens, args.eval_tokens, ranks, found)
    tag = args.tag or f"scaffold_smollm2_{grid.name}"
    earlier_path = RESULTS / f"{tag}.json"
    if not args.no_ablations and earlier_path.is_file():
        abl, massive = keep_earlier_ablations(abl, massive, json.loads(earlier_path.read_text()), records,
                                              args.eval_tokens)
    png = RESULTS / f"{tag}.png"
    plot(records, png, f"{grid.name}: dense latents (converged runs)")
    (RESULTS / f"{tag}.json").write_text(json.dumps(json_safe({
        "grid": str(args.grid), "hook": grid.hook, "report": str(report), "eval_tokens": args.eval_tokens,
        "dense_at_matched_l0": dense, "scaffold_ablations": abl,
        "pca_without_massive_tokens": massive, "seconds": time.perf_counter() - t0,
    }), indent=2, allow_nan=False))  # NaN (outside a curve) as null
    (RESULTS / f"{tag}.md").write_text(markdown(grid.name, grid.hook, dense, abl, records, png.name, massive))
    print(f"wrote {RESULTS / tag}.{{json,md,png}}")


if __name__ == "__main__":
    main()
