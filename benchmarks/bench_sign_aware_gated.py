"""Benchmark: SA-GSAE v2 at width H vs SAELens ``gated`` at 2H (SPEC §1, seed 000).

On synthetic antipodal features (``sae_ext.synthetic.bipolar``; or a file of real
activations with ``--activations``) it trains, with SAELens's own ``SAETrainer`` on inputs
normalised to E‖x‖² = d_in (``expected_average_only_in``, folded back on save, so the
coefficients are in the units the demo uses):

* SA-GSAE (width H, config defaults) over a grid of ``l0_coefficient`` λ₀ values and SAELens
  ``gated`` (width 2H) over a grid of ``l1_coefficient`` λ values, several seeds;
* ablations of SA-GSAE at one λ₀: ``aux_coefficient=0``, ``tie_radii=False``,
  ``two_sided=False``, ``dead_threshold_reset=False``.

and reports on held-out data: R² (explained variance), L0, dead fraction (never fires on
the held-out set), bipolar fraction (alive latents firing each sign ≥ 5 %), and, with
ground truth, **recovery** (share of true features whose best ``|cos|`` with a decoder row
is ≥ 0.9), MCC (one-to-one) and latents per true feature. It checks that L0 falls
monotonically as λ₀ rises, and compares SA-GSAE with gated@2H **at matched L0** (gated's R²
read off its λ curve at SA-GSAE's L0, linear in log L0; only inside gated's L0 range).
Mean ± sd over seeds. Writes ``<out>/sign_aware_gated.{json,md,png}`` (``--quick``:
``sign_aware_gated.quick.{json,md,png}``).

    python benchmarks/bench_sign_aware_gated.py            # full: 42 trainings of 2000 steps
    python benchmarks/bench_sign_aware_gated.py --quick    # smoke run: 6 trainings of 500 steps
    python benchmarks/bench_sign_aware_gated.py --activations acts.pt --width 1024 --l0 0.3 1 3
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.synthetic import mean_correlation_coefficient

from sae_ext.bench import format_mean_sd, mean_sd
from sae_ext.metrics.curves import is_monotone, value_at_l0
from sae_ext.metrics.sign import bipolar_fraction, dead_fraction, sign_counts
from sae_ext.saes.sign_aware_gated import (
    SignAwareGatedTrainingSAE,
    SignAwareGatedTrainingSAEConfig,
)
from sae_ext.synthetic.bipolar import BipolarFeatureModel, latents_per_feature
from sae_ext.synthetic.recovery import max_cosine_match
from sae_ext.testing import fit_on_stream

PAPER_CLAIMS = {
    "pareto": "half-width SA-GSAE (H) Pareto-dominates gated (2H) on 3/6 cells, matches R² "
    "within 0.025 on the rest while cutting dead fraction by 0.35-0.62",
    "no_aux": "no auxiliary loss collapses (LR 0.27, 98 % dead)",
    "tie_radii": "tying r+ = r- is indistinguishable (|ΔR²| = 0.0015)",
}

SA_GSAE, GATED = "sa_gsae_H", "gated_2H"
#: variant name -> SA-GSAE config overrides (ablations, run at one λ₀)
ABLATIONS: dict[str, dict[str, Any]] = {
    "sa_gsae_no_aux": {"aux_coefficient": 0.0},
    "sa_gsae_untied": {"tie_radii": False},
    "sa_gsae_one_sided": {"two_sided": False},
    "sa_gsae_no_reset": {"dead_threshold_reset": False},
}
#: a true feature counts as recovered when a decoder row has |cos| ≥ this with it
RECOVERY_COS = 0.9
METRICS = ["r2", "l0", "dead_fraction", "bipolar_fraction", "recovery", "mcc", "latents_per_feature"]


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

    def stream(batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield train[torch.randint(0, train.shape[0], (batch_size,), generator=gen)]

    info = {"source": str(args.activations), "n_train": train.shape[0], "n_test": n_test}
    return Data(acts.shape[1], test, stream, None, info)


def make_sae(kind: str, width: int, d_in: int, coefficient: float, args: argparse.Namespace) -> TrainingSAE:
    """gated@2H with λ = ``coefficient``, or SA-GSAE@H (or an ablation) with λ₀ = ``coefficient``."""
    common = {"d_in": d_in, "normalize_activations": args.normalize}
    if kind == GATED:
        return GatedTrainingSAE(GatedTrainingSAEConfig(d_sae=2 * width, l1_coefficient=coefficient, **common))
    overrides = dict(ABLATIONS.get(kind, {}))
    for name in ("initial_threshold", "bandwidth", "pre_act_loss_coefficient"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return SignAwareGatedTrainingSAE(
        SignAwareGatedTrainingSAEConfig(d_sae=width, l0_coefficient=coefficient, **common, **overrides)
    )


@torch.no_grad()
def evaluate(sae: TrainingSAE, data: Data) -> dict[str, float]:
    """Held-out R², L0, dead and bipolar fractions; recovery, MCC, latents/feature with ground truth."""
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
        best = max_cosine_match(data.directions, W_dec).per_true
        out["recovery"] = (best >= RECOVERY_COS).double().mean().item()
        out["mcc"] = mean_correlation_coefficient(W_dec, data.directions)
        out["latents_per_feature"] = latents_per_feature(W_dec, data.directions).float().mean().item()
    return out


def train_one(kind: str, coefficient: float, seed: int, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    sae = make_sae(kind, args.width, data.d_in, coefficient, args)
    start = time.perf_counter()
    fit_on_stream(
        sae, data.stream(args.batch, seed), args.steps, args.batch, lr=args.lr,
        lr_warm_up_steps=args.steps // 20, dead_feature_window=args.dead_window,
        feature_sampling_window=args.dead_window * 5, n_batches_for_norm_estimate=20,
    )
    seconds = time.perf_counter() - start
    row = {"model": kind, "width": sae.cfg.d_sae, "coefficient": coefficient, "seed": seed, "train_s": seconds}
    row.update(evaluate(sae, data))
    knob = "λ" if kind == GATED else "λ₀"
    print(
        f"{kind:18s} {knob}={coefficient:<5g} seed={seed} R²={row['r2']:.4f} L0={row['l0']:.2f} "
        f"dead={row['dead_fraction']:.3f} recovery={row.get('recovery', math.nan):.3f} ({seconds:.1f}s)",
        flush=True,
    )
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds per (model, coefficient)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["coefficient"]), []).append(r)
    out = []
    for (model, coefficient), rs in groups.items():
        s: dict[str, Any] = {"model": model, "width": rs[0]["width"], "coefficient": coefficient, "n_seeds": len(rs)}
        for m in METRICS:
            s[m], s[f"{m}_sd"] = mean_sd(r.get(m) for r in rs)
        out.append(s)
    return out


def matched_l0(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SA-GSAE's R² and dead fraction against gated@2H's, read at SA-GSAE's L0 (NaN outside gated's range)."""
    gated = [s for s in summary if s["model"] == GATED and s["l0"] and s["l0"] > 0]
    out = []
    for s in sorted((s for s in summary if s["model"] == SA_GSAE), key=lambda s: s["coefficient"]):
        row = {"l0_coefficient": s["coefficient"], "l0": s["l0"], "r2": s["r2"], "dead_fraction": s["dead_fraction"]}
        if gated and s["l0"] and s["l0"] > 0:
            l0s = [g["l0"] for g in gated]
            row["gated_r2"] = value_at_l0(l0s, [g["r2"] for g in gated], s["l0"])
            row["gated_dead_fraction"] = value_at_l0(l0s, [g["dead_fraction"] for g in gated], s["l0"])
            row["delta_r2"] = row["r2"] - row["gated_r2"]
        out.append(row)
    return out


def l0_is_monotone(summary: list[dict[str, Any]]) -> bool:
    pts = [s for s in summary if s["model"] == SA_GSAE]
    return is_monotone([s["coefficient"] for s in pts], [s["l0"] for s in pts], decreasing=True)


def _pm(s: dict[str, Any], m: str) -> str:
    return format_mean_sd(s.get(m), s.get(f"{m}_sd"))


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    summary = result["summary"]
    has_gt = any(s.get("recovery") is not None for s in summary)
    head = "| model | width | λ₀ / λ | R² | L0 | dead frac. | bipolar frac. |"
    sep = "|---|---|---|---|---|---|---|"
    if has_gt:
        head += f" recovery (|cos| ≥ {RECOVERY_COS}) | MCC | latents / true feature |"
        sep += "---|---|---|"
    lines = [
        "# SA-GSAE v2 (width H) vs SAELens gated (width 2H)",
        "",
        f"Data: {json.dumps(result['data'])}",
        "",
        f"Settings: {json.dumps(result['settings'])}",
        "",
        f"Wall time: {result['wall_s']:.0f} s. Values: mean ± sd over seeds (held-out set). "
        "λ₀ is SA-GSAE's `l0_coefficient`, λ gated's `l1_coefficient`, both on inputs normalised "
        "to E‖x‖² = d_in.",
        "",
        head,
        sep,
    ]
    order = [SA_GSAE, GATED, *ABLATIONS]
    for s in sorted(summary, key=lambda s: (order.index(s["model"]), s["coefficient"])):
        line = (
            f"| {s['model']} | {s['width']} | {s['coefficient']:g} | {_pm(s, 'r2')} | {_pm(s, 'l0')} "
            f"| {_pm(s, 'dead_fraction')} | {_pm(s, 'bipolar_fraction')} |"
        )
        if has_gt:
            line += f" {_pm(s, 'recovery')} | {_pm(s, 'mcc')} | {_pm(s, 'latents_per_feature')} |"
        lines.append(line)
    lines += [
        "",
        f"L0 monotone (falling) in λ₀: **{result['l0_monotone_in_l0_coefficient']}**.",
        "",
        "## SA-GSAE@H vs gated@2H at matched L0",
        "",
        "gated@2H's R² and dead fraction read off its λ curve at SA-GSAE's L0 (linear in log L0; "
        "– outside gated's L0 range).",
        "",
        "| λ₀ | L0 | R² SA-GSAE@H | R² gated@2H | ΔR² | dead SA-GSAE | dead gated |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(v: float | None, fmt: str = ".4f") -> str:
        return "–" if v is None or math.isnan(v) else f"{v:{fmt}}"

    for m in result["matched_l0"]:
        lines.append(
            f"| {m['l0_coefficient']:g} | {m['l0']:.2f} | {num(m['r2'])} | {num(m.get('gated_r2'))} "
            f"| {num(m.get('delta_r2'), '+.4f')} | {num(m['dead_fraction'], '.3f')} "
            f"| {num(m.get('gated_dead_fraction'), '.3f')} |"
        )
    lines += ["", f"## Ablations at λ₀ = {result['ablation_l0']:g} (mean ± sd over seeds)", ""]
    base = next((s for s in summary if s["model"] == SA_GSAE and s["coefficient"] == result["ablation_l0"]), None)
    if base is not None:
        lines += ["| variant | ΔR² vs default | L0 | dead frac. |", "|---|---|---|---|"]
        for s in summary:
            if s["model"] in ABLATIONS:
                lines.append(f"| {s['model']} | {s['r2'] - base['r2']:+.4f} | {_pm(s, 'l0')} | {_pm(s, 'dead_fraction')} |")
    lines += ["", "## The paper's claims (for reference; real LLM activations)", ""]
    lines += [f"- {v}" for v in PAPER_CLAIMS.values()]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {SA_GSAE: ("C0", "o"), GATED: ("C1", "s")}
    styles.update({k: (f"C{i + 2}", "^") for i, k in enumerate(ABLATIONS)})
    for model, (color, marker) in styles.items():
        pts = sorted((s for s in summary if s["model"] == model), key=lambda s: s["coefficient"])
        if not pts:
            continue
        kw = {"color": color, "marker": marker, "label": model, "capsize": 3}
        ax1.errorbar(
            [s["l0"] for s in pts], [s["r2"] for s in pts],
            xerr=[s["l0_sd"] for s in pts], yerr=[s["r2_sd"] for s in pts],
            linestyle="-" if len(pts) > 1 else "none", **kw,
        )
        if model == SA_GSAE:
            ax2.errorbar(
                [s["coefficient"] for s in pts], [s["l0"] for s in pts], yerr=[s["l0_sd"] for s in pts],
                linestyle="-", **kw,
            )
    true_l0 = result["data"].get("true_l0")
    if true_l0:
        ax1.axvline(true_l0, color="grey", linestyle=":", label="true L0")
        ax2.axhline(true_l0, color="grey", linestyle=":", label="true L0")
    ax1.set_xscale("log")
    ax1.set_xlabel("L0 (held-out)")
    ax1.set_ylabel("R² (explained variance)")
    ax1.set_title("Sparsity vs fidelity")
    ax1.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("l0_coefficient λ₀ (normalised input)")
    ax2.set_ylabel("L0 (held-out)")
    ax2.set_title("SA-GSAE@H: L0 against λ₀")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 500 steps at lr 1e-2, three points each, no ablations")
    p.add_argument("--activations", type=Path, help="a .pt file with a [N, d_in] tensor of real activations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--l0", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0],
                   help="SA-GSAE l0_coefficient (λ₀) grid")
    p.add_argument("--l1", type=float, nargs="+", default=[0.3, 1.0, 2.0, 3.0, 5.0],
                   help="gated@2H l1_coefficient (λ) grid")
    p.add_argument("--ablation-l0", type=float, help="λ₀ for the ablations (default: the middle of --l0)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--width", type=int, default=64, help="H: SA-GSAE width (gated gets 2H)")
    p.add_argument("--d-in", type=int, default=32, help="synthetic activation dimension")
    p.add_argument("--n-features", type=int, default=64, help="synthetic ground-truth features")
    p.add_argument("--firing-prob", type=float, default=0.04)
    p.add_argument("--magnitude-std", type=float, default=0.2)
    p.add_argument("--bipolar-share", type=float, default=1.0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dead-window", type=int, default=100, help="trainer dead_feature_window (steps)")
    p.add_argument("--normalize", default="expected_average_only_in", choices=["none", "expected_average_only_in"])
    p.add_argument("--initial-threshold", type=lambda v: v if v == "auto" else float(v),
                   help="SA-GSAE override: a number or 'auto' (default: config default)")
    p.add_argument("--bandwidth", type=float, help="SA-GSAE override (default: config default)")
    p.add_argument("--pre-act-loss-coefficient", type=float, help="SA-GSAE override (default: off)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.n_test, args.lr = args.seeds[:1], 500, 4096, 1e-2
        args.l0, args.l1 = [0.3, 1.0, 3.0], [1.0, 3.0, 5.0]
        args.no_ablations = True
    if args.ablation_l0 is None:
        args.ablation_l0 = sorted(args.l0)[(len(args.l0) - 1) // 2]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = file_data(args) if args.activations else synthetic_data(args)
    start = time.perf_counter()
    rows = []
    for seed in args.seeds:
        for l0 in args.l0:
            rows.append(train_one(SA_GSAE, l0, seed, data, args))
        for l1 in args.l1:
            rows.append(train_one(GATED, l1, seed, data, args))
        if not args.no_ablations:
            for kind in ABLATIONS:
                rows.append(train_one(kind, args.ablation_l0, seed, data, args))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out_dir", "activations")}
    defaults = SignAwareGatedTrainingSAEConfig(d_in=1, d_sae=1)
    settings["sa_gsae_defaults"] = {
        k: getattr(defaults, k)
        for k in ("sparsity_loss_mode", "aux_coefficient", "tie_radii", "two_sided", "initial_threshold",
                  "bandwidth", "b_dec_init", "pre_act_loss_coefficient", "dead_threshold_reset")
    }
    summary = summarize(rows)
    result = {
        "data": data.info,
        "settings": settings,
        "ablation_l0": args.ablation_l0,
        "wall_s": time.perf_counter() - start,
        "runs": rows,
        "summary": summary,
        "matched_l0": matched_l0(summary),
        "l0_monotone_in_l0_coefficient": l0_is_monotone(summary),
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
