"""``benchmarks/gpu_check.py`` end to end on the CPU (its ``--quick`` dry run), so the script
prepared for a GPU session cannot rot between the sessions that have one."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sae_ext.bench import benchmarks_dir
from sae_ext.registry import plugin_training_architectures

SCRIPT = benchmarks_dir() / "gpu_check.py"


def _gpu_check() -> ModuleType:
    """Import the script (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, int]:
    """One ``--device cpu --quick`` run in a subprocess (it sets threads and resets dynamo)."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return (
        json.loads((out / "gpu_check.json").read_text()),
        (out / "gpu_check.md").read_text(),
        proc.returncode,
    )


def test_dry_run_has_a_passing_record_per_architecture_and_check(dry_run) -> None:
    res, md, returncode = dry_run
    gc = _gpu_check()
    failed = [
        (r["architecture"], r["check"], r.get("error"))
        for r in res["checks"]
        if r["status"] == "fail"
    ]
    assert not failed and returncode == 0, failed
    plugins = plugin_training_architectures()
    siblings = {gc.sibling_of(a) for a in plugins}
    assert not siblings & set(plugins)
    records = {(r["architecture"], r["check"]): r for r in res["checks"]}
    assert set(records) == {(a, c) for a in [*plugins, *siblings] for c in gc.CHECK_ORDER}
    for (arch, check), r in records.items():
        if arch in siblings and check in gc.PLUGIN_ONLY:
            assert r["status"] == "skip", (arch, check)
        elif r["status"] == "skip":  # only a plugin SAE without thresholds may skip, and says so
            assert (check, r["details"]["skip"]) == (
                "thresholds_bf16_sae",
                "no threshold tensors",
            ), r
            assert not r["details"]["after_training"] and not r["details"]["loaded_bfloat16"]
        else:
            assert r["status"] == "pass", (arch, check)
    assert res["summary"]["fail"] == 0 and res["summary"]["pass"] >= 6 * (
        len(plugins) + len(siblings)
    )
    for arch in [*plugins, *siblings]:
        assert f"| {arch} |" in md


def test_dry_run_reports_step_time_ratios_and_compile_graphs(dry_run) -> None:
    res, md, _ = dry_run
    rows = {r["architecture"]: r for r in res["step_time"]}
    assert set(rows) == set(plugin_training_architectures())
    for r in rows.values():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["step_ms"] > 0 and r["nan_check_on_step_ms"] > 0
        assert "share_of_peak" not in r  # --quick reports ratios only
    compiled = [r["details"] for r in res["checks"] if r["check"] == "compile"]
    for d in compiled:
        assert d["backend"] == "eager" and d["graphs"] >= 1 and d["graph_breaks"] >= 0
        assert len(d["compiled_losses"]) == len(d["eager_losses"]) == 1
    assert "## Step time vs the SAELens sibling" in md and "## torch.compile" in md


def test_bad_arguments_are_one_clear_error_before_any_work(tmp_path: Path) -> None:
    gc = _gpu_check()
    with pytest.raises(ValueError, match="unknown plugin architectures"):
        gc.main(["--device", "cpu", "--only", "no_such_sae", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--device must be cpu, cuda"):
        gc.main(["--device", "meta", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--peak-flops must be > 0"):
        gc.main(["--device", "cpu", "--peak-flops", "0", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            gc.main(["--device", "cuda", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written


def test_sibling_rule_and_config_fields() -> None:
    gc = _gpu_check()
    assert gc.sibling_of("sign_aware_gated") == "gated" and gc.sibling_of("sasa") == "topk"
    assert (
        gc.sibling_of("scaffold_matryoshka_batchtopk") == "matryoshka_batchtopk"
    )  # longest suffix
    assert gc.sibling_of("scaffold_batchtopk") == "batchtopk"
    kw = gc.sae_kwargs("sasa", 64, 512, 16)
    assert kw["group_rank"] * kw["n_active_groups"] == 16  # same active columns as TopK k
    assert gc.sae_kwargs("matryoshka_batchtopk", 64, 512, 16)["matryoshka_widths"][-1] == 512
