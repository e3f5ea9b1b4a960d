"""Per-token error-norm predictability across SAEs (SPEC §4, Engels et al.): regress ‖e_j‖ on
[‖e_i‖, 1] for every ordered pair of SAEs trained on the same hook.

Reads the SAEs a ``bench_smollm2.py`` run saved (``RUN/HOOK/seedN/saes/*``), runs SmolLM2 on
held-out tokens of the embedded text (special tokens excluded, as ``run_evals``), and writes
``benchmarks/results/TAG.{json,md}``.

    python benchmarks/bench_error_norms.py /tmp/runs/resid_post/blocks.15.hook_resid_post/seed0 \\
        --hook blocks.15.hook_resid_post --tokens 8192 --tag error_norms_resid_post
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sae_lens import SAE

from sae_ext.data import default_token_dataset
from sae_ext.metrics.dark_matter import error_norm_predictability, sae_error_norms
from sae_ext.model_io import iter_activations
from sae_ext.models import load_default_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a bench_smollm2 seed folder holding saes/")
    p.add_argument("--hook", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--tag", default="error_norms")
    args = p.parse_args()
    sae_dirs = sorted(d for d in (args.run / "saes").iterdir() if (d / "cfg.json").exists())
    if len(sae_dirs) < 2:
        raise SystemExit(f"need at least two SAEs under {args.run / 'saes'}, found {len(sae_dirs)}")
    model = load_default_model()
    ds = default_token_dataset(model.tokenizer, 128, n_tokens=args.tokens, split="eval")
    toks = torch.tensor(ds["input_ids"])
    with torch.no_grad():
        x = torch.cat(list(iter_activations(model, args.hook, toks)))  # special tokens dropped
        norms = {d.name: sae_error_norms(SAE.load_from_disk(d), x, progress=False) for d in sae_dirs}
    names = list(norms)
    r2 = {i: {j: error_norm_predictability(norms[i], norms[j]).r2 for j in names if j != i} for i in names}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"hook": args.hook, "n_tokens": int(x.shape[0]), "r2_j_from_i": r2, "args": {k: str(v) for k, v in vars(args).items()}},
        indent=2))
    md = [f"# ‖e_j‖ from [‖e_i‖, 1]: R² over {x.shape[0]:,} held-out tokens at `{args.hook}`", "",
          "| i \\ j | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    md += ["| " + i + " | " + " | ".join("–" if i == j else f"{r2[i][j]:.2f}" for j in names) + " |" for i in names]
    md += ["", f"Command: `python benchmarks/bench_error_norms.py {args.run} --hook {args.hook} "
               f"--tokens {args.tokens} --tag {args.tag}`"]
    (RESULTS / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
