"""Are linear thresholds rate-limited by Adam? SA-GSAE and SAELens ``jumprelu`` at one token budget
and several batch sizes (so several step counts), under SPEC §8.

Adam moves a parameter by at most ~lr per step whatever the loss's scale, so a JumpReLU-style
threshold that starts near 0 can travel at most Σ_t lr_t (the "Adam reach") in a run. If the
thresholds end near that reach for every latent, the step count, not the sparsity coefficient,
sets L0 (RESULTS §0c). For each run this records held-out L0 and R², the thresholds' median and
p10/p90 (θ⁺ for SA-GSAE) and the reach of its lr schedule (warm-up 1 %, linear decay to lr/10 over
the last 20 %).

    python benchmarks/bench_threshold_steps.py          # resid_mid, 1 M tokens, batch 4096 / 1024 / 256

Reuses the captures of ``bench_convergence.py`` (``sae_ext_out/captures``); runs resume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from bench_convergence import captures, heldout_metrics  # same captures and held-out metrics
from sae_lens import SAE

import sae_ext  # noqa: F401  (registers the plugin architectures)
from sae_ext.capture import train_on_cache
from sae_ext.model_io import special_token_ids
from sae_ext.protocol import LR_DECAY_FRACTION, LR_WARM_UP_FRACTION, lr_schedule, total_steps
from sae_ext.saes.sign_aware_gated import SignAwareGatedTrainingSAEConfig
from sae_ext.testing import small_training_config

RESULTS = Path(__file__).parent / "results"
#: (line, architecture, d_sae, extra config); the knob is l0_coefficient for both.
LINES = [
    ("sign_aware_gated@H", "sign_aware_gated", 576, {}),
    ("jumprelu@2H θ₀ 0.3", "jumprelu", 1152, {"jumprelu_init_threshold": 0.3}),
]


def adam_reach(tokens: int, batch: int, lr: float) -> float:
    """Σ_t lr_t of a protocol run: the farthest Adam can move one parameter (≈ lr per step)."""
    steps = total_steps(tokens, batch)
    warm, decay = int(steps * LR_WARM_UP_FRACTION), int(steps * LR_DECAY_FRACTION)
    return lr * ((steps - warm - decay) + warm / 2 + decay * (1 + 0.1) / 2)


def thresholds(sae: SAE[Any]) -> torch.Tensor:
    name = "threshold_pos" if hasattr(sae, "threshold_pos") else "threshold"
    return getattr(sae, name).detach().float()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="blocks.15.hook_resid_mid")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 1024, 256])
    p.add_argument("--l0-coefficient", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captures", default="sae_ext_out/captures")
    p.add_argument("--runs", default="sae_ext_out/threshold_steps")
    args = p.parse_args(argv)
    # what bench_convergence.captures reads
    args.hooks, args.context_size, args.eval_tokens, args.storage_dtype = [args.hook], 128, 32_768, "float32"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train_caches, eval_caches, model = captures(args)
    x_eval = eval_caches[args.hook].kept_activations(special_token_ids(model))
    results = []
    for line, arch, d_sae, extra in LINES:
        for batch in args.batch_sizes:
            key = {"hook": args.hook, "line": line, "d_sae": d_sae, "l0_coefficient": args.l0_coefficient,
                   "tokens": args.tokens, "batch_size": batch, "lr": args.lr, "seed": args.seed, **extra}
            out = Path(args.runs) / f"{arch}_{batch}"
            done = out / "result.json"
            if done.exists() and json.loads(done.read_text())["key"] == key:
                results.append(json.loads(done.read_text()))
                continue
            cfg = small_training_config(arch, d_in=train_caches[args.hook].d_in, d_sae=d_sae,
                                        normalize_activations="expected_average_only_in",
                                        l0_coefficient=args.l0_coefficient, **extra)
            t = time.perf_counter()
            train_on_cache(cfg, train_caches[args.hook], model, None, out, training_tokens=args.tokens,
                           train_batch_size_tokens=batch, lr=args.lr, seed=args.seed,
                           **lr_schedule(args.tokens, batch))
            sae = SAE.load_from_disk(out)
            theta = thresholds(sae)
            res = {"key": key, **heldout_metrics(sae, x_eval), "steps": total_steps(args.tokens, batch),
                   "adam_reach": adam_reach(args.tokens, batch, args.lr),
                   "theta_median": float(theta.median()), "theta_p10": float(theta.quantile(0.1)),
                   "theta_p90": float(theta.quantile(0.9)), "train_seconds": time.perf_counter() - t}
            done.write_text(json.dumps(res, indent=2))
            results.append(res)
            write_report(results)
    write_report(results)


def write_report(results: list[dict[str, Any]]) -> None:
    (RESULTS / "threshold_steps.json").write_text(json.dumps(results, indent=2))
    md = ["# Linear thresholds under Adam: L0 against the step count at one token budget", "",
          "SPEC §8 runs on SmolLM2 (special tokens out, dead window 10 %, warm-up/decay), one seed; held-out",
          "L0 / R² on 32k non-special tokens. **reach** = Σ lr_t, the farthest Adam moves one parameter.",
          "Reproduce: `python benchmarks/bench_threshold_steps.py`.", "",
          "| line | λ₀ | tokens | batch | steps | L0 | R² | θ median (p10–p90) | reach | (θ − θ₀) / reach |",
          "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        k = r["key"]
        theta0 = k.get("jumprelu_init_threshold", SignAwareGatedTrainingSAEConfig.initial_threshold)
        md.append(f"| {k['line']} | {k['l0_coefficient']:g} | {k['tokens']:,} | {k['batch_size']} | {r['steps']} | "
                  f"{r['l0']:.1f} | {r['r2']:.4f} | {r['theta_median']:.3f} ({r['theta_p10']:.3f}–"
                  f"{r['theta_p90']:.3f}) | {r['adam_reach']:.3f} | {(r['theta_median'] - theta0) / r['adam_reach']:.2f} |")
    (RESULTS / "threshold_steps.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
