"""Per-token error-norm scaling across SAE sizes (SPEC §4, Engels et al.): do larger SAEs
mostly struggle on the same tokens as smaller ones?

For each hook and seed, trains SAELens ``topk`` SAEs of several widths (same k) on one stored
SmolLM2 capture (the demo's, reused when present), computes every SAE's per-token error norm
‖x − SAE(x)‖ on held-out tokens (special tokens excluded) and regresses ‖e_j‖ on [‖e_i‖, 1]
for every pair. Headline figures: R² of each SAE from the next smaller one, and of the largest
from the smallest, mean ± sd over seeds. Writes ``benchmarks/results/TAG.{json,md,png}``.

    python benchmarks/bench_error_norm_scaling.py --hooks blocks.15.hook_resid_mid \\
        blocks.15.hook_mlp_out blocks.15.hook_attn_out --seeds 0 1 2 --tokens 150000 \\
        --activations-dir /tmp/runs/grid/activations --tag error_norm_scaling
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.registry import get_sae_training_class  # noqa: E402

from sae_ext.bench import mean_sd  # noqa: E402
from sae_ext.capture import capture_activations, check_hook_name, hook_width, train_on_cache  # noqa: E402
from sae_ext.data import default_token_dataset  # noqa: E402
from sae_ext.demo import capture_dir  # noqa: E402
from sae_ext.metrics.dark_matter import error_norm_predictability, sae_error_norms  # noqa: E402
from sae_ext.model_io import iter_activations  # noqa: E402
from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model  # noqa: E402
from sae_ext.perf import retain_freed_memory  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONTEXT = 128


def plot_heatmaps(runs: dict[str, list[dict[str, Any]]], widths: list[int], path: Path) -> None:
    """One R² heat map per hook (first seed): row i predicts column j."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 3.9), squeeze=False)
    for n, (ax, (hook, rs)) in enumerate(zip(axes[0], runs.items())):
        r2 = {int(i): {int(j): v for j, v in row.items()} for i, row in rs[0]["r2_j_from_i"].items()}
        grid = [[1.0 if i == j else r2[i][j] for j in widths] for i in widths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(widths)), [str(w) for w in widths], rotation=45)
        ax.set_yticks(range(len(widths)), [str(w) for w in widths])
        ax.set_xlabel("d_sae of j (predicted)")
        if n == 0:
            ax.set_ylabel("d_sae of i (predictor)")
        ax.set_title(hook.split(".", 2)[-1], fontsize=9)
        for a in range(len(widths)):
            for b in range(len(widths)):
                ax.text(b, a, f"{grid[a][b]:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if grid[a][b] > 0.6 else "w")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="R²")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hooks", nargs="+", default=["blocks.15.hook_resid_post"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--widths", type=int, nargs="+", default=[288, 576, 1152, 2304, 4608], help="d_sae values")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=150_000, help="training tokens per SAE")
    p.add_argument("--capture-tokens", type=int, default=60_000)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--activations-dir", type=Path, default=None, help="default OUT/activations")
    p.add_argument("--out", type=Path, default=Path("sae_ext_out/bench_error_norm_scaling"))
    p.add_argument("--tag", default="error_norm_scaling")
    p.add_argument("--replot", action="store_true", help="redraw TAG.png from TAG.json, train nothing")
    args = p.parse_args()
    if args.replot:
        stored = json.loads((RESULTS / f"{args.tag}.json").read_text())
        plot_heatmaps(stored["runs"], stored["widths"], RESULTS / f"{args.tag}.png")
        return
    widths = sorted(set(args.widths))
    if len(widths) < 2 or widths[0] < args.k:
        raise SystemExit(f"--widths {args.widths}: need at least two distinct d_sae values, each >= --k {args.k}")
    retain_freed_memory()
    t0 = time.perf_counter()
    model = load_default_model()
    for hook in args.hooks:
        check_hook_name(model, hook)  # every hook before any work
    train_ds = default_token_dataset(model.tokenizer, CONTEXT, n_tokens=args.capture_tokens, split="train")
    eval_ds = default_token_dataset(model.tokenizer, CONTEXT, n_tokens=args.eval_tokens, split="eval")
    eval_toks = torch.tensor(eval_ds["input_ids"])
    topk_cfg = get_sae_training_class("topk")[1]
    runs: dict[str, list[dict[str, Any]]] = {}
    for hook in args.hooks:
        cache = capture_activations(
            model, train_ds, hook,
            capture_dir(args.activations_dir or args.out / "activations", hook, CONTEXT, len(train_ds)),
            n_tokens=len(train_ds) * CONTEXT, model_name=DEFAULT_MODEL_NAME,
        )  # fmt: skip
        d_in = hook_width(model, hook)
        with torch.no_grad():
            x = torch.cat(list(iter_activations(model, hook, eval_toks)))  # special tokens dropped
        for seed in args.seeds:
            norms: dict[int, torch.Tensor] = {}
            fvu: dict[int, float] = {}
            for d_sae in widths:
                sae_dir = args.out / hook / f"seed{seed}" / f"topk_{d_sae}"
                cfg = topk_cfg(d_in=d_in, d_sae=d_sae, k=args.k, normalize_activations="expected_average_only_in")
                train_on_cache(cfg, cache, model, train_ds, sae_dir, training_tokens=args.tokens,
                               train_batch_size_tokens=1024, lr=1e-3, seed=seed)
                with torch.no_grad():
                    norms[d_sae] = sae_error_norms(SAE.load_from_disk(sae_dir), x, progress=False)
                fvu[d_sae] = float(norms[d_sae].double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
            r2 = {i: {j: error_norm_predictability(norms[i], norms[j]).r2 for j in widths if j != i} for i in widths}
            x_norm = x.norm(dim=-1)  # control: how much of it is just the activation's own norm
            runs.setdefault(hook, []).append({
                "seed": seed, "fvu": fvu, "mean_error_norm": {w: float(n.mean()) for w, n in norms.items()},
                "r2_j_from_i": r2,
                "r2_next_from_smaller": [r2[a][b] for a, b in zip(widths, widths[1:])],
                "r2_largest_from_smallest": r2[widths[0]][widths[-1]],
                "r2_largest_from_x_norm": error_norm_predictability(x_norm, norms[widths[-1]]).r2,
                "n_tokens": int(x.shape[0]),
            })  # fmt: skip
    summary = {
        hook: {
            "r2_next_from_smaller": [mean_sd([r["r2_next_from_smaller"][i] for r in rs]) for i in range(len(widths) - 1)],
            "r2_largest_from_smallest": mean_sd([r["r2_largest_from_smallest"] for r in rs]),
            "r2_largest_from_x_norm": mean_sd([r["r2_largest_from_x_norm"] for r in rs]),
            "fvu": {w: mean_sd([r["fvu"][w] for r in rs]) for w in widths},
        }
        for hook, rs in runs.items()
    }  # fmt: skip
    wall = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"widths": widths, "summary": summary, "runs": runs, "wall_seconds": wall,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))  # fmt: skip
    pairs = [f"{a}→{b}" for a, b in zip(widths, widths[1:])]
    md = [f"# Error-norm scaling across TopK sizes (k {args.k}, {args.tokens:,} training tokens, seeds {args.seeds})",
          "", "R² of ‖e_j‖ from [‖e_i‖, 1] on held-out tokens, mean ± sd over seeds; the ‖x‖ column is the "
          "control, R² of the largest SAE's ‖e‖ from the activation norm alone.", "",
          "| hook | " + " | ".join(f"R² {p}" for p in pairs) + f" | R² {widths[0]}→{widths[-1]} | R² ‖x‖→{widths[-1]} | "
          + " | ".join(f"FVU {w}" for w in widths) + " |",
          "|---|" + "---|" * (2 * len(widths) + 1)]  # fmt: skip
    for hook, s in summary.items():
        cells = [f"{m:.3f} ± {sd:.3f}" for m, sd in s["r2_next_from_smaller"]]
        cells.append("{:.3f} ± {:.3f}".format(*s["r2_largest_from_smallest"]))
        cells.append("{:.3f} ± {:.3f}".format(*s["r2_largest_from_x_norm"]))
        cells += [f"{s['fvu'][w][0]:.3f} ± {s['fvu'][w][1]:.3f}" for w in widths]
        md.append(f"| `{hook}` | " + " | ".join(cells) + " |")
    md += ["", f"![R² heat maps, seed {args.seeds[0]}]({args.tag}.png)", "",
           f"Wall time {wall:.0f} s. Command: `python benchmarks/bench_error_norm_scaling.py --hooks "
           f"{' '.join(args.hooks)} --seeds {' '.join(map(str, args.seeds))} --widths {' '.join(map(str, widths))} "
           f"--k {args.k} --tokens {args.tokens} --capture-tokens {args.capture_tokens} "
           f"--eval-tokens {args.eval_tokens} --tag {args.tag}`"]  # fmt: skip
    (RESULTS / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    plot_heatmaps(runs, widths, RESULTS / f"{args.tag}.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
