"""`sae-ext bench`: run the synthetic benchmarks of ``benchmarks/`` (a source checkout).

Each seed claim has one script in ``benchmarks/`` that trains with SAELens's trainer on
ground-truth synthetic data (SPEC §6) and writes ``.json``/``.md``/``.png`` results.
``--quick`` runs each in about a minute (one seed, short training), which is what the test
suite uses; without it the full runs reproduce ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

#: script name -> arguments that direct its output into ``{out}``
SYNTHETIC_BENCHMARKS: dict[str, list[str]] = {
    "bench_sign_aware_gated.py": ["--out-dir", "{out}"],
    "bench_scaffold.py": ["--out", "{out}/scaffold"],
    "bench_sasa.py": ["--out", "{out}/sasa"],
}


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd over seeds, the benchmarks' "mean ± sd"; missing (None) and NaN values
    are skipped (a metric an SAE does not have), and nothing left gives ``(None, None)`` (JSON null).
    One value has sd 0."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def format_mean_sd(mean: float | None, sd: float | None) -> str:
    """``"m ± sd"`` for a results table (4 and 2 significant digits), ``"–"`` for a missing metric."""
    return "–" if mean is None or sd is None else f"{mean:.4g} ± {sd:.2g}"


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (benchmarks are not part of the wheel)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks"
    if not path.is_dir():
        raise FileNotFoundError(
            f"sae-ext bench needs a source checkout of sae-ext (no benchmarks folder at {path})"
        )
    return path


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="about a minute per benchmark (one seed)")
    p.add_argument("--only", nargs="*", choices=sorted(SYNTHETIC_BENCHMARKS), help="run only these scripts")
    p.add_argument("--out", default="sae_ext_out/bench", help="output directory")


def run_bench(args: argparse.Namespace) -> dict[str, float]:
    """Run the selected benchmark scripts in subprocesses; return their wall times."""
    folder = benchmarks_dir()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    for script in args.only or list(SYNTHETIC_BENCHMARKS):
        cmd = [sys.executable, str(folder / script), *(["--quick"] if args.quick else [])]
        cmd += [a.format(out=out) for a in SYNTHETIC_BENCHMARKS[script]]
        print(f"$ {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        times[script] = time.perf_counter() - t
    print("\n".join(f"{s}: {v:.0f} s" for s, v in times.items()))
    print(f"results in {out}")
    return times
