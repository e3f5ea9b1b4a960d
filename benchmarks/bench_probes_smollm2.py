"""Absorption and sparse probing of a finished sweep's SAEs on SmolLM2 (issue 23 item 4).

Reads a grid's report (``benchmarks/results/sweeps/<grid>.json``, written by ``sae-ext sweep``) and
its saved SAEs (``--out/<grid>/runs/``), runs the model once at the grid's hook for the probe data
(:func:`sae_ext.metrics.probing.probe_data`: the Python-docs sections and the spelling words), then
scores every converged SAE with :func:`sae_ext.metrics.probing.probe_metrics_of`: first-letter
absorption (mean absorption fraction, full-absorption rate, split features), k-sparse probing
accuracy (k 1, 2, 5, 20) against the dense probe, and for scaffolded SAEs the topic test (section
accuracy with the scaffold removed vs the most topic-aligned sparse latents ablated).

Each architecture is then read against its comparison architecture at matched L0 (its curve
interpolated in log L0 to the run's L0, and its run of the same active columns: k, or s·r for SASA): scaffolded ↔ plain
BatchTopK / Matryoshka, SASA ↔ TopK / BatchTopK, SA-GSAE ↔ JumpReLU. Only converged runs (SPEC §8).
Writes ``benchmarks/results/<tag>.{json,md}``.

    python benchmarks/bench_probes_smollm2.py --grid benchmarks/sweeps/scaffold_resid_mid.toml
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_ext.eval_report import fmt
from sae_ext.eval_result import json_safe
from sae_ext.metrics.curves import value_at_l0
from sae_ext.metrics.probing import DEFAULT_KS
from sae_ext.sweep import (
    BASELINE_ARCHITECTURE,
    active_columns,
    add_report_arguments,
    curve_of,
    curve_points,
    finished_report,
    finished_saved_runs,
    keep_earlier,
)

RESULTS = Path(__file__).parent / "results"
#: the per-run metrics read against the baseline (name → higher is better)
METRICS = {
    "absorption_fraction": False,
    "full_absorption_rate": False,
    "split_features": False,
    **{f"sparse_acc_{k}": True for k in DEFAULT_KS},
}


def flat_metrics(probes: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one :func:`probe_metrics_of` result, flat."""
    ab, sp = probes["absorption"], probes["k_sparse_probing"]
    out = {
        "absorption_fraction": ab["mean_absorption_fraction"],
        "full_absorption_rate": ab["mean_full_absorption_rate"],
        "split_features": ab["mean_num_split_features"],
        "letters_scored": ab["n_letters_evaluated"],
        "dense_acc": sp["dense_accuracy"],
        **{f"sparse_acc_{k}": v for k, v in sp["sparse_accuracy"].items()},
    }
    if "scaffold_topic" in probes:
        t = probes["scaffold_topic"]
        out.update(topic_baseline=t["baseline_accuracy"], topic_scaffold_removed=t["scaffold_removed_accuracy"],
                   topic_latents_ablated=t["latents_ablated_accuracy"], topic_n_latents=t["n_latents_ablated"])
    return out


def score_runs(found: list[tuple[dict[str, Any], Path]], data: Any) -> list[dict[str, Any]]:
    """Each saved run's record with its flat probe metrics (and the full result under ``probes``)."""
    from sae_lens import SAE

    from sae_ext.metrics.probing import probe_metrics_of

    rows = []
    for r, d in tqdm(found, desc="probe SAEs"):
        probes = probe_metrics_of(SAE.load_from_disk(str(d)), data)
        rows.append({**r, **flat_metrics(probes), "probes": probes})
    return rows


def keep_earlier_rows(rows: list[dict[str, Any]], earlier: dict[str, Any] | None, records: list[dict[str, Any]],
                      n_words: tuple[int, int], n_texts: tuple[int, int]) -> list[dict[str, Any]]:
    """This call's rows plus those of an earlier report of the same bench whose SAE is not saved
    here, so that a re-run on another machine (earlier sessions' SAEs gone) does not drop them.

    An earlier row is kept only when the probe data had the same size (spelling words and texts,
    train / test: the data is built deterministically from them) and the row is a converged run of
    the current report (curve, knob value, seed and L0 equal) that this call did not score again;
    kept rows carry ``"earlier": True``.
    """
    if not earlier:
        return rows
    if list(earlier.get("words", [])) != list(n_words) or list(earlier.get("texts", [])) != list(n_texts):
        print(f"earlier report probed {earlier.get('words')} words / {earlier.get('texts')} texts, "
              f"not {list(n_words)} / {list(n_texts)}: not kept")
        return rows

    def ident(r: dict[str, Any]) -> tuple[Any, ...]:
        return curve_of(r), r["value"], r["seed"], r["l0"]

    return keep_earlier(rows, earlier.get("runs", []), records, ident, ident)


def against_baseline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run of an architecture in :data:`BASELINE_ARCHITECTURE` against every curve of its
    baseline architecture: the metric there interpolated at the run's L0 (NaN outside), and its run
    of the same active columns (:func:`active_columns`; seeds averaged)."""
    out = []
    for r in sorted(rows, key=lambda r: (curve_of(r), r["l0"])):
        base = BASELINE_ARCHITECTURE.get(r["architecture"])
        for curve in sorted({curve_of(b) for b in rows if b["architecture"] == base}):
            row: dict[str, Any] = {"curve": curve_of(r), "baseline": curve, "value": r["value"], "seed": r["seed"],
                                   "l0": r["l0"]}
            same = [b for b in rows if curve_of(b) == curve and active_columns(b) == active_columns(r)]
            for m in METRICS:
                pts = curve_points(rows, curve, m)
                row[m] = r[m]
                row[f"{m}_baseline"] = value_at_l0([p[0] for p in pts], [p[1] for p in pts], r["l0"]) if pts else math.nan
                vals = [b[m] for b in same if b[m] is not None]
                row[f"{m}_baseline_same_value"] = sum(vals) / len(vals) if vals else math.nan
            out.append(row)
    return out


def _f(v: Any, p: str = ".3f") -> str:
    return fmt(v, p)


def markdown(grid_name: str, hook: str, rows: list[dict[str, Any]], pairs: list[dict[str, Any]],
             n_words: tuple[int, int], n_texts: tuple[int, int], seconds: float, command: str) -> str:
    """The report: every run, the scaffold topic test, and each architecture against its baseline."""
    ks = DEFAULT_KS
    out = [
        f"# Absorption and sparse probing on SmolLM2 at `{hook}` (sweep `{grid_name}`)", "",
        "Converged SAEs of the sweep (SPEC §8: special tokens out of training, normalisation and every statistic). "
        f"Absorption on the first-letter task: {n_words[0]:,} train / {n_words[1]:,} test single-token words of the "
        f"SmolLM2 vocabulary. k-sparse probing: {n_texts[0]:,} train / {n_texts[1]:,} test Python-docs paragraphs, "
        "five sections, one-vs-rest balanced tasks, mean-pooled over non-special tokens "
        "(`docs/probes.md`). Lower absorption is better; higher probe accuracy is better.", "",
        f"Wall time {seconds:.0f} s. Command: `{command}`", "",
    ]
    n_earlier = sum(1 for r in rows if r.get("earlier"))
    if n_earlier:
        out += [f"{n_earlier} of the {len(rows)} runs were scored by an earlier call of this bench on the same probe "
                "data (their SAEs are not saved here, or `--only` left their lines out); the wall time is this call's.", ""]
    out += [
        "## Every run", "",
        "| curve | knob | value | seed | L0 | R² | absorption frac. | full absorption | split | letters | "
        + " | ".join(f"acc k={k}" for k in ks) + " | dense probe |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(ks) + "---|",
    ]
    for r in sorted(rows, key=lambda r: (curve_of(r), r["l0"])):
        out.append(f"| {curve_of(r)} | {r['knob']} | {r['value']} | {r['seed']} | {r['l0']:.1f} | {_f(r['r2'], '.4f')} | "
                   f"{_f(r['absorption_fraction'])} | {_f(r['full_absorption_rate'])} | {_f(r['split_features'], '.2f')} | "
                   f"{r['letters_scored']} | " + " | ".join(_f(r[f'sparse_acc_{k}']) for k in ks)
                   + f" | {_f(r['dense_acc'])} |")
    topic = [r for r in rows if "topic_baseline" in r]
    if topic:
        out += [
            "", "## Scaffold vs sparse latents: section classification (issue 23 item 3)", "",
            "Dense one-vs-rest probes refitted on edited activations: the scaffold removed (x − s) against the N most "
            "topic-aligned sparse latents' decoded contribution removed (N = 16 r). Chance is 0.5.", "",
            "| curve | value | L0 | accuracy, x | scaffold removed | N latents ablated | N |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [f"| {curve_of(r)} | {r['value']} | {r['l0']:.1f} | {_f(r['topic_baseline'])} | "
                f"{_f(r['topic_scaffold_removed'])} | {_f(r['topic_latents_ablated'])} | {r['topic_n_latents']} |"
                for r in sorted(topic, key=lambda r: (curve_of(r), r["l0"]))]
    if pairs:
        out += [
            "", "## Against the baseline architecture at matched L0", "",
            "Each cell: the run's value / the baseline curve read at the run's L0 (log-L0 interpolation; – outside "
            "its range) / the baseline run of the same active columns (k; s·r for SASA).", "",
            "| curve | baseline | value | L0 | " + " | ".join(METRICS) + " |",
            "|---|---|---|---|" + "---|" * len(METRICS),
        ]
        for p in pairs:
            out.append(f"| {p['curve']} | {p['baseline']} | {p['value']} | {p['l0']:.1f} | " + " | ".join(
                f"{_f(p[m])} / {_f(p[m + '_baseline'])} / {_f(p[m + '_baseline_same_value'])}" for m in METRICS) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_report_arguments(p, RESULTS / "sweeps", only=True)
    p.add_argument("--per-class", type=int, default=None, help="paragraphs per section (default: all)")
    p.add_argument("--absorption-words", type=int, default=None, help="spelling words (default: every eligible)")
    p.add_argument("--tag", default=None, help="output name (default probes_smollm2_<grid name>)")
    args = p.parse_args()
    for name in ("per_class", "absorption_words"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    grid, report, found = finished_saved_runs(args.grid, args.results, args.out, only=args.only)
    from sae_ext.metrics.probing import probe_data
    from sae_ext.models import load_default_model

    t0 = time.perf_counter()
    model = load_default_model()
    data = probe_data(model, grid.hook, per_class=args.per_class, absorption_words=args.absorption_words,
                      progress=True)
    data_s = time.perf_counter() - t0
    rows = score_runs(found, data)
    seconds = time.perf_counter() - t0
    n_words = (len(data.spelling.train_letters), len(data.spelling.test_letters))
    n_texts = (len(data.train.labels), len(data.test.labels))
    tag = args.tag or f"probes_smollm2_{grid.name}"
    earlier = RESULTS / f"{tag}.json"
    if earlier.is_file():
        rows = keep_earlier_rows(rows, json.loads(earlier.read_text()), finished_report(args.grid, args.results)[2],
                                 n_words, n_texts)
    pairs = against_baseline(rows)
    command = "python benchmarks/bench_probes_smollm2.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{tag}.json").write_text(json.dumps(json_safe({
        "grid": str(args.grid), "hook": grid.hook, "report": str(report), "command": command,
        "words": n_words, "texts": n_texts, "probe_data_seconds": data_s, "seconds": seconds,
        "runs": rows, "against_baseline": pairs,
    }), indent=2, allow_nan=False))
    (RESULTS / f"{tag}.md").write_text(markdown(grid.name, grid.hook, rows, pairs, n_words, n_texts, seconds, command))
    print(f"wrote {RESULTS / tag}.{{json,md}}")


if __name__ == "__main__":
    main()
