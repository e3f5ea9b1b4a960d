"""Non-special tokens with attention-sink norms, and what they do to held-out R² (SPEC §8).

SPEC §8 keeps special tokens (BOS ‖x‖ ≈ 25,000) out of training and of every statistic. At SmolLM2
`blocks.15.hook_resid_*` a few *ordinary* tokens take the same role: the first token after BOS in
some rows. They are not special ids, so the protocol keeps them. This script counts them in the
captures (‖x‖ above ``--factor`` × the median norm of the non-special tokens), measures their share
of the normalisation estimate E‖x‖² and of the held-out total sum of squares, and re-reads the
held-out R² of the sweeps' saved SAEs with and without them.

    python benchmarks/bench_massive_tokens.py --grids sign_aware_gated_resid_mid
        # -> benchmarks/results/massive_tokens.{md,json}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from tqdm.auto import tqdm

import sae_ext  # noqa: F401  (registers the plugin architectures)
from sae_ext.capture import ActivationCache
from sae_ext.convergence import heldout_r2
from sae_ext.eval_report import fmt
from sae_ext.metrics.curves import matched_gap, value_at_l0
from sae_ext.model_io import special_token_ids
from sae_ext.protocol import MASSIVE_NORM_FACTOR, massive_token_mask

RESULTS = Path(__file__).parent / "results"
HOOKS = ("resid_mid", "mlp_out", "attn_out", "resid_post")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captures", default="sae_ext_out/captures", help="holds train_128/ and eval_128/ (bench_convergence)")
    p.add_argument("--sweeps", default="sae_ext_out/sweeps", help="the sweeps' --out folder")
    p.add_argument("--grids", nargs="*", default=[], help="sweep names whose saved SAEs to re-read")
    p.add_argument("--factor", type=float, default=MASSIVE_NORM_FACTOR, help="massive: ‖x‖ > factor × median ‖x‖")
    p.add_argument("--tag", default="massive_tokens")
    args = p.parse_args(argv)
    if not args.factor > 1:
        p.error(f"--factor must be > 1, got {args.factor}")
    return args


def non_special(cache: ActivationCache, special: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[n, d_in]`` and in-row positions ``[n]`` of the non-special tokens."""
    ids = cache.token_ids()
    keep = ~torch.isin(ids, torch.tensor(special))
    pos = torch.arange(len(ids)) % cache.context_size
    return cache.activations()[keep], pos[keep]


def capture_stats(root: Path, hook: str, special: list[int], factor: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in ("train", "eval"):
        x, pos = non_special(ActivationCache.load(root / f"{split}_128", hook), special)
        m = massive_token_mask(x, factor)
        sq = x.pow(2).sum(-1)
        ss = (x - x.mean(0)).pow(2).sum(-1)
        out[split] = {
            "tokens": len(x), "massive": int(m.sum()), "median_norm": float(x.norm(dim=-1).median()),
            "massive_mean_norm": float(x[m].norm(dim=-1).mean()) if m.any() else None,
            "massive_at_position_1": int((pos[m] == 1).sum()),
            "share_of_mean_sq_norm": float(sq[m].sum() / sq.sum()),
            "share_of_total_ss": float(ss[m].sum() / ss.sum()),
            # the normalisation factor sqrt(d_in / E‖x‖²) with them, over the same without them
            "norm_scale_ratio": float((sq[~m].mean() / sq.mean()).sqrt()),
        }
    return out


@torch.no_grad()
def reread(sweeps: Path, grid: str, x: torch.Tensor, m: torch.Tensor) -> list[dict[str, Any]]:
    rows = []
    paths = sorted((sweeps / grid / "runs").glob("*/record.json"))
    for rec_path in tqdm(paths, desc=grid):
        rec = json.loads(rec_path.read_text())["record"]
        sae = SAE.load_from_disk(str(rec_path.parent))
        x_m = x[m]
        rel = float((x_m - sae(x_m)).pow(2).sum() / x_m.pow(2).sum()) if m.any() else None
        rows.append({k: rec[k] for k in ("line", "value", "l0", "r2", "ce_loss_recovered", "converged")}
                    | {"r2_all": heldout_r2(sae, x), "r2_typical": heldout_r2(sae, x[~m]), "massive_rel_error": rel})
    return sorted(rows, key=lambda r: (r["line"], r["l0"]))


def compare(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """Matched-L0 readings of ``metric`` between the lines of one sweep (converged runs only):
    the mean gap over the overlap for two curves, the gap at its own L0 for a one-point line."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["converged"]:
            lines.setdefault(r["line"], []).append((r["l0"], r[metric]))
    curves = {k: sorted(v) for k, v in lines.items() if len(v) >= 2}
    out = []
    for a, pa in curves.items():
        for b, pb in curves.items():
            gap = matched_gap(pa, pb) if a < b else None
            if gap:
                out.append(f"- {a} − {b}: mean {gap['mean_gap']:+.4f} (min {gap['min_gap']:+.4f}, max {gap['max_gap']:+.4f}) "
                           f"over L0 {gap['l0_low']:.3g}–{gap['l0_high']:.3g}")
    for a, pa in lines.items():
        if len(pa) != 1:
            continue
        for b, pb in curves.items():
            ref = value_at_l0([x for x, _ in pb], [y for _, y in pb], pa[0][0])
            if ref == ref:  # inside b's L0 range
                out.append(f"- {a} (L0 {pa[0][0]:.3g}) − {b} at the same L0: {pa[0][1] - ref:+.4f}")
    return out


def write_report(res: dict[str, Any], tag: str) -> None:
    (RESULTS / f"{tag}.json").write_text(json.dumps(res, indent=2))
    f = res["args"]["factor"]
    lines = [
        "# Non-special tokens with attention-sink norms (SPEC §8)", "",
        f"`python benchmarks/bench_massive_tokens.py` — massive: ‖x‖ > {fmt(f)} × the median norm of the "
        "non-special tokens of the same split. Captures: the 704,640-token train split and 32,768-token eval "
        "split at block 15 (`bench_convergence.py`'s).", "",
        "| hook | split | non-special tokens | massive | at position 1 | median ‖x‖ | massive mean ‖x‖ | "
        "share of E‖x‖² | share of total SS | norm. scale with / without |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for hook, st in res["captures"].items():
        for split, s in st.items():
            lines.append(f"| {hook} | {split} | {s['tokens']} | {s['massive']} | {s['massive_at_position_1']} | "
                         f"{fmt(s['median_norm'])} | {fmt(s['massive_mean_norm'])} | {fmt(s['share_of_mean_sq_norm'])} | "
                         f"{fmt(s['share_of_total_ss'])} | {fmt(s['norm_scale_ratio'])} |")
    for grid, rows in res["sweeps"].items():
        lines += ["", f"## `{grid}`: held-out R² with and without the massive tokens", "",
                  "| line | knob | L0 | R² (sweep) | R² all non-special | R² without massive | massive rel. error | CE rec. |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['line']} | {fmt(r['value'])} | {fmt(r['l0'])} | {fmt(r['r2'])} | {fmt(r['r2_all'])} | "
                  f"{fmt(r['r2_typical'])} | {fmt(r['massive_rel_error'])} | {fmt(r['ce_loss_recovered'])} |" for r in rows]
        for metric, name in (("r2_typical", "R² without the massive tokens"), ("r2_all", "R² with them"),
                             ("ce_loss_recovered", "CE loss recovered")):
            lines += ["", f"Matched-L0 differences, {name} (converged runs; log-L0 interpolation):", ""]
            lines += compare(rows, metric) or ["- none: no two converged curves overlap"]
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from sae_ext.models import load_default_model

    special = list(special_token_ids(load_default_model()))
    root, sweeps = Path(args.captures), Path(args.sweeps)
    res: dict[str, Any] = {"args": vars(args), "captures": {}, "sweeps": {}}
    for h in HOOKS:
        res["captures"][h] = capture_stats(root, f"blocks.15.hook_{h}", special, args.factor)
    for grid in args.grids:
        rec = next((sweeps / grid / "runs").glob("*/record.json"), None)
        if rec is None:
            print(f"{grid}: no finished runs under {sweeps / grid}; skipped")
            continue
        hook = json.loads(rec.read_text())["record"]["hook"]
        x, _ = non_special(ActivationCache.load(root / "eval_128", hook), special)
        res["sweeps"][grid] = reread(sweeps, grid, x, massive_token_mask(x, args.factor))
    write_report(res, args.tag)
    print((RESULTS / f"{args.tag}.md").read_text())


if __name__ == "__main__":
    main()
