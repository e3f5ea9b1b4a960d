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
