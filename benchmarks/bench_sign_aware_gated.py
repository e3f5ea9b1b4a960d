"""Benchmark: sign-aware gated SAE at width H vs SAELens ``gated`` at 2H (SPEC §1, seed 000).

On synthetic antipodal features (``sae_ext.synthetic.bipolar``; or a file of real
activations with ``--activations``) it trains, with SAELens's own ``SAETrainer``:

* SA-GSAE (width H, config defaults) and SAELens ``gated`` (width 2H) over a grid of
  ``l1_coefficient`` values, several seeds;
* ablations of SA-GSAE at one λ: ``aux_coefficient=0``, ``tie_radii=False``,
  ``two_sided=False``.

and reports on held-out data: R² (explained variance), L0, dead fraction (never fires on
the held-out set), bipolar fraction (alive latents firing each sign ≥ 5 %), and, with
ground truth, MCC against the true directions (|cos|) and latents per true feature.
Mean ± sd over seeds. Writes ``<out>/sign_aware_gated.{json,md,png}`` (``--quick``:
``sign_aware_gated.quick.{json,md,png}``).

    python benchmarks/bench_sign_aware_gated.py            # full (≈ 5-10 min, 1 thread)
    python benchmarks/bench_sign_aware_gated.py --quick    # ≈ 1 min
    python benchmarks/bench_sign_aware_gated.py --activations acts.pt --width 1024 \\
        --normalize expected_average_only_in --l1 0.3 1 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.synthetic import mean_correlation_coefficient
from sae_lens.training.sae_trainer import SAETrainer

from sae_ext.metrics.sign import bipolar_fraction, dead_fraction, sign_counts
from sae_ext.saes.sign_aware_gated import (
    SignAwareGatedTrainingSAE,
    SignAwareGatedTrainingSAEConfig,
)
from sae_ext.synthetic.bipolar import BipolarFeatureModel, latents_per_feature

PAPER_CLAIMS = {
    "pareto": "half-width SA-GSAE (H) Pareto-dominates gated (2H) on 3/6 cells, matches R² "
    "within 0.025 on the rest while cutting dead fraction by 0.35-0.62",
    "no_aux": "no auxiliary loss collapses (LR 0.27, 98 % dead)",
    "tie_radii": "tying r+ = r- is indistinguishable (|ΔR²| = 0.0015)",
}

#: variant name -> SA-GSAE config overrides (ablations, run at one λ)
ABLATIONS: dict[str, dict[str, Any]] = {
    "sa_gsae_no_aux": {"aux_coefficient": 0.0},
    "sa_gsae_untied": {"tie_radii": False},
    "sa_gsae_one_sided": {"two_sided": False},
}


@dataclass
class Data:
    """A training stream factory, a held-out set and (synthetic only) the true directions."""

    d_in: int
    test: torch.Tensor
    stream: Any  # (batch_size, seed) -> Iterator[Tensor]
    directions: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def synthetic_data(args: argparse.Namespace) -> Data:
    model = BipolarFeatureModel(
        args.n_features,
        args.d_in,
        firing_probability=args.firing_prob,
        mean_magnitude=1.0,
        std_magnitude=args.magnitude_std,
        bipolar_share=args.bipolar_share,
        seed=args.data_seed,
    )
    test = model.sample(args.n_test, torch.Generator().manual_seed(10_000 + args.data_seed))
    info = {
        "source": "synthetic bipolar",
        "n_features": args.n_features,
        "firing_prob": args.firing_prob,
        "bipolar_share": args.bipolar_share,
        "magnitude": f"ReLU(N(1, {args.magnitude_std}²))",
        "true_l0": (test.coefficients != 0).sum(-1).float().mean().item(),
    }
    return Data(args.d_in, test.activations, model.batches, model.directions, info)


def file_data(args: argparse.Namespace) -> Data:
    acts = torch.load(args.activations, map_location="cpu")
    if not isinstance(acts, torch.Tensor) or acts.ndim != 2:
        raise ValueError(f"--activations must hold a 2-D tensor [N, d_in], got {type(acts)}")
    acts = acts.float()
    n_test = min(args.n_test, acts.shape[0] // 10)
    g = torch.Generator().manual_seed(args.data_seed)
    perm = torch.randperm(acts.shape[0], generator=g)
    test, train = acts[perm[:n_test]], acts[perm[n_test:]]
    if args.center:  # same preprocessing for every model; R² is unaffected by a shared shift
        mean = train.mean(0)
        test, train = test - mean, train - mean

    def stream(batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield train[torch.randint(0, train.shape[0], (batch_size,), generator=gen)]

    info = {
        "source": str(args.activations),
        "n_train": train.shape[0],
        "n_test": n_test,
        "centered": args.center,
    }
    return Data(acts.shape[1], test, stream, None, info)


def make_sae(kind: str, width: int, d_in: int, l1: float, args: argparse.Namespace) -> TrainingSAE:
    common = {"d_in": d_in, "l1_coefficient": l1, "normalize_activations": args.normalize}
    if kind == "gated_2H":
        return GatedTrainingSAE(GatedTrainingSAEConfig(d_sae=2 * width, **common))
    overrides = dict(ABLATIONS.get(kind, {}))
    for name in ("initial_threshold", "bandwidth"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return SignAwareGatedTrainingSAE(
        SignAwareGatedTrainingSAEConfig(d_sae=width, **common, **overrides)
    )


@torch.no_grad()
def evaluate(sae: TrainingSAE, data: Data) -> dict[str, float]:
    sae.eval()
    x = data.test
    feats = torch.cat([sae.encode(chunk) for chunk in x.split(4096)])
    x_hat = torch.cat([sae.decode(chunk) for chunk in feats.split(4096)])
    pos, neg = sign_counts(feats)
    out = {
        "r2": 1 - ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "l0": (feats != 0).sum(-1).float().mean().item(),
        "dead_fraction": dead_fraction(pos, neg).item(),
        "bipolar_fraction": bipolar_fraction(pos, neg).item(),
        "negative_firing_share": (neg.sum() / (pos + neg).sum().clamp(min=1)).item(),
    }
    if data.directions is not None:
        W_dec = sae.W_dec.detach().float()
        out["mcc"] = mean_correlation_coefficient(W_dec, data.directions)
        out["latents_per_feature"] = (
            latents_per_feature(W_dec, data.directions).float().mean().item()
        )
    return out


def train_one(
    kind: str, l1: float, seed: int, data: Data, args: argparse.Namespace
) -> dict[str, Any]:
    torch.manual_seed(seed)
    sae = make_sae(kind, args.width, data.d_in, l1, args)
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr,
        lr_warm_up_steps=args.steps // 20,
        dead_feature_window=args.dead_window,
        feature_sampling_window=args.dead_window * 5,
        n_batches_for_norm_estimate=20,
    )
    start = time.perf_counter()
    SAETrainer(cfg=cfg, sae=sae, data_provider=data.stream(args.batch, seed)).fit()
    seconds = time.perf_counter() - start
    row = {"model": kind, "width": sae.cfg.d_sae, "l1": l1, "seed": seed, "train_s": seconds}
    row.update(evaluate(sae, data))
    print(
        f"{kind:18s} λ={l1:<5g} seed={seed} R²={row['r2']:.4f} L0={row['l0']:.2f} "
        f"dead={row['dead_fraction']:.3f} bipolar={row['bipolar_fraction']:.3f} ({seconds:.1f}s)",
        flush=True,
    )
    return row


METRICS = ["r2", "l0", "dead_fraction", "bipolar_fraction", "mcc", "latents_per_feature"]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["l1"]), []).append(r)
    out = []
    for (model, l1), rs in groups.items():
        s: dict[str, Any] = {"model": model, "width": rs[0]["width"], "l1": l1, "n_seeds": len(rs)}
        for m in METRICS:
            vals = [r[m] for r in rs if m in r]
            if vals:
                s[m] = statistics.fmean(vals)
                s[f"{m}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def paired_delta(
    rows: list[dict[str, Any]], a: str, b: str, l1: float, metric: str
) -> tuple[float, float, int]:
    """Mean ± sd over seeds of metric(a) − metric(b), paired by seed."""
    by_seed = {(r["model"], r["seed"]): r[metric] for r in rows if r["l1"] == l1}
    deltas = [
        by_seed[(a, s)] - by_seed[(b, s)] for (m, s) in by_seed if m == a and (b, s) in by_seed
    ]
    if not deltas:
        return math.nan, math.nan, 0
    sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    return statistics.fmean(deltas), sd, len(deltas)


def _pm(s: dict[str, Any], m: str, fmt: str = ".4f") -> str:
    return f"{s[m]:{fmt}} ± {s[m + '_sd']:{fmt}}" if m in s else "–"


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    summary, rows, l1_ab = result["summary"], result["runs"], result["ablation_l1"]
    has_gt = any("mcc" in s for s in summary)
    head = "| model | width | λ | R² | L0 | dead frac. | bipolar frac. |"
    sep = "|---|---|---|---|---|---|---|"
    if has_gt:
        head += " MCC | latents / true feature |"
        sep += "---|---|"
    lines = [
        "# SA-GSAE (width H) vs SAELens gated (width 2H)",
        "",
        f"Data: {json.dumps(result['data'])}",
        "",
        f"Settings: {json.dumps(result['settings'])}",
        "",
        f"Wall time: {result['wall_s']:.0f} s. Values: mean ± sd over seeds (held-out set).",
        "",
        head,
        sep,
    ]
    for s in sorted(summary, key=lambda s: (s["model"] != "sa_gsae_H", s["model"], s["l1"])):
        line = (
            f"| {s['model']} | {s['width']} | {s['l1']:g} | {_pm(s, 'r2')} | {_pm(s, 'l0', '.2f')} "
            f"| {_pm(s, 'dead_fraction', '.3f')} | {_pm(s, 'bipolar_fraction', '.3f')} |"
        )
        if has_gt:
            line += f" {_pm(s, 'mcc', '.3f')} | {_pm(s, 'latents_per_feature', '.2f')} |"
        lines.append(line)
    lines += [
        "",
        "## Paired differences (by seed)",
        "",
        "| comparison | λ | ΔR² | ΔL0 | Δdead |",
        "|---|---|---|---|---|",
    ]
    comparisons = [("sa_gsae_H", "gated_2H", l1) for l1 in result["settings"]["l1"]]
    comparisons += [(k, "sa_gsae_H", l1_ab) for k in ABLATIONS]
    for a, b, l1 in comparisons:
        cells = []
        for m, fmt in (("r2", ".4f"), ("l0", ".2f"), ("dead_fraction", ".3f")):
            mean, sd, n = paired_delta(rows, a, b, l1, m)
            cells.append(f"{mean:+{fmt}} ± {sd:{fmt}}" if n else "–")
        lines.append(f"| {a} − {b} | {l1:g} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims (for reference; real LLM activations)", ""]
    lines += [f"- {v}" for v in PAPER_CLAIMS.values()]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"sa_gsae_H": ("C0", "o"), "gated_2H": ("C1", "s")}
    styles.update({k: (f"C{i + 2}", "^") for i, k in enumerate(ABLATIONS)})
    for model, (color, marker) in styles.items():
        pts = sorted((s for s in summary if s["model"] == model), key=lambda s: s["l1"])
        if not pts:
            continue
        kw = {"color": color, "marker": marker, "label": model, "capsize": 3}
        ax1.errorbar(
            [s["l0"] for s in pts],
            [s["r2"] for s in pts],
            xerr=[s["l0_sd"] for s in pts],
            yerr=[s["r2_sd"] for s in pts],
            linestyle="-" if len(pts) > 1 else "none",
            **kw,
        )
        for s in pts:
            ax1.annotate(
                f"λ={s['l1']:g}",
                (s["l0"], s["r2"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax2.errorbar(
            [s["l1"] for s in pts],
            [s["dead_fraction"] for s in pts],
            yerr=[s["dead_fraction_sd"] for s in pts],
            linestyle="-" if len(pts) > 1 else "none",
            **kw,
        )
    ax1.set_xscale("symlog", linthresh=1)
    ax1.set_xlabel("L0 (held-out)")
    ax1.set_ylabel("R² (explained variance)")
    ax1.set_title("Sparsity vs fidelity")
    ax2.set_xscale("log")
    ax2.set_xticks(sorted({s["l1"] for s in summary}))
    ax2.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_xlabel("l1_coefficient λ")
    ax2.set_ylabel("dead fraction")
    ax2.set_title("Dead latents")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one seed, few steps (≈ 1 minute)")
    p.add_argument(
        "--activations", type=Path, help="a .pt file with a [N, d_in] tensor of real activations"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--l1", type=float, nargs="+", default=[0.3, 1.0, 2.0, 3.0], help="l1_coefficient grid"
    )
    p.add_argument(
        "--ablation-l1", type=float, help="λ for the ablations (default: the lower middle of --l1)"
    )
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--width", type=int, default=64, help="H: SA-GSAE width (gated gets 2H)")
    p.add_argument("--d-in", type=int, default=32, help="synthetic activation dimension")
    p.add_argument("--n-features", type=int, default=64, help="synthetic ground-truth features")
    p.add_argument("--firing-prob", type=float, default=0.04)
    p.add_argument("--magnitude-std", type=float, default=0.2)
    p.add_argument("--bipolar-share", type=float, default=1.0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=8192)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--dead-window", type=int, default=200, help="trainer dead_feature_window (steps)"
    )
    p.add_argument("--normalize", default="none", choices=["none", "expected_average_only_in"])
    p.add_argument(
        "--center",
        action="store_true",
        help="subtract the training mean from --activations (SA-GSAE's two-sided gate needs "
        "centred pre-activations; b_dec starts at 0)",
    )
    p.add_argument(
        "--initial-threshold", type=float, help="SA-GSAE override (default: config default)"
    )
    p.add_argument("--bandwidth", type=float, help="SA-GSAE override (default: config default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.n_test = args.seeds[:1], 300, 4096
    if args.ablation_l1 is None:
        args.ablation_l1 = sorted(args.l1)[(len(args.l1) - 1) // 2]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = file_data(args) if args.activations else synthetic_data(args)
    start = time.perf_counter()
    rows = []
    for l1 in args.l1:
        for seed in args.seeds:
            for kind in ("sa_gsae_H", "gated_2H"):
                rows.append(train_one(kind, l1, seed, data, args))
    if not args.no_ablations:
        for kind in ABLATIONS:
            for seed in args.seeds:
                rows.append(train_one(kind, args.ablation_l1, seed, data, args))
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("out_dir", "activations")
    }
    settings["sa_gsae_defaults"] = {
        k: getattr(SignAwareGatedTrainingSAEConfig(d_in=1, d_sae=1), k)
        for k in (
            "aux_coefficient",
            "tie_radii",
            "two_sided",
            "initial_threshold",
            "bandwidth",
            "dead_threshold_reset",
        )
    }
    result = {
        "data": data.info,
        "settings": settings,
        "ablation_l1": args.ablation_l1,
        "wall_s": time.perf_counter() - start,
        "runs": rows,
        "summary": summarize(rows),
        "paper_claims": PAPER_CLAIMS,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "sign_aware_gated.quick" if args.quick else "sign_aware_gated"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_markdown(args.out_dir / f"{stem}.md", result)
    plot(args.out_dir / f"{stem}.png", result)
    print(f"wrote {args.out_dir / stem}.json/.md/.png in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
