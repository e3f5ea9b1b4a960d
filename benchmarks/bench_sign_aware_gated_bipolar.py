"""Where SA-GSAE's bipolar latents sit on real activations (issue 16 item 3, SPEC §1 and §8).

Reads the SA-GSAE runs of the issue-16 sweeps (``benchmarks/sweeps/sign_aware_gated_<hook>.toml``,
trained by ``sae-ext sweep``), encodes each hook's held-out activations (special tokens out, SPEC
§8) and reports, per run: the bipolar fraction of the alive latents (each sign on ≥ 5 % of a
latent's firings), the same within firing-frequency deciles (most frequent first) and the share of
the bipolar latents that are among the 10 % most frequent latents. For the run nearest ``--example-l0``
at the first hook it prints one bipolar latent's top positive and top negative contexts, the
example of the SA-GSAE tutorial.

    sae-ext sweep --config benchmarks/sweeps/sign_aware_gated_resid_mid.toml --only sign_aware_gated@H
    python benchmarks/bench_sign_aware_gated_bipolar.py   # -> results/sign_aware_gated_bipolar.{md,json}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from bench_massive_tokens import FACTOR, massive_mask
from sae_lens import SAE
from tqdm.auto import tqdm

import sae_ext  # noqa: F401  (registers the plugin architectures)
from sae_ext.capture import ActivationCache
from sae_ext.eval_report import fmt
from sae_ext.metrics.sign import (
    MIN_SIGN_SHARE,
    accumulate_sign_counts,
    bipolar_fraction,
    bipolar_fraction_by_frequency,
    bipolar_mask,
)
from sae_ext.model_io import special_token_ids

RESULTS = Path(__file__).parent / "results"
HOOKS = ("resid_mid", "mlp_out", "attn_out")
N_BINS = 10
CONTEXT = 10  # tokens shown before the firing position
MAX_EXAMPLE_RATE = 0.05  # the example latent fires on fewer tokens than this (dense latents are hard to read)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    p.add_argument("--line", default="sign_aware_gated@H", help="the sweep line to read")
    p.add_argument("--out", default="sae_ext_out/sweeps", help="the sweeps' --out folder")
    p.add_argument("--example-l0", type=float, default=32.0)
    p.add_argument("--top", type=int, default=5, help="contexts per sign in the example")
    p.add_argument("--tag", default="sign_aware_gated_bipolar")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    return args


def eval_capture(root: Path, hook: str) -> ActivationCache:
    """The first held-out capture under ``root/captures/eval`` that holds ``hook``."""
    for folder in sorted(p for p in (root / "captures" / "eval").glob("*") if p.is_dir()):
        try:
            return ActivationCache.load(folder, hook)
        except (FileNotFoundError, ValueError):
            continue
    raise FileNotFoundError(f"no held-out capture of {hook} under {root / 'captures' / 'eval'}; run the sweep first")


def runs_of(root: Path, grid: str, line: str) -> list[tuple[dict[str, Any], Path]]:
    """(record, run folder) of every finished run of ``line`` in the sweep ``grid``, by knob value."""
    found = []
    for rec_path in (root / grid / "runs").glob("*/record.json"):
        rec = json.loads(rec_path.read_text())["record"]
        if rec["line"] == line:
            found.append((rec, rec_path.parent))
    return sorted(found, key=lambda t: t[0]["value"])


@torch.no_grad()
def encode(sae: SAE, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([sae.encode(x[i : i + batch]) for i in range(0, len(x), batch)])


def bipolar_stats(acts: torch.Tensor) -> dict[str, Any]:
    """The item-3 statistics of one run's held-out codes ``[n_tokens, d_sae]``."""
    pos, neg = accumulate_sign_counts(acts)
    total = pos + neg
    alive = total > 0
    bip = bipolar_mask(pos, neg)
    by_bin = bipolar_fraction_by_frequency(pos, neg, n_bins=N_BINS)
    top = torch.argsort(total, descending=True)[: max(1, round(int(alive.sum()) / N_BINS))]
    return {
        "alive": int(alive.sum()),
        "bipolar": int(bip.sum()),
        "bipolar_fraction": float(bipolar_fraction(pos, neg)),
        "bipolar_fraction_by_decile": [round(float(v), 4) for v in by_bin],
        "share_of_bipolar_in_top_decile": float(bip[top].sum() / bip.sum()) if bip.any() else float("nan"),
        "mean_frequency_bipolar": float(total[bip].double().mean() / len(acts)) if bip.any() else float("nan"),
        "mean_frequency_one_sided": float(total[alive & ~bip].double().mean() / len(acts)) if (alive & ~bip).any()
        else float("nan"),
    }


def example_contexts(acts: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, context: int, tokenizer: Any,
                     top: int) -> dict[str, Any]:
    """A balanced, frequent but not dense bipolar latent and its top ``top`` contexts of each sign.

    ``acts`` holds the codes of the positions where ``keep`` is True, without the massive-norm tokens
    (``bench_massive_tokens.py``), whose codes are hundreds of times larger than any other's.
    """
    pos, neg = accumulate_sign_counts(acts)
    total = pos + neg
    rate = total.double() / len(acts)
    bip = bipolar_mask(pos, neg) & (rate < MAX_EXAMPLE_RATE)
    balance = torch.minimum(pos, neg).double() / total.clamp(min=1)
    score = torch.where(bip, rate.sqrt() * balance, torch.tensor(-1.0, dtype=torch.float64))
    latent = int(score.argmax())
    positions = torch.nonzero(keep).flatten()  # row of `acts` → position in the capture
    v = acts[:, latent]

    def shown(order: torch.Tensor) -> list[dict[str, Any]]:
        rows = []
        for i in order[:top].tolist():
            p = int(positions[i])
            start = p - p % context
            before = tokenizer.decode(ids[max(start, p - CONTEXT) : p].tolist())
            rows.append({"activation": round(float(v[i]), 3), "before": before,
                         "token": tokenizer.decode([int(ids[p])])})
        return rows

    return {"latent": latent, "positive_firings": int(pos[latent]), "negative_firings": int(neg[latent]),
            "top_positive": shown(torch.argsort(v, descending=True)),
            "top_negative": shown(torch.argsort(v))}


def write_report(results: dict[str, Any], tag: str) -> None:
    (RESULTS / f"{tag}.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# SA-GSAE bipolar latents on SmolLM2 (issue 16 item 3)", "",
        "`python benchmarks/bench_sign_aware_gated_bipolar.py` on the SA-GSAE@H runs of the issue-16 sweeps",
        f"(`benchmarks/sweeps/sign_aware_gated_<hook>.toml`). Held-out tokens, special tokens out (SPEC §8). "
        f"Bipolar: alive, each sign on ≥ {MIN_SIGN_SHARE:.0%} of the latent's firings. Deciles: the alive "
        "latents by firing frequency, most frequent first.", "",
        "| hook | λ₀ | L0 | R² | conv. | alive | bipolar fraction | by frequency decile (1st … 10th) | "
        "bipolar in top decile | mean freq. bipolar / one-sided |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for hook, rows in results["hooks"].items():
        for r in rows:
            s = r["stats"]
            deciles = " ".join(f"{v:.2f}" for v in s["bipolar_fraction_by_decile"])
            lines.append(
                f"| {hook} | {fmt(r['value'])} | {fmt(r['l0'])} | {fmt(r['r2'])} | {r['converged']} | {s['alive']} | "
                f"{fmt(s['bipolar_fraction'])} | {deciles} | {fmt(s['share_of_bipolar_in_top_decile'])} | "
                f"{fmt(s['mean_frequency_bipolar'])} / {fmt(s['mean_frequency_one_sided'])} |"
            )
    ex = results.get("example")
    if ex:
        lines += ["", f"## Example: latent {ex['latent']} at `{ex['hook']}` (λ₀ {fmt(ex['value'])}, L0 {fmt(ex['l0'])})",
                  "", f"Fires {ex['positive_firings']} times positive and {ex['negative_firings']} times negative "
                  "on the held-out tokens. The firing token is in **bold**, after up to "
                  f"{CONTEXT} tokens of its context; the few non-special tokens with attention-sink norms "
                  "(`massive_tokens.md`) are left out of this example.", ""]
        for sign in ("positive", "negative"):
            lines += [f"Top {sign}:", ""]
            lines += [f"- {c['activation']:+.3f}: `{c['before'][-60:]!r}` **{c['token']!r}**" for c in ex[f"top_{sign}"]]
            lines.append("")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from sae_ext.models import load_default_model

    model = load_default_model()
    special = list(special_token_ids(model))
    root = Path(args.out)
    results: dict[str, Any] = {"line": args.line, "hooks": {}, "args": vars(args)}
    best: tuple[float, Any] | None = None
    for hook_kind in args.hooks:
        hook = f"blocks.15.hook_{hook_kind}"
        runs = runs_of(root, f"sign_aware_gated_{hook_kind}", args.line)
        if not runs:
            print(f"{hook}: no finished {args.line} runs; skipped")
            continue
        cache = eval_capture(root, hook)
        ids = cache.token_ids()
        keep = ~torch.isin(ids, torch.tensor(special))
        x = cache.activations()[keep]
        typical = ~massive_mask(x, FACTOR)  # statistics keep them (SPEC §8); the example does not
        rows = []
        for rec, d in tqdm(runs, desc=hook):
            acts = encode(SAE.load_from_disk(str(d)), x)
            rows.append({k: rec[k] for k in ("value", "l0", "r2", "converged")} | {"stats": bipolar_stats(acts)})
            gap = abs(torch.log(torch.tensor(rec["l0"] / args.example_l0)).item())
            if hook_kind == args.hooks[0] and (best is None or gap < best[0]):
                shown_keep = keep.clone()
                shown_keep[keep] = typical
                best = (gap, (rec, acts[typical], ids, shown_keep, cache.context_size, hook))
        results["hooks"][hook_kind] = rows
    if best is not None:
        rec, acts, ids, keep, ctx, hook = best[1]
        ex = example_contexts(acts, ids, keep, ctx, model.tokenizer, args.top)
        results["example"] = {"hook": hook, "value": rec["value"], "l0": rec["l0"], **ex}
    write_report(results, args.tag)
    print((RESULTS / f"{args.tag}.md").read_text())


if __name__ == "__main__":
    main()
