"""Scaffolded SAEs vs their base architectures: dense latents and R² at matched L0 (SPEC §2).

Trains ``batchtopk`` / ``scaffold_batchtopk`` and ``matryoshka_batchtopk`` /
``scaffold_matryoshka_batchtopk`` with the same k (matched L0) on the same activation stream,
with SAELens's own ``SAETrainer``, then evaluates the *saved inference* SAE (JumpReLU with the
learned BatchTopK threshold) on held-out activations:

- dense latents: fire on > 10 % of held-out tokens (SAEBench ``freq_over_10_percent``),
- R² = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², L0, dead latents,
- scaffold runs: the scaffold's share of the reconstruction's variance, R² with
  ``hook_scaffold`` zeroed, and principal angles between the learned scaffold subspace and
  (synthetic) the true dense subspace / (always) the top-r PCA directions of the data,
- for every run: how much of the dense latents' decoder energy lies in that subspace.

Data: by default SPEC §6 synthetic data (``sae_ext.synthetic.lowrank``: sparse features plus a
dense rank-r Gaussian component of large variance). ``--activations path.pt`` uses a saved
tensor ``[N, d_in]`` of real activations instead (the last ``--eval-tokens`` rows are held out).

    python benchmarks/bench_scaffold.py              # full synthetic run, 3 seeds
    python benchmarks/bench_scaffold.py --quick      # ~1 minute smoke run
    python benchmarks/bench_scaffold.py --activations acts.pt --out benchmarks/results/scaffold_smollm2

Writes ``<out>.json`` (config, every run, summary), ``<out>.md`` (tables) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.config import LoggingConfig  # noqa: E402
from sae_lens.registry import get_sae_training_class  # noqa: E402

from sae_ext.metrics.dense import dense_count, dense_mask, firing_counts  # noqa: E402
from sae_ext.metrics.pca import pca_directions, principal_angles_degrees  # noqa: E402
from sae_ext.saes.scaffold import default_matryoshka_widths  # noqa: E402
from sae_ext.synthetic.lowrank import SparsePlusLowRank  # noqa: E402
from sae_ext.testing import fit_on_stream  # noqa: E402

PAIRS = [("batchtopk", "scaffold_batchtopk"), ("matryoshka_batchtopk", "scaffold_matryoshka_batchtopk")]
RANDOM_INIT = "scaffold_batchtopk[random-init]"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="~1 minute run: 1 seed, k=4 only, 600 steps, no random-init variant")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--activations", type=Path, default=None, help="tensor [N, d_in] saved with torch.save")
    p.add_argument("--out", type=Path, default=None, help="output prefix: writes <out>.json/.md/.png (default benchmarks/results/scaffold, "
                   "quick: benchmarks/results/scaffold_quick)")
    # synthetic data (SPEC §6)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--n-features", type=int, default=512)
    p.add_argument("--dense-rank", type=int, default=4)
    p.add_argument("--dense-std", type=float, default=2.0)
    # SAEs
    p.add_argument("--d-sae", type=int, default=None, help="default 4 * d_in")
    p.add_argument("--k", type=float, nargs="+", default=None,
                   help="BatchTopK k values (each the same for every architecture: matched L0); "
                   "default 4 8 (quick: 4)")
    p.add_argument("--scaffold-rank", type=int, default=None, help="default: dense rank (synthetic) or 24")
    p.add_argument("--no-random-init", action="store_true", help="skip the scaffold_init='random' variant")
    p.add_argument("--normalize", choices=["none", "expected_average_only_in"], default=None,
                   help="default: none (synthetic), expected_average_only_in (real activations)")
    # training
    p.add_argument("--steps", type=int, default=None,
                   help="default 800 (quick: 600); fewer leaves the BatchTopK threshold unconverged, "
                   "which shows as inference L0 far above k")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=None, help="default 16384 (quick: 8192)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.k is None:
        args.k = [4.0] if args.quick else [4.0, 8.0]
    if args.steps is None:
        args.steps = 600 if args.quick else 800
    if args.quick:
        args.no_random_init = True
    if args.eval_tokens is None:
        args.eval_tokens = 8192 if args.quick else 16384
    if args.out is None:
        args.out = RESULTS / ("scaffold_quick" if args.quick else "scaffold")
    for name in ("steps", "batch_size", "eval_tokens", "d_in", "n_features", "dense_rank", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if min(args.k) <= 0:
        p.error(f"--k values must be > 0; got {args.k}")
    return args


# --------------------------------------------------------------------------- data


class RealData:
    """Held-out split and a seeded random-batch stream over a saved activation tensor."""

    def __init__(self, path: Path, eval_tokens: int) -> None:
        acts = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(acts, torch.Tensor) or acts.dim() < 2:
            raise ValueError(f"{path} must hold a tensor [N, d_in]; got {type(acts).__name__}")
        acts = acts.reshape(-1, acts.shape[-1]).float()
        if acts.shape[0] < 2 * eval_tokens:
            raise ValueError(
                f"{path} has {acts.shape[0]} rows; need at least 2 * --eval-tokens = {2 * eval_tokens}"
            )
        self.train, self.eval = acts[:-eval_tokens], acts[-eval_tokens:]
        self.d_in = acts.shape[1]
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(self.train.shape[0], generator=g)[:65536]
        self.pca_sample = self.train[idx]  # reference for the top-r PCA directions
        self.dense_basis: torch.Tensor | None = None

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.train[torch.randint(0, self.train.shape[0], (batch_size,), generator=g)]


class SyntheticData:
    """SPEC §6 sparse + dense low-rank data; one generator (one ground truth) per seed."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.args, self.seed = args, seed
        self.d_in = args.d_in
        gen = self._gen()
        self.dense_basis = gen.dense_basis
        # held out: the same ground truth, a different sampling stream
        self.eval = self._gen(stream_seed=seed + 10_000).sample(args.eval_tokens).activations
        self.pca_sample = gen.sample(min(65536, 16 * args.batch_size)).activations  # top-r PCA reference

    def _kw(self) -> dict[str, Any]:
        a = self.args
        return {"d_in": a.d_in, "n_features": a.n_features, "dense_rank": a.dense_rank, "dense_std": a.dense_std}

    def _gen(self, stream_seed: int | None = None) -> SparsePlusLowRank:
        return SparsePlusLowRank(**self._kw(), seed=self.seed, stream_seed=stream_seed)

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        del seed  # the stream is fixed by the data seed, so every architecture sees the same batches
        return self._gen().batches(batch_size)


# --------------------------------------------------------------------------- training / eval


def make_sae(arch: str, args: argparse.Namespace, d_in: int, normalize: str, k: float):
    """A training SAE of ``arch``; matryoshka widths and k are shared across architectures."""
    base = arch.split("[")[0]
    cls, cfg_cls = get_sae_training_class(base)
    kw: dict[str, Any] = {"d_in": d_in, "d_sae": args.d_sae, "k": k, "normalize_activations": normalize,
                          "device": args.device}
    if "matryoshka" in base:
        kw["matryoshka_widths"] = default_matryoshka_widths(args.d_sae)
    if base.startswith("scaffold"):
        kw["scaffold_rank"] = args.scaffold_rank
        kw["scaffold_init"] = "random" if arch == RANDOM_INIT else "pca"
    return cls(cfg_cls(**kw))


def train(sae, data, args: argparse.Namespace, seed: int):
    return fit_on_stream(
        sae, data.batches(args.batch_size, seed), args.steps, args.batch_size, lr=args.lr,
        lr_warm_up_steps=min(100, args.steps // 10), device=args.device,
        dead_feature_window=max(100, args.steps // 10), feature_sampling_window=max(200, args.steps // 5),
        n_batches_for_norm_estimate=20, logger=LoggingConfig(log_to_wandb=False),
    )


def r2(x: torch.Tensor, y: torch.Tensor) -> float:
    return 1.0 - ((x - y).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@torch.no_grad()
def evaluate(trained, data, args: argparse.Namespace, arch: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of the saved-and-reloaded inference SAE on the held-out set; also its latents."""
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        sae = SAE.load_from_disk(tmp, device=args.device)
    x = data.eval.to(args.device)
    feats = torch.cat([sae.encode(c) for c in x.split(4096)])
    out = torch.cat([sae(c) for c in x.split(4096)])
    counts = firing_counts(feats)
    n = x.shape[0]
    dense = dense_mask(counts, n)
    row: dict[str, Any] = {
        "r2": r2(x, out),
        "l0": (feats > 0).float().sum(-1).mean().item(),
        "dense_latents": dense_count(counts, n),
        "dead_latents": int((counts == 0).sum()),
    }
    r = args.scaffold_rank
    pca = pca_directions(data.pca_sample, r)
    reference = data.dense_basis if data.dense_basis is not None else pca
    # energy of the dense latents' decoder directions inside the dense (or top-PCA) subspace
    w = sae.W_dec[dense].cpu()
    if w.shape[0]:
        w = w / w.norm(dim=-1, keepdim=True)
        row["dense_latent_energy_in_subspace"] = (w @ reference).pow(2).sum(-1).mean().item()
    else:
        row["dense_latent_energy_in_subspace"] = None
    if arch.startswith("scaffold"):
        s = torch.cat([sae.scaffold(c) for c in x.split(4096)])
        recon = out
        row["scaffold_variance_share"] = ((s - s.mean(0)).pow(2).sum() / (recon - recon.mean(0)).pow(2).sum()).item()
        with sae.hooks(fwd_hooks=[("hook_scaffold", lambda t, hook: torch.zeros_like(t))]):
            out_abl = torch.cat([sae(c) for c in x.split(4096)])
        row["r2_scaffold_zeroed"] = r2(x, out_abl)
        basis = sae.scaffold_subspace().cpu()
        ang_pca = principal_angles_degrees(basis, pca)
        row["angle_to_top_pca_max_deg"] = ang_pca.max().item()
        row["angle_to_top_pca_mean_deg"] = ang_pca.mean().item()
        if data.dense_basis is not None:
            ang = principal_angles_degrees(basis, data.dense_basis)
            row["angle_to_true_dense_max_deg"] = ang.max().item()
            row["angle_to_true_dense_mean_deg"] = ang.mean().item()
    return row, feats.cpu()


# --------------------------------------------------------------------------- report


def mean_sd(values: list[Any]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _key(arch: str, k: float) -> str:
    return f"{arch} @ k={k:g}"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds of every metric, per (architecture, k); dense-latent reductions."""
    summary: dict[str, Any] = {}
    metrics = sorted({m for r in runs for m, v in r.items() if isinstance(v, (int, float)) and m not in ("seed", "k")})
    groups = sorted({(r["arch"], r["k"]) for r in runs}, key=lambda ak: (ak[1], _order(ak[0])))
    for arch, k in groups:
        rows = [r for r in runs if r["arch"] == arch and r["k"] == k]
        summary[_key(arch, k)] = {
            m: mean_sd([r.get(m) for r in rows]) for m in metrics if any(r.get(m) is not None for r in rows)
        }
    reductions: dict[str, Any] = {}
    for base, scaf in PAIRS:
        for variant in (scaf, RANDOM_INIT if scaf == "scaffold_batchtopk" else None):
            for k in sorted({r["k"] for r in runs}):
                per_seed = []
                for rb in (r for r in runs if r["arch"] == base and r["k"] == k):
                    rs = next((r for r in runs if r["arch"] == variant and r["k"] == k and r["seed"] == rb["seed"]), None)
                    if rs is not None and rb["dense_latents"] > 0:
                        per_seed.append(1 - rs["dense_latents"] / rb["dense_latents"])
                if per_seed:
                    reductions[f"{variant} vs {base} @ k={k:g}"] = mean_sd(per_seed)
    summary["dense_latent_reduction"] = reductions
    return summary


def _order(arch: str) -> int:
    names = [a for pair in PAIRS for a in pair] + [RANDOM_INIT]
    return names.index(arch) if arch in names else len(names)


def fmt(ms: Any, digits: int = 3, pct: bool = False) -> str:
    if ms is None or math.isnan(ms[0]):
        return "–"
    m, s = ms
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f} %"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    cfg, summary = result["config"], result["summary"]
    keys = [k for k in summary if k != "dense_latent_reduction"]
    lines = [
        "# Scaffolded SAEs: dense latents and R² at matched L0",
        "",
        f"Data: {result['data']}. SAEs: d_sae = {cfg['d_sae']}, the same k for every architecture "
        f"(k = {', '.join(f'{k:g}' for k in cfg['k'])}), scaffold rank {cfg['scaffold_rank']}; "
        f"{cfg['steps']} steps × {cfg['batch_size']} with SAELens's SAETrainer (lr {cfg['lr']}); "
        f"seeds {cfg['seeds']} (mean ± sd). Evaluated on {cfg['eval_tokens']} held-out tokens with "
        "the saved inference SAE (JumpReLU with the learned BatchTopK threshold). Dense latent = "
        "fires on > 10 % of held-out tokens. 'Energy in subspace' = mean squared norm of the dense "
        "latents' unit decoder rows inside the true dense subspace (real data: the top-r PCA "
        "subspace).",
        "",
        "| architecture @ k | dense latents | R² | L0 (inference) | dead | dense latents' energy in subspace |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in keys:
        s = summary[key]
        lines.append(
            f"| {key} | {fmt(s.get('dense_latents'), 1)} | {fmt(s.get('r2'), 4)} | {fmt(s.get('l0'), 2)} | "
            f"{fmt(s.get('dead_latents'), 1)} | {fmt(s.get('dense_latent_energy_in_subspace'), 2)} |"
        )
    off = [r for r in result["runs"] if abs(r["l0"] / r["k"] - 1) > 0.25]
    if off:
        which = ", ".join(f"{r['arch']} k={r['k']:g} seed {r['seed']}: L0 {r['l0']:.1f}" for r in off)
        lines += ["", f"**Warning**: {len(off)} run(s) have an inference L0 more than 25 % away from k "
                  f"({which}): the BatchTopK threshold has not converged, so L0 is not matched; "
                  "train longer (--steps)."]
    lines += ["", "Dense-latent reduction (per seed: 1 − scaffold / base, then mean ± sd):", ""]
    for k, v in summary["dense_latent_reduction"].items():
        lines.append(f"- {k}: {fmt(tuple(v), pct=True)}")
    scaf = [k for k in keys if k.startswith("scaffold")]
    if scaf:
        lines += [
            "",
            "| scaffold architecture @ k | scaffold variance share | R² with hook_scaffold zeroed | "
            "max / mean principal angle to true dense subspace (°) | max / mean angle to top-r PCA (°) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for key in scaf:
            s = summary[key]
            lines.append(
                f"| {key} | {fmt(s.get('scaffold_variance_share'))} | {fmt(s.get('r2_scaffold_zeroed'))} | "
                f"{fmt(s.get('angle_to_true_dense_max_deg'), 2)} / {fmt(s.get('angle_to_true_dense_mean_deg'), 2)} | "
                f"{fmt(s.get('angle_to_top_pca_max_deg'), 2)} / {fmt(s.get('angle_to_top_pca_mean_deg'), 2)} |"
            )
    lines += ["", f"Command: `{result['command']}`. Wall time: {result['wall_s']:.0f} s on {result['machine']}.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    keys = [k for k in summary if k != "dense_latent_reduction"]
    colors = ["#1f77b4" if k.startswith("scaffold") else "#999999" for k in keys]
    labels = [k.replace("matryoshka_batchtopk", "matryoshka") for k in keys]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6))
    for ax, metric, title in ((axes[0], "dense_latents", "dense latents (> 10 % of tokens)"), (axes[1], "r2", "R²")):
        m = [summary[k][metric][0] for k in keys]
        sd = [summary[k][metric][1] for k in keys]
        ax.bar(range(len(keys)), m, yerr=sd, color=colors, capsize=3)
        ax.set_xticks(range(len(keys)), labels, fontsize=7, rotation=40, ha="right")
        ax.set_title(title)
        if metric == "r2":
            lo = min(mi - si for mi, si in zip(m, sd))
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax = axes[2]
    for key, rates in result["firing_rates_first_seed"].items():
        r = torch.tensor(rates).clamp(min=1e-5)
        ax.hist(torch.log10(r).numpy(), bins=40, histtype="step", label=key)
    ax.axvline(-1, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("log10 firing rate (first seed; dead latents at -5); dashed: 10 %")
    ax.set_title("latent firing rates")
    ax.legend(fontsize=6)
    fig.suptitle(f"Scaffolded SAEs at matched k — {result['data']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    real = RealData(args.activations, args.eval_tokens) if args.activations is not None else None
    d_in = real.d_in if real is not None else args.d_in
    if args.d_sae is None:
        args.d_sae = 4 * d_in
    if args.scaffold_rank is None:
        args.scaffold_rank = args.dense_rank if real is None else min(24, d_in - 1)
    if not 1 <= args.scaffold_rank < d_in:
        raise SystemExit(f"--scaffold-rank must be in [1, {d_in - 1}]; got {args.scaffold_rank}")
    normalize = args.normalize or ("none" if real is None else "expected_average_only_in")
    archs = [a for pair in PAIRS for a in pair]
    plan = [(arch, k) for k in args.k for arch in archs]
    if not args.no_random_init:
        plan.append((RANDOM_INIT, args.k[0]))  # the init ablation at the first k only

    runs: list[dict[str, Any]] = []
    rates: dict[str, list[float]] = {}
    for seed in args.seeds:
        data = real if real is not None else SyntheticData(args, seed)
        for arch, k in plan:
            t = time.time()
            torch.manual_seed(seed)
            sae = train(make_sae(arch, args, d_in, normalize, k), data, args, seed)
            row, feats = evaluate(sae, data, args, arch)
            row = {"arch": arch, "k": k, "seed": seed, **row, "train_eval_s": time.time() - t}
            runs.append(row)
            if seed == args.seeds[0] and k == args.k[0]:
                rates[_key(arch, k)] = (firing_counts(feats) / feats.shape[0]).tolist()
            print(json.dumps({m: (round(v, 4) if isinstance(v, float) else v) for m, v in row.items()}), flush=True)

    config = {m: (str(v) if isinstance(v, Path) else v) for m, v in vars(args).items()}
    config["normalize"] = normalize
    if real is not None:
        data_desc = f"real activations {args.activations} (d_in {d_in})"
    else:
        probe = SparsePlusLowRank(args.d_in, args.n_features, args.dense_rank, args.dense_std, orthogonalize=False)
        data_desc = (
            f"synthetic sparse + dense low-rank (d_in {args.d_in}, {args.n_features} sparse features with "
            f"expected L0 {float(probe.firing_probabilities.sum()):.2f}, dense rank {args.dense_rank}, dense std "
            f"{args.dense_std} per direction, i.e. dense variance {probe.dense_variance():.1f})"
        )
    result = {
        "data": data_desc,
        "config": config,
        "runs": runs,
        "summary": summarise(runs),
        "firing_rates_first_seed": rates,
        "wall_s": time.time() - t0,
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), device {args.device}",
        "command": " ".join(["python benchmarks/bench_scaffold.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
