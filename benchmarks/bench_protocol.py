"""SPEC §8 before and after: the same SAELens baselines trained under the v1 pipeline and under
the protocol, at the same budget, on the same capture, evaluated the same way.

- **v1**: special tokens (BOS) in training and in the norm estimate, SAELens's dead-feature window
  of 1,000 steps (AuxK never acts in a short run), constant learning rate.
- **protocol**: special tokens out, dead window 10 % of the steps, SAELens warm-up (1 %) and
  linear decay to lr/10 (last 20 %) — :mod:`sae_ext.protocol`'s defaults.
- **protocol, float16**: the protocol on the capture stored as float16 (issue #15 item 3: storage
  is acceptable if R² moves by ≤ 0.001).

Both are fed from memory to SAELens's ``SAETrainer`` (``train_on_cache``). Evaluation: SAELens
``run_evals`` through :func:`sae_ext.evaluate.evaluate_sae` (explained variance, CE loss recovered,
L0; special positions never spliced) on held-out text, dead / dense fractions, and held-out R² on
32k non-special eval tokens (as ``benchmarks/results/convergence.md``).

    python benchmarks/bench_protocol.py --archs topk batchtopk gated --pipelines v1 protocol
    python benchmarks/bench_protocol.py --archs topk --pipelines "protocol, float16"

Runs resume (a finished run with the same arguments is reused).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench_convergence import KNOBS, sae_config  # same SAE settings as the convergence table
from sae_lens import SAE
from tqdm.auto import tqdm

import sae_ext  # noqa: F401
from sae_ext.capture import ActivationCache, convert_capture, train_on_cache
from sae_ext.convergence import heldout_r2
from sae_ext.model_io import special_token_ids
from sae_ext.perf import retain_freed_memory

RESULTS = Path(__file__).parent / "results"
HOOK = "blocks.15.hook_mlp_out"
#: How each pipeline trains: train_on_cache keyword arguments (and which capture).
PIPELINES: dict[str, dict[str, Any]] = {
    "v1": {"exclude_special_tokens": False, "dead_feature_window": 1000, "lr_schedule": False},
    "protocol": {},
    "protocol, float16": {},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1-coefficient", type=float, default=10.0, help="gated λ (normalised inputs)")
    p.add_argument("--target-l0", type=float, default=32.0, help="jumprelu target L0 (quadratic L0 loss)")
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    p.add_argument("--tokens", type=int, default=250_000)
    p.add_argument("--d-sae", type=int, default=1152)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for run_evals (CE; the demo's)")
    p.add_argument("--captures", default="sae_ext_out/captures", help="bench_convergence.py's captures")
    p.add_argument("--runs", default="sae_ext_out/protocol_before_after")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from sae_ext.data import default_token_dataset
    from sae_ext.evaluate import evaluate_sae
    from sae_ext.models import load_default_model

    args = parse_args(argv)
    retain_freed_memory()
    model = load_default_model()
    base = Path(args.captures)
    train = ActivationCache.load(base / "train_128", HOOK)  # made by bench_convergence.py
    f16_path = base / "train_128_mlp_out_float16"
    train16 = ActivationCache.load(f16_path, HOOK) if f16_path.exists() else convert_capture(train, f16_path, "float16")
    ev = ActivationCache.load(base / "eval_128", HOOK)
    special = special_token_ids(model)
    x_eval = ev.kept_activations(special)
    eval_rows = default_token_dataset(model.tokenizer, 128, n_tokens=args.eval_tokens, split="eval")
    stored = RESULTS / "protocol_before_after.json"
    results: list[dict[str, Any]] = json.loads(stored.read_text()) if stored.exists() else []
    grid = [(a, p) for a in args.archs for p in args.pipelines]
    for arch, pipe in tqdm(grid, desc="before/after runs"):
        cfg, knob, value = sae_config(arch, 576, args)  # the convergence table's settings
        key = {"arch": arch, "pipeline": pipe, "knob": knob, "value": value, "tokens": args.tokens,
               "eval_tokens": args.eval_tokens,
               "d_sae": args.d_sae, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
        out = Path(args.runs) / arch / pipe.replace(", ", "_")
        done = out / "result.json"
        results = [r for r in results if (r["args"]["arch"], r["args"]["pipeline"]) != (arch, pipe)]
        if done.exists() and json.loads(done.read_text())["args"] == key:
            results.append(json.loads(done.read_text()))
            continue
        t = time.perf_counter()
        train_on_cache(cfg, train16 if "float16" in pipe else train, model, None, out, training_tokens=args.tokens,
                       train_batch_size_tokens=args.batch_size, lr=args.lr, seed=args.seed, **PIPELINES[pipe])
        seconds = time.perf_counter() - t
        sae = SAE.load_from_disk(out)
        res = evaluate_sae(sae, model, eval_rows, n_tokens=args.eval_tokens, splices=False, progress=False)
        rec = {
            "args": key,
            "r2": heldout_r2(sae, x_eval),
            "explained_variance": res.run_evals.explained_variance,
            "ce_loss_recovered": res.run_evals.ce_loss_score,
            "l0": res.run_evals.l0,
            "dead_fraction": res.dictionary.dead_fraction,
            "dense_fraction": res.dictionary.dense_fraction,
            "train_seconds": seconds,
        }
        done.write_text(json.dumps(rec, indent=2))
        results.append(rec)
        write_report(results, args)


def write_report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "protocol_before_after.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# SPEC §8 before/after: SAELens baselines under the v1 pipeline and under the protocol",
        "",
        f"SmolLM2-135M `{HOOK}`, d_sae {args.d_sae}, {args.tokens:,} training tokens from the 704,640-token train",
        f"capture, batch {args.batch_size}, Adam {args.lr}, seed {args.seed}. **v1**: BOS in training and the norm estimate,",
        "dead window 1,000 steps, constant lr. **protocol**: special tokens out, dead window 10 % of the steps,",
        "warm-up 1 % + linear decay to lr/10 over the last 20 %. **float16**: the protocol on a float16 copy of the capture.",
        "Both train with SAELens's `SAETrainer` fed from memory. `R²` is held-out explained variance on 32k",
        f"non-special eval tokens; `run_evals` (EV, CE loss recovered, L0) on {args.eval_tokens:,} held-out tokens with",
        "special positions unspliced (one convention for every row). Reproduce: `python benchmarks/bench_protocol.py`.",
        "",
        "| arch | pipeline | R² | run_evals EV | CE loss rec. | L0 | dead | dense | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        a = r["args"]
        lines.append(
            f"| {a['arch']} ({a['knob']} {a['value']}) | {a['pipeline']} | {r['r2']:.4f} | {r['explained_variance']:.3f} | "
            f"{r['ce_loss_recovered']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | {r['dense_fraction']:.3f} | "
            f"{r['train_seconds']:.0f} |"
        )
    (RESULTS / "protocol_before_after.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
