from pathlib import Path

from sae_ext.bench import SYNTHETIC_BENCHMARKS, benchmarks_dir
from sae_ext.cli import main


def test_every_registered_benchmark_script_exists() -> None:
    for script in SYNTHETIC_BENCHMARKS:
        assert (benchmarks_dir() / script).is_file(), script


def test_bench_quick_runs_every_synthetic_benchmark(tmp_path: Path) -> None:
    main(["bench", "--quick", "--out", str(tmp_path)])
    jsons = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(jsons) >= len(SYNTHETIC_BENCHMARKS), jsons
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.png"))


def _bench_smollm2():
    """Import ``benchmarks/bench_smollm2.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_smollm2", benchmarks_dir() / "bench_smollm2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smollm2_resume_reuses_only_runs_with_identical_arguments(tmp_path: Path) -> None:
    import json

    bench = _bench_smollm2()
    args = bench.demo_args(out=str(tmp_path), seed=1, only=["sasa"], tokens=1000)
    assert bench.finished_rows(args) is None  # nothing finished yet
    rows = [{"name": "sasa r4 s8", "l0": 32.0}]
    (tmp_path / "report.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, default=str))
    assert bench.run_or_resume(args, resume=True) == rows
    for changed in [{"seed": 2}, {"tokens": 2000}, {"only": ["sasa", "topk k32"]}]:
        assert bench.finished_rows(bench.demo_args(**{**vars(args), **changed})) is None, changed


def test_mean_sd_skips_missing_values_and_formats_them_as_a_dash() -> None:
    import math
    import statistics

    from sae_ext.bench import format_mean_sd, mean_sd

    assert mean_sd([1.0, None, 3.0, float("nan")]) == (2.0, statistics.stdev([1.0, 3.0]))
    assert mean_sd([0.5]) == (0.5, 0.0)
    assert mean_sd([None, math.nan]) == (None, None)
    assert format_mean_sd(*mean_sd([1.0, 3.0])) == "2 ± 1.4"
    assert format_mean_sd(None, None) == "–"
