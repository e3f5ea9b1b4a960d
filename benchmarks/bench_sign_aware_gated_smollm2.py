"""SA-GSAE ablations on real activations (SPEC §1): the auxiliary term (α = 0, the paper's
"no auxiliary → collapse") and tied vs untied radii, on SmolLM2-135M at one hook.

Trains ``sign_aware_gated``@H three ways per seed (default; ``aux_coefficient=0``;
``tie_radii=False``) on one stored capture through SAELens's runner, at the demo's settings,
evaluates each with :func:`sae_ext.evaluate.evaluate_sae` (no splice extras) and writes
``benchmarks/results/TAG.{json,md}`` with mean ± sd over seeds.

    python benchmarks/bench_sign_aware_gated_smollm2.py --activations-dir /tmp/runs/grid/activations
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sae_lens import SAE

from sae_ext.bench import format_mean_sd, mean_sd
from sae_ext.capture import capture_activations, hook_width, train_on_cache
from sae_ext.data import default_token_dataset
from sae_ext.demo import capture_dir
from sae_ext.evaluate import evaluate_sae
from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model
from sae_ext.perf import retain_freed_memory
from sae_ext.saes.sign_aware_gated import SignAwareGatedTrainingSAEConfig

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    "default (α 1, tied)": {},
    "α = 0 (no auxiliary)": {"aux_coefficient": 0.0},
    "untied radii": {"tie_radii": False},
}
METRICS = ["l0", "explained_variance", "dead_fraction", "bipolar_fraction", "ce_loss_recovered"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hook", default="blocks.15.hook_mlp_out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tokens", type=int, default=150_000)
    p.add_argument("--capture-tokens", type=int, default=60_000)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--l0-coefficient", type=float, default=1.0, help="λ₀ (SA-GSAE v2's L0 coefficient)")
    p.add_argument("--activations-dir", type=Path, default=Path("sae_ext_out/activations"))
    p.add_argument("--out", type=Path, default=Path("sae_ext_out/bench_sign_aware_gated_smollm2"))
    p.add_argument("--tag", default="sign_aware_gated_smollm2")
    args = p.parse_args()
    retain_freed_memory()
    t0 = time.perf_counter()
    model = load_default_model()
    d_in = hook_width(model, args.hook)
    train_ds = default_token_dataset(model.tokenizer, 128, n_tokens=args.capture_tokens, split="train")
    eval_ds = default_token_dataset(model.tokenizer, 128, n_tokens=args.eval_tokens, split="eval")
    cache = capture_activations(
        model, train_ds, args.hook,
        capture_dir(args.activations_dir, args.hook, 128, len(train_ds)),
        n_tokens=len(train_ds) * 128, model_name=DEFAULT_MODEL_NAME,
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for name, kw in VARIANTS.items():
            cfg = SignAwareGatedTrainingSAEConfig(
                d_in=d_in, d_sae=args.width, l0_coefficient=args.l0_coefficient,
                normalize_activations="expected_average_only_in", **kw,
            )
            sae_dir = args.out / args.hook / f"seed{seed}" / name.split(" ")[0].replace("=", "").replace("α", "alpha")
            train_on_cache(cfg, cache, model, train_ds, sae_dir, training_tokens=args.tokens,
                           train_batch_size_tokens=1024, lr=1e-3, seed=seed)
            res = evaluate_sae(SAE.load_from_disk(sae_dir), model, eval_ds, n_tokens=len(eval_ds) * 128,
                               splices=False, progress=False)
            ev, dic = res.run_evals, res.dictionary
            runs.setdefault(name, []).append({
                "seed": seed, "l0": ev.l0, "explained_variance": ev.explained_variance,
                "dead_fraction": dic.dead_fraction, "bipolar_fraction": dic.bipolar_fraction,
                "ce_loss_recovered": ev.ce_loss_score,
            })
    summary = {
        name: {m: mean_sd(r[m] for r in rs) for m in METRICS}
        for name, rs in runs.items()
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary,
         "wall_seconds": time.perf_counter() - t0}, indent=2))
    md = [f"# SA-GSAE@H ablations on SmolLM2-135M `{args.hook}` (seeds {args.seeds}, λ₀ {args.l0_coefficient}, "
          f"{args.tokens:,} tokens)", "", "| variant | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    md += ["| " + name + " | " + " | ".join(format_mean_sd(*st[k]) for k in METRICS) + " |"
           for name, st in summary.items()]
    md += ["", f"Wall time {time.perf_counter() - t0:.0f} s. Command: `python benchmarks/bench_sign_aware_gated_smollm2.py "
               f"--hook {args.hook} --seeds {' '.join(map(str, args.seeds))} --tokens {args.tokens} "
               f"--eval-tokens {args.eval_tokens} --l0-coefficient {args.l0_coefficient}`"]
    (RESULTS / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
