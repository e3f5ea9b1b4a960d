"""SASA vs SAELens TopK on multi-dimensional features (or on a file of real activations).

Claims tested (Dalili & Mahdavi, arXiv 2606.06333): single-direction SAEs split a feature of
intrinsic dimension d_i over many latents, SASA represents it with one group whose effective
rank tracks d_i, and SASA matches standard SAEs at about half the token budget.

Synthetic mode (default): features of true dimension 1–4 (a ray, circles, spheres, S³) in
mutually orthogonal random subspaces (``sae_ext.synthetic.multidim``), firing and magnitudes
from SAELens's ``ActivationGenerator``. Every SAE is trained by SAELens's own ``SAETrainer``
on the same stream; TopK gets ``k = s·r`` (matched active columns) and the same ``d_sae``.
Per ground-truth feature it reports

- ``split_dec``: SPEC §6 splitting count from decoder geometry (latent directions, or SASA
  groups' dominant decoder subspaces, inside the feature subspace at principal cosine ≥ 0.9);
- ``units90``: latents/groups needed to carry 90 % of the feature's reconstructed energy on
  tokens where it fires (data-driven splitting: 1 = the feature lives in one unit);
- for SASA, the group carrying most of that energy: its decoder ``rank90`` (SPEC) and its
  ``usage rank90`` (rank90 of what the group actually writes on those tokens) vs d_i;

plus held-out R², all as mean ± sd over seeds.

Real mode (``--activations acts.pt``, a ``[N, d_in]`` tensor): TopK vs SASA at the full token
budget and SASA at ``--budget-fraction`` (default ½) of it; R², L0, dead fraction, SASA group
stable rank and rank90. Inputs are normalised by SAELens (``expected_average_only_in``) and the
scale is folded back, so R² is on the raw activations.

``λ_nuc`` is given relative to the data scale: ``λ_nuc = nuclear_ratio · E‖x‖²`` (the MSE term
grows with ‖x‖², the nuclear term does not).

    python benchmarks/bench_sasa.py --quick            # ~1 minute
    python benchmarks/bench_sasa.py                    # full synthetic run, 3 seeds
    python benchmarks/bench_sasa.py --activations acts.pt --out benchmarks/results/sasa_real
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.saes.sae import TrainingSAE  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training import activation_scaler as _activation_scaler_module  # noqa: E402
from sae_lens.training import sae_trainer as _sae_trainer_module  # noqa: E402

import sae_ext  # noqa: E402
from sae_ext.metrics.groups import rank90, rank_at_fraction  # noqa: E402
from sae_ext.saes.sasa import SASATrainingSAE, SASATrainingSAEConfig  # noqa: E402
from sae_ext.saes.sasa_batchtopk import (  # noqa: E402
    SASABatchTopKTrainingSAE,
    SASABatchTopKTrainingSAEConfig,
)
from sae_ext.synthetic.multidim import MultiDimSample, make_multidim_data  # noqa: E402
from sae_ext.synthetic.recovery import (  # noqa: E402
    energy_in_subspace,
    splitting_count,
    units_for_energy,
)
from sae_ext.testing import fit_on_stream  # noqa: E402

# SAELens's progress bars would flood the benchmark log.
for _module in (_sae_trainer_module, _activation_scaler_module):
    _module.tqdm = functools.partial(_module.tqdm, disable=True)  # type: ignore[attr-defined]

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class RunSpec:
    """One SAE training run inside a seed."""

    name: str
    arch: str  # "topk", "sasa" or "sasa_batchtopk"
    budget_fraction: float = 1.0
    nuclear_ratio: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="~1 minute: 1 seed, short training")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps at full budget (default 2000, quick 300)",
    )
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument(
        "--dims", type=int, nargs="+", default=[1, 2, 3, 4], help="true feature dimensions"
    )
    p.add_argument("--features-per-dim", type=int, default=6)
    p.add_argument("--firing-prob", type=float, default=0.08)
    p.add_argument("--magnitude-std", type=float, default=0.2)
    p.add_argument("--group-rank", type=int, default=4, help="SASA r")
    p.add_argument("--n-active-groups", type=int, default=4, help="SASA s; TopK gets k = s*r")
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--nuclear-ratio", type=float, default=0.005, help="λ_nuc / E‖x‖²")
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=0.5,
        help="token fraction of the reduced-budget SASA run",
    )
    p.add_argument("--n-test", type=int, default=8192, help="held-out samples")
    p.add_argument(
        "--activations",
        type=Path,
        default=None,
        help="[N, d_in] tensor file (torch.save) of real activations",
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "sasa", help="output stem (.json/.md/.png)"
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.steps is None:
        args.steps = 300 if args.quick else 2000
    for name in (
        "steps",
        "batch_size",
        "d_in",
        "features_per_dim",
        "group_rank",
        "n_active_groups",
        "d_sae",
        "n_test",
    ):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not 0 < args.budget_fraction <= 1:
        raise SystemExit(f"--budget-fraction must be in (0, 1]; got {args.budget_fraction}")
    if args.nuclear_ratio < 0:
        raise SystemExit(f"--nuclear-ratio must be >= 0; got {args.nuclear_ratio}")
    if any(d < 1 for d in args.dims):
        raise SystemExit(f"--dims must be >= 1; got {args.dims}")
    if args.d_sae % args.group_rank:
        raise SystemExit(
            f"--d-sae={args.d_sae} must be a multiple of --group-rank={args.group_rank}"
        )
    if args.n_active_groups > args.d_sae // args.group_rank:
        raise SystemExit(
            f"--n-active-groups must be in [1, {args.d_sae // args.group_rank}]; got {args.n_active_groups}"
        )
    return args


# ---- training --------------------------------------------------------------------------------


def make_sae(
    spec: RunSpec, args: argparse.Namespace, d_in: int, lam: float, normalize: str
) -> TrainingSAE:
    k = args.n_active_groups * args.group_rank
    if spec.arch == "topk":
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=k, normalize_activations=normalize)
        )
    sasa_kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": args.d_sae,
        "group_rank": args.group_rank,
        "n_active_groups": args.n_active_groups,
        "nuclear_coefficient": lam,
        "normalize_activations": normalize,
    }
    if spec.arch == "sasa_batchtopk":
        return SASABatchTopKTrainingSAE(SASABatchTopKTrainingSAEConfig(**sasa_kwargs))
    return SASATrainingSAE(SASATrainingSAEConfig(**sasa_kwargs))


def train(
    sae: TrainingSAE, stream: Iterator[torch.Tensor], steps: int, args: argparse.Namespace
) -> float:
    """Train with SAELens's ``SAETrainer`` (cosine decay to lr/10); return wall seconds."""
    t0 = time.perf_counter()
    fit_on_stream(
        sae, stream, steps, args.batch_size, lr=args.lr, lr_end=args.lr / 10, lr_scheduler_name="cosineannealing",
        dead_feature_window=max(50, steps // 10), feature_sampling_window=max(100, steps // 4),
        n_batches_for_norm_estimate=20,
    )
    return time.perf_counter() - t0


@torch.no_grad()
def basic_metrics(sae: TrainingSAE, x: torch.Tensor) -> dict[str, float]:
    feature_acts = sae.encode(x)
    recon = sae.decode(feature_acts)
    r2 = 1 - (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    fired = (feature_acts != 0).any(0)
    out = {
        "r2": float(r2),
        "l0_columns": float((feature_acts != 0).sum(-1).double().mean()),
        "dead_column_fraction": float((~fired).double().mean()),
    }
    if isinstance(sae, SASATrainingSAE):
        groups_fired = (feature_acts != 0).unflatten(-1, (-1, sae.cfg.group_rank)).any(-1).any(0)
        out["dead_group_fraction"] = float((~groups_fired).double().mean())
        out["mean_group_stable_rank"] = float(sae.group_stable_rank().mean())
        r90 = sae.group_rank90()
        out["mean_group_rank90"] = float(r90.double().mean())
        out["group_rank90_histogram"] = torch.bincount(
            r90, minlength=sae.cfg.group_rank + 1
        ).tolist()
    if isinstance(sae, SASABatchTopKTrainingSAE):
        # the training SAE selects over the batch it is given; the saved sasa_jumprelu SAE
        # keeps every group above the learned threshold, token by token
        with tempfile.TemporaryDirectory() as tmp:
            sae.save_inference_model(tmp)
            inference = SAE.load_from_disk(tmp)
        acts = inference.encode(x)
        out["r2_inference"] = float(
            1 - (inference.decode(acts) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        )
        out["l0_columns_inference"] = float((acts != 0).sum(-1).double().mean())
    return out


def units_and_codes(sae: TrainingSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(T, U, r)`` and decoder blocks ``(U, r, d)`` in which ``x̂ − b_dec = Σ_u codes·block``."""
    with torch.no_grad():
        f = sae.encode(x)
        if isinstance(sae, SASATrainingSAE):
            return sae.group_acts(f), sae.group_decoder_blocks().detach()
        w = sae.W_dec.detach()
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            w = w / w.norm(dim=-1, keepdim=True)
        return f.unsqueeze(-1), w.unsqueeze(1)


def feature_metrics(sae: TrainingSAE, sample: MultiDimSample) -> list[dict[str, float]]:
    """Per ground-truth feature: decoder splitting, energy splitting, matched-group ranks."""
    codes, blocks = units_and_codes(sae, sample.activations)
    is_sasa = isinstance(sae, SASATrainingSAE)
    if is_sasa:
        split_dec = splitting_count(sample.bases, blocks)
        dec_rank90 = rank90(blocks)
    else:
        split_dec = splitting_count(sample.bases, blocks[:, 0])
    rows = []
    for i, basis in enumerate(sample.bases):
        fires = sample.magnitudes[:, i] > 0
        energy = energy_in_subspace(codes[fires], blocks, basis)
        row: dict[str, float] = {
            "true_dim": int(basis.shape[0]),
            "split_dec": int(split_dec[i]),
            "units90": units_for_energy(energy),
            "top_unit_energy_share": float(energy.max() / energy.sum().clamp(min=1e-30)),
        }
        if is_sasa:
            k = int(energy.argmax())
            contrib = codes[fires][:, k] @ blocks[k]  # what group k writes on these tokens
            sv = torch.linalg.svdvals(contrib.double())
            row["matched_dec_rank90"] = int(dec_rank90[k])
            row["matched_usage_rank90"] = int(rank_at_fraction(sv.pow(2)))
        rows.append(row)
    return rows


# ---- synthetic mode ---------------------------------------------------------------------------


def synthetic_runs(args: argparse.Namespace) -> list[RunSpec]:
    return [
        RunSpec("topk", "topk"),
        RunSpec("sasa (λ=0)", "sasa", nuclear_ratio=0.0),
        RunSpec("sasa", "sasa", nuclear_ratio=args.nuclear_ratio),
        RunSpec(
            f"sasa ({args.budget_fraction:g} tokens)",
            "sasa",
            args.budget_fraction,
            args.nuclear_ratio,
        ),
        RunSpec(f"topk ({args.budget_fraction:g} tokens)", "topk", args.budget_fraction),
        RunSpec("sasa_batchtopk", "sasa_batchtopk", nuclear_ratio=args.nuclear_ratio),
    ]


def run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    dims = [d for d in args.dims for _ in range(args.features_per_dim)]
    orthogonal = sum(dims) <= args.d_in
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        data = make_multidim_data(
            dims,
            args.d_in,
            firing_probability=args.firing_prob,
            std_magnitude=args.magnitude_std,
            batch_size=args.batch_size,
            orthogonal=orthogonal,
            seed=seed,
        )
        test = data.sample(args.n_test)
        mean_sq_norm = float(test.activations.pow(2).sum(-1).mean())
        seed_out: dict[str, Any] = {"seed": seed, "mean_sq_norm": mean_sq_norm, "runs": {}}
        for spec in synthetic_runs(args):
            torch.manual_seed(1000 + seed)  # same init/stream randomness for every arch
            lam = spec.nuclear_ratio * mean_sq_norm
            sae = make_sae(spec, args, args.d_in, lam, "none")
            steps = max(1, round(args.steps * spec.budget_fraction))
            seconds = train(sae, data, steps, args)
            metrics = basic_metrics(sae, test.activations)
            # SASA keeps exactly s groups per token, so a token with more than s active
            # features must lose some; R² on the other tokens isolates that cap.
            few = (test.magnitudes > 0).sum(-1) <= args.n_active_groups
            # from the full test batch's encoding (sasa_batchtopk selects over the batch)
            with torch.no_grad():
                recon = sae.decode(sae.encode(test.activations))[few]
            x_few = test.activations[few]
            metrics["r2_at_most_s_features"] = float(
                1 - (recon - x_few).pow(2).sum() / (x_few - x_few.mean(0)).pow(2).sum()
            )
            metrics["fraction_tokens_over_s_features"] = float((~few).double().mean())
            metrics.update(seconds=seconds, steps=steps, nuclear_coefficient=lam)
            metrics["features"] = feature_metrics(sae, test)
            seed_out["runs"][spec.name] = metrics
            print(
                f"  seed {seed} {spec.name:>22}: R²={metrics['r2']:.4f}  ({seconds:.0f}s)",
                flush=True,
            )
        per_seed.append(seed_out)
    return {
        "mode": "synthetic",
        "feature_dims": dims,
        "orthogonal_subspaces": orthogonal,
        "per_seed": per_seed,
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise_synthetic(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per run and true dimension: mean ± sd over seeds of the per-seed feature means."""
    names = list(result["per_seed"][0]["runs"])
    summary: dict[str, Any] = {}
    for name in names:
        runs = [s["runs"][name] for s in result["per_seed"]]
        entry: dict[str, Any] = {"r2": _mean_sd([r["r2"] for r in runs]), "by_dim": {}}
        for key in (
            "r2_at_most_s_features",
            "fraction_tokens_over_s_features",
            "l0_columns",
            "mean_group_stable_rank",
            "dead_group_fraction",
            "r2_inference",
            "l0_columns_inference",
            "seconds",
        ):
            if key in runs[0]:
                entry[key] = _mean_sd([r[key] for r in runs])
        for d in sorted(set(args.dims)):
            by = {}
            for key in (
                "split_dec",
                "units90",
                "top_unit_energy_share",
                "matched_dec_rank90",
                "matched_usage_rank90",
            ):
                if key not in runs[0]["features"][0]:
                    continue
                seed_means = [
                    statistics.fmean(f[key] for f in r["features"] if f["true_dim"] == d)
                    for r in runs
                ]
                by[key] = _mean_sd(seed_means)
            entry["by_dim"][str(d)] = by
        summary[name] = entry
    return summary


def _fmt(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    return "–" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_synthetic(
    summary: dict[str, Any], result: dict[str, Any], args: argparse.Namespace, wall: float
) -> str:
    k = args.n_active_groups * args.group_rank
    lines = [
        "# SASA vs TopK on multi-dimensional synthetic features",
        "",
        f"`{' '.join(sys.argv)}` — wall time {wall:.0f} s, seeds {args.seeds}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s).",
        "",
        f"d_in = {args.d_in}; {args.features_per_dim} features of each true dimension {args.dims} "
        f"({'mutually orthogonal' if result['orthogonal_subspaces'] else 'overlapping'} random subspaces), "
        f"firing p = {args.firing_prob}, magnitude 1 ± {args.magnitude_std}. "
        f"d_sae = {args.d_sae} for both; SASA r = {args.group_rank}, s = {args.n_active_groups} "
        f"(K = {args.d_sae // args.group_rank}); TopK k = s·r = {k}. "
        f"SAELens SAETrainer, batch {args.batch_size}, {args.steps} steps at full budget, Adam lr {args.lr} cosine→lr/10. "
        f"λ_nuc = {args.nuclear_ratio} · E‖x‖². Mean ± sd over seeds.",
        "",
        f"| run | R² (held out) | R² on tokens with ≤ s = {args.n_active_groups} active features | L0 (columns) | SASA mean stable rank | dead groups |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        lines.append(
            f"| {name} | {_fmt(e['r2'], 4)} | {_fmt(e['r2_at_most_s_features'], 4)} | "
            f"{_fmt(e.get('l0_columns', (math.nan, 0)), 1)} | "
            f"{_fmt(e.get('mean_group_stable_rank', (math.nan, 0)))} | {_fmt(e.get('dead_group_fraction', (math.nan, 0)))} |"
        )
    over = summary[next(iter(summary))]["fraction_tokens_over_s_features"][0]
    for name, e in summary.items():
        if "r2_inference" in e:
            lines += [
                "",
                f"{name}: the training SAE selects the s·B best groups over the held-out batch "
                f"(mean L0 = s·r exactly); the saved `sasa_jumprelu` SAE (per-token, learned threshold) "
                f"reaches R² {_fmt(e['r2_inference'], 4)} at L0 {_fmt(e['l0_columns_inference'], 2)} columns.",
            ]
    lines += [
        "",
        f"{100 * over:.1f} % of held-out tokens have more than s = {args.n_active_groups} active features.",
        "",
        "Per true feature dimension d_i (mean over the features of that dimension, then mean ± sd over seeds):",
        "",
        "| run | d_i | splitting count (decoder) | units for 90 % energy | top-unit energy share | matched group rank90 (decoder) | matched group rank90 (usage) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        for d, by in e["by_dim"].items():
            lines.append(
                f"| {name} | {d} | {_fmt(by['split_dec'])} | {_fmt(by['units90'])} | "
                f"{_fmt(by['top_unit_energy_share'])} | {_fmt(by.get('matched_dec_rank90', (math.nan, 0)))} | "
                f"{_fmt(by.get('matched_usage_rank90', (math.nan, 0)))} |"
            )
    lines += [
        "",
        "Definitions: *splitting count (decoder)* — SPEC §6: latents whose decoder direction, or SASA groups "
        "whose dominant decoder subspace (rank90 singular directions), lie inside the feature subspace "
        "(principal cosine ≥ 0.9). *Units for 90 % energy* — fewest latents/groups carrying 90 % of the "
        "feature's reconstructed energy (inside its subspace) on tokens where it fires; 1 = unsplit. "
        "*Matched group* — the SASA group carrying most of that energy; decoder rank90 is SPEC §3's, usage "
        "rank90 is the rank90 of what that group writes on those tokens.",
    ]
    return "\n".join(lines) + "\n"


def plot_synthetic(summary: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = [str(d) for d in sorted(set(args.dims))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(summary)
    colors = {name: f"C{j}" for j, name in enumerate(names)}
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(dims))]
        for ax, key in zip(axes[:2], ("split_dec", "units90")):
            ms = [summary[name]["by_dim"][d][key] for d in dims]
            ax.bar(
                xs,
                [m for m, _ in ms],
                width,
                yerr=[s for _, s in ms],
                label=name,
                capsize=2,
                color=colors[name],
            )
        if "matched_usage_rank90" in summary[name]["by_dim"][dims[0]]:
            for key, style in (("matched_dec_rank90", ":o"), ("matched_usage_rank90", "-s")):
                ms = [summary[name]["by_dim"][d][key] for d in dims]
                axes[2].errorbar(
                    [int(d) for d in dims],
                    [m for m, _ in ms],
                    yerr=[s for _, s in ms],
                    color=colors[name],
                    fmt=style,
                    capsize=3,
                    label=f"{name}: {key.replace('matched_', '').replace('_', ' ')}",
                )
    axes[0].set_title("splitting count (decoder, cos ≥ 0.9)")
    axes[1].set_title("units carrying 90 % of a feature's energy")
    axes[2].plot(
        [int(d) for d in dims], [int(d) for d in dims], "k--", lw=0.8, label="true dimension"
    )
    axes[2].set_title("matched SASA group rank90\n(dotted: decoder, solid: usage)", fontsize=10)
    axes[2].set_xticks([int(d) for d in dims])
    for ax in axes[:2]:
        ax.set_xticks(range(len(dims)), dims)
    for ax in axes:
        ax.set_xlabel("true feature dimension d_i")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- real-activation mode -------------------------------------------------------------------


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    acts = torch.load(args.activations, map_location="cpu")
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        raise SystemExit(
            f"--activations must hold a [N, d_in] tensor; got {type(acts).__name__} {getattr(acts, 'shape', '')}"
        )
    acts = acts.float()
    n, d_in = acts.shape
    n_test = min(args.n_test, n // 10)
    if n_test < 1:
        raise SystemExit(f"need at least 10 activations; got {n}")
    specs = [
        RunSpec("topk", "topk"),
        RunSpec("sasa", "sasa", nuclear_ratio=args.nuclear_ratio),
        RunSpec(
            f"sasa ({args.budget_fraction:g} tokens)",
            "sasa",
            args.budget_fraction,
            args.nuclear_ratio,
        ),
        RunSpec(f"topk ({args.budget_fraction:g} tokens)", "topk", args.budget_fraction),
    ]
    per_seed = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        test, train_x = acts[perm[:n_test]], acts[perm[n_test:]]

        def stream(
            gen: torch.Generator = g, data: torch.Tensor = train_x
        ) -> Iterator[torch.Tensor]:
            while True:
                yield data[torch.randint(0, data.shape[0], (args.batch_size,), generator=gen)]

        # the SAEs train on inputs normalised to E‖x‖² = d_in, so λ_nuc is relative to d_in
        seed_out: dict[str, Any] = {"seed": seed, "runs": {}}
        for spec in specs:
            torch.manual_seed(1000 + seed)
            lam = spec.nuclear_ratio * d_in
            sae = make_sae(spec, args, d_in, lam, "expected_average_only_in")
            steps = max(1, round(args.steps * spec.budget_fraction))
            seconds = train(sae, stream(), steps, args)
            metrics = basic_metrics(sae, test)
            metrics.update(
                seconds=seconds,
                steps=steps,
                tokens=steps * args.batch_size,
                nuclear_coefficient=lam,
            )
            seed_out["runs"][spec.name] = metrics
            print(
                f"  seed {seed} {spec.name:>22}: R²={metrics['r2']:.4f}  ({seconds:.0f}s)",
                flush=True,
            )
        per_seed.append(seed_out)
    return {
        "mode": "real",
        "activations": str(args.activations),
        "n": n,
        "d_in": d_in,
        "per_seed": per_seed,
    }


def summarise_real(result: dict[str, Any]) -> dict[str, Any]:
    names = list(result["per_seed"][0]["runs"])
    summary = {}
    for name in names:
        runs = [s["runs"][name] for s in result["per_seed"]]
        summary[name] = {
            key: _mean_sd([r[key] for r in runs])
            for key in (
                "r2",
                "l0_columns",
                "dead_column_fraction",
                "mean_group_stable_rank",
                "mean_group_rank90",
                "tokens",
                "seconds",
            )
            if key in runs[0]
        }
    return summary


def markdown_real(
    summary: dict[str, Any], result: dict[str, Any], args: argparse.Namespace, wall: float
) -> str:
    lines = [
        "# SASA vs TopK on real activations",
        "",
        f"`{' '.join(sys.argv)}` — {result['n']} activations of d_in = {result['d_in']} from "
        f"`{result['activations']}`, wall time {wall:.0f} s, seeds {args.seeds}. d_sae = {args.d_sae}, "
        f"SASA r = {args.group_rank}, s = {args.n_active_groups}, TopK k = {args.group_rank * args.n_active_groups}. "
        "Inputs normalised to E‖x‖² = d_in during training (folded back for evaluation).",
        "",
        "| run | tokens | R² (held out) | L0 | dead columns | SASA stable rank | SASA rank90 |",
        "|---|---|---|---|---|---|---|",
    ]
    nan = (math.nan, 0.0)
    for name, e in summary.items():
        lines.append(
            f"| {name} | {e['tokens'][0]:.0f} | {_fmt(e['r2'], 4)} | {_fmt(e['l0_columns'], 1)} | "
            f"{_fmt(e['dead_column_fraction'])} | {_fmt(e.get('mean_group_stable_rank', nan))} | "
            f"{_fmt(e.get('mean_group_rank90', nan))} |"
        )
    return "\n".join(lines) + "\n"


def plot_real(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    names = list(summary)
    ax.bar(
        names,
        [summary[n]["r2"][0] for n in names],
        yerr=[summary[n]["r2"][1] for n in names],
        capsize=3,
    )
    ax.set_ylabel("held-out R²")
    ax.set_title("TopK vs SASA (full and reduced token budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.activations is not None:
        result = run_real(args)
        summary = summarise_real(result)
        wall = time.perf_counter() - t0
        md = markdown_real(summary, result, args, wall)
        plot_real(summary, args.out.with_suffix(".png"))
    else:
        result = run_synthetic(args)
        summary = summarise_synthetic(result, args)
        wall = time.perf_counter() - t0
        md = markdown_synthetic(summary, result, args, wall)
        plot_synthetic(summary, args, args.out.with_suffix(".png"))
    payload = {
        "command": sys.argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sae_ext_version": sae_ext.__version__,
        "torch": torch.__version__,
        "wall_seconds": wall,
        "summary": summary,
        "result": result,
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
