"""`sae-ext sweep` on a tiny model: a 2 × 2 grid end to end, resume, bad grids, curve maths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import sae_ext.sweep as sweep_mod
from sae_ext.metrics.curves import matched_gap, pareto_front
from sae_ext.protocol import default_training_tokens
from sae_ext.sweep import (
    ArchSweep,
    SweepGrid,
    grid_from_dict,
    load_grid,
    parse_arch_flag,
    run_sweep,
    run_sweeps,
    validate_grid,
)
from sae_ext.testing import tiny_hooked_transformer

HOOK = "blocks.0.hook_resid_post"


def _rows(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 97, (n, 16), generator=g)
    toks[:, 0] = 0  # a BOS-like special token
    return Dataset.from_dict({"input_ids": toks.tolist()})


def _grid(**kw) -> SweepGrid:
    base = {
        "name": "tiny", "hook": HOOK, "tokens": 1024, "batch_size": 64, "lr": 3e-3, "context_size": 16,
        "eval_tokens": 256,
        "archs": (ArchSweep("topk", 64, "k", (2, 6)), ArchSweep("batchtopk", 64, "k", (2, 6))),
    }
    return SweepGrid(**{**base, **kw})


def test_two_by_two_grid_runs_end_to_end_and_resumes(tmp_path: Path, monkeypatch) -> None:
    model = tiny_hooked_transformer()
    train, ev = _rows(48, 1), _rows(16, 2)
    records = run_sweep(_grid(), model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    assert len(records) == 4
    assert {(r["line"], r["value"]) for r in records} == {("topk", 2), ("topk", 6), ("batchtopk", 2), ("batchtopk", 6)}
    for r in records:
        assert 0 < r["l0"] <= 64 and -1 < r["r2"] <= 1 and isinstance(r["converged"], bool)
        assert r["half_budget_tokens"] < 1024 and r["ce_loss_recovered"] is not None
        assert {"dark_matter_error_r2", "dark_matter_norm_r2"} <= set(r)  # SPEC §4, from evaluate_sae
        assert r["mean_group_stable_rank"] is None and r["mean_live_group_stable_rank"] is None  # no groups
    topk = {r["value"]: r["l0"] for r in records if r["line"] == "topk"}
    assert topk[2] == pytest.approx(2) and topk[6] == pytest.approx(6)  # the knob reached the SAE
    stored = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert len(stored["runs"]) == 4 and set(stored["matched_l0_gaps"]) == {"r2", "ce_loss_recovered"}
    md = (tmp_path / "res" / "tiny.md").read_text()
    assert "| topk |" in md and "tiny_r2.png" in md
    assert (tmp_path / "res" / "tiny_r2.png").stat().st_size > 0
    assert (tmp_path / "res" / "tiny_ce_loss_recovered.png").stat().st_size > 0

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("sae_ext.convergence.train_on_cache", no_training)
    again = run_sweep(_grid(), model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    assert again == records
    # a changed setting is a different run: it is trained (here: fails in the patched trainer), not reused
    assert run_sweep(_grid(lr=1e-3), model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0]) == []
    failed = json.loads((tmp_path / "res" / "tiny.json").read_text())["failed"]
    assert len(failed) == 4 and all("trained again" in f["error"] for f in failed)


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        (_grid(archs=(ArchSweep("nope", 64, "k", (2,)),)), "unknown architecture 'nope'"),
        (_grid(archs=(ArchSweep("topk", 64, "lambda", (2,)),)), "knob 'lambda' is not a field"),
        (_grid(archs=()), "empty"),
        (_grid(archs=(ArchSweep("topk", 64, "k", ()),)), "empty"),
        (_grid(archs=(ArchSweep("topk", 64, "k", (2,), config={"nope": 1}),)), "config fields"),
        (_grid(archs=(ArchSweep("topk", 64, "k", (-3,)),)), "finite numbers >= 0"),
        (_grid(archs=(ArchSweep("sasa", 64, "n_active_groups", (2,), config={"group_rank": 5}),)), "n_active_groups=2"),
        (_grid(tokens=0), "tokens"),
        (_grid(archs=(ArchSweep("topk", 64, "k", (2,), batch_size=0),)), "topk: batch_size must be a positive int"),
        (_grid(archs=(ArchSweep("topk", 64, "k", (2,), tokens=-5),)), "topk: tokens must be a positive int"),
        (_grid(archs=(ArchSweep("topk", 64, "k", (2,)), ArchSweep("topk", 32, "k", (2,)))), "share a name"),
    ],
)
def test_bad_grids_fail_before_any_work(grid: SweepGrid, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        run_sweep(grid, tiny_hooked_transformer(), _rows(8, 1), _rows(4, 2), tmp_path / "out", tmp_path / "res",
                  special_tokens=[0])
    assert not (tmp_path / "out").exists() and not (tmp_path / "res").exists()


def test_grid_files(tmp_path: Path) -> None:
    spec = {"name": "g", "hook": HOOK, "seeds": [0, 1],
            "archs": [{"architecture": "topk", "d_sae": 64, "knob": "k", "values": [2, 4]},
                      {"architecture": "gated", "d_sae": 64, "knob": "l1_coefficient", "values": [1.0, 3.0],
                       "label": "gated@2H", "seeds": [0]}]}
    (tmp_path / "g.json").write_text(json.dumps(spec))
    (tmp_path / "g.toml").write_text(
        f'name = "g"\nhook = "{HOOK}"\nseeds = [0, 1]\n[[archs]]\narchitecture = "topk"\nd_sae = 64\nknob = "k"\n'
        'values = [2, 4]\n[[archs]]\narchitecture = "gated"\nd_sae = 64\nknob = "l1_coefficient"\n'
        'values = [1.0, 3.0]\nlabel = "gated@2H"\nseeds = [0]\n'
    )
    import yaml

    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    grids = [load_grid(tmp_path / f) for f in ("g.json", "g.toml", "g.yaml")]
    assert grids[0] == grids[1] == grids[2]
    assert len(grids[0].runs()) == 2 * 2 + 2 * 1
    # no `tokens`: the protocol's measured budget for the hook's kind; an explicit one is kept
    assert grids[0].tokens == default_training_tokens(HOOK)
    assert grid_from_dict({**spec, "hook": "blocks.0.hook_mlp_out"}).tokens == 8_000_000
    assert grid_from_dict({**spec, "tokens": 4096}).tokens == 4096
    with pytest.raises(ValueError, match="unknown sweep settings"):
        grid_from_dict({**spec, "budget": 3})
    with pytest.raises(ValueError, match="needs 'architecture'"):
        grid_from_dict({**spec, "archs": [{"architecture": "topk"}]})
    with pytest.raises(ValueError, match=r"\.json, \.toml"):
        (tmp_path / "g.txt").write_text("{}")
        load_grid(tmp_path / "g.txt")
    with pytest.raises(FileNotFoundError):
        load_grid(tmp_path / "missing.json")


def test_a_line_can_set_its_own_batch_and_budget(tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[int, int]] = []

    def record_settings(*a, training_tokens: int, train_batch_size_tokens: int, **k):
        seen.append((training_tokens, train_batch_size_tokens))
        raise RuntimeError("stop after the settings are seen")

    monkeypatch.setattr("sae_ext.convergence.train_with_half_budget", record_settings)
    grid = _grid(archs=(ArchSweep("topk", 64, "k", (2,)), ArchSweep("batchtopk", 64, "k", (2,), batch_size=32, tokens=512)))
    run_sweep(grid, tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2), tmp_path / "out", tmp_path / "res",
              special_tokens=[0])
    assert sorted(seen) == [(512, 32), (1024, 64)]  # the grid's 1024 tokens at batch 64 for the other line
    # lines without their own settings keep the keys (and so the stored runs) they had before
    key = sweep_mod.run_key(grid, grid.archs[0], 2, 0, 768, d_in=32)
    assert (key["tokens"], key["batch_size"]) == (1024, 64)
    assert grid_from_dict({"name": "g", "hook": HOOK, "archs": [
        {"architecture": "topk", "d_sae": 64, "knob": "k", "values": [2], "batch_size": 256}]}).archs[0].batch_size == 256


def test_arch_flag() -> None:
    a = parse_arch_flag("gated:l1_coefficient=1,3.5:d_sae=1152:label=gated@2H")
    assert a == ArchSweep("gated", 1152, "l1_coefficient", (1, 3.5), label="gated@2H")
    validate_grid(_grid(archs=(a,)))
    for bad in ("topk", "topk:k=2", "topk:16:d_sae=4"):
        with pytest.raises(ValueError, match="--arch"):
            parse_arch_flag(bad)


def test_matched_l0_maths() -> None:
    a = [(10.0, 0.5), (100.0, 0.7)]
    b = [(20.0, 0.4), (200.0, 0.9)]
    g = matched_gap(a, b)
    assert g is not None and g["l0_low"] == 20 and g["l0_high"] == 100
    # at L0 20: a = 0.5 + 0.2·log2/log10 ≈ 0.560, b = 0.4 → +0.160; at 100: a 0.7, b 0.4 + 0.5·0.699 ≈ 0.749
    assert g["max_gap"] == pytest.approx(0.2 * math.log10(2) + 0.1, abs=1e-9)
    assert g["min_gap"] == pytest.approx(0.7 - (0.4 + 0.5 * math.log10(5)), abs=1e-9)
    assert matched_gap(a, [(200.0, 1), (300.0, 1)]) is None  # no overlap
    assert matched_gap(a, [(20.0, 1)]) is None
    assert pareto_front([(10, 0.5), (20, 0.4), (30, 0.8), (5, 0.1)]) == [(5, 0.1), (10, 0.5), (30, 0.8)]
    with pytest.raises(ValueError, match="finite"):
        pareto_front([(10, float("nan"))])
    with pytest.raises(ValueError, match="n must be"):
        matched_gap(a, b, n=1)


def test_unconverged_runs_are_left_out_of_curves() -> None:
    recs = [
        {"line": "x", "value": 1, "l0": 10.0, "r2": 0.5, "converged": True},
        {"line": "x", "value": 2, "l0": 20.0, "r2": 0.9, "converged": False},
        {"line": "x", "value": 3, "l0": 40.0, "r2": 0.7, "converged": True},
        {"line": "x", "value": 3, "l0": 40.0, "r2": 0.8, "converged": True},  # a second seed: averaged
    ]
    assert sweep_mod.curve_points(recs, "x", "r2") == [(10.0, 0.5), (40.0, pytest.approx(0.75))]


def test_lines_sharing_a_curve_are_drawn_and_compared_as_one() -> None:
    """A sparse end trained longer (its own line, ``curve`` naming the first) joins the first line's
    curve: one curve in the gaps, points of both lines, seeds averaged within each line."""
    recs = [
        {"line": "x", "curve": "x", "value": 1, "l0": 40.0, "r2": 0.9, "converged": True},
        {"line": "x", "curve": "x", "value": 3, "l0": 12.0, "r2": 0.5, "converged": False},  # 1 M: not converged
        {"line": "x long", "curve": "x", "value": 3, "l0": 10.0, "r2": 0.6, "converged": True},
        {"line": "x long", "curve": "x", "value": 3, "l0": 10.0, "r2": 0.7, "converged": True},
        {"line": "y", "value": 1, "l0": 10.0, "r2": 0.5, "converged": True},  # no curve: its line
        {"line": "y", "value": 2, "l0": 40.0, "r2": 0.8, "converged": True},
    ]
    assert sweep_mod.curve_points(recs, "x", "r2") == [(10.0, pytest.approx(0.65)), (40.0, 0.9)]
    assert sweep_mod.curve_points(recs, "x long", "r2") == []
    gap = matched_gap(sweep_mod.curve_points(recs, "x", "r2"), sweep_mod.curve_points(recs, "y", "r2"))
    assert gap is not None and gap["mean_gap"] == pytest.approx(0.125)


def test_a_curve_joins_one_sae_setting_only() -> None:
    short = ArchSweep("topk", 64, "k", (2, 6))
    longer = ArchSweep("topk", 64, "k", (1,), label="topk long", tokens=4096, batch_size=32, curve="topk")
    assert validate_grid(_grid(archs=(short, longer))).archs[1].curve_name == "topk"
    other_width = ArchSweep("topk", 128, "k", (1,), label="topk wide", curve="topk")
    with pytest.raises(ValueError, match="share the curve 'topk'"):
        validate_grid(_grid(archs=(short, other_width)))
    other_config = ArchSweep("topk", 64, "k", (1,), label="topk aux", config={"aux_loss_coefficient": 0.0},
                             curve="topk")
    with pytest.raises(ValueError, match="differ in architecture, d_sae, knob or config"):
        validate_grid(_grid(archs=(short, other_config)))
    with pytest.raises(ValueError, match="curve must name a line of the grid, got 'topK'"):
        validate_grid(_grid(archs=(short, ArchSweep("topk", 64, "k", (1,), label="typo", curve="topK"))))


def test_records_carry_their_curve_end_to_end(tmp_path: Path) -> None:
    model, train, ev = tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2)
    grid = _grid(archs=(ArchSweep("topk", 64, "k", (6,)),
                        ArchSweep("topk", 64, "k", (2,), label="topk long", tokens=2048, curve="topk"),
                        ArchSweep("topk", 64, "k", (2, 6), label="topk b")))
    records = run_sweep(grid, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    assert {(r["line"], r["curve"], r["tokens"]) for r in records} == {
        ("topk", "topk", 1024), ("topk long", "topk", 2048), ("topk b", "topk b", 1024)}
    # every run taken as converged: the joined curve spans both lines' L0 and is compared as one
    sweep_mod.write_report("joined", [{**r, "converged": True} for r in records], tmp_path / "res")
    report = json.loads((tmp_path / "res" / "joined.json").read_text())
    assert set(report["matched_l0_gaps"]["r2"]) == {"topk − topk b"}
    assert [p[0] for p in sweep_mod.curve_points(report["runs"], "topk", "r2")] == pytest.approx([2, 6])


def test_a_line_at_twice_the_budget_reuses_the_shorter_run_as_its_twin(tmp_path: Path, monkeypatch) -> None:
    import sae_ext.convergence as conv_mod

    model, train, ev = tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2)
    short = ArchSweep("topk", 64, "k", (2, 6))
    run_sweep(_grid(archs=(short,)), model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    trained: list[int] = []
    real = conv_mod.train_on_cache
    monkeypatch.setattr(conv_mod, "train_on_cache",
                        lambda *a, **k: trained.append(k["training_tokens"]) or real(*a, **k))
    longer = ArchSweep("topk", 64, "k", (2,), label="topk 2x", tokens=2048, curve="topk")
    records = run_sweep(_grid(archs=(short, longer)), model, train, ev, tmp_path / "out", tmp_path / "res",
                        special_tokens=[0])
    assert trained == [2048]  # the 1024-token run of k=2 became the twin; nothing else was trained
    by_line = {(r["line"], r["value"]): r for r in records}
    assert by_line[("topk 2x", 2)]["half_budget_from"].startswith("topk_k-2_")
    assert by_line[("topk 2x", 2)]["r2_half"] == pytest.approx(by_line[("topk", 2)]["r2"], abs=1e-6)


def test_shipped_grids_are_valid() -> None:
    for path in (Path(__file__).parents[1] / "benchmarks" / "sweeps").glob("*.toml"):
        grid = load_grid(path)
        assert grid.runs() and grid.hook.startswith("blocks.")


def test_grids_share_captures_and_run_in_worker_processes(tmp_path: Path, monkeypatch) -> None:
    import functools

    model = tiny_hooked_transformer()
    train, ev = _rows(48, 1), _rows(16, 2)
    a = _grid(name="a", archs=(ArchSweep("topk", 64, "k", (2, 6)),))
    b = _grid(name="b", archs=(ArchSweep("batchtopk", 64, "k", (3,)),))
    records = run_sweeps([a, b], model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0],
                         workers=2, model_loader=functools.partial(tiny_hooked_transformer))
    assert [r["value"] for r in records["a"]] and sorted(r["value"] for r in records["a"]) == [2, 6]
    assert [r["value"] for r in records["b"]] == [3]
    assert sorted(r["l0"] for r in records["a"]) == [pytest.approx(2), pytest.approx(6)]
    # one capture of the hook serves both grids; each grid has its own runs and report
    assert [p.name for p in (tmp_path / "out" / "captures" / "train").iterdir()] == ["0"]
    assert len(list((tmp_path / "out" / "a" / "runs").iterdir())) == 2
    assert len(json.loads((tmp_path / "res" / "b.json").read_text())["runs"]) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("sae_ext.convergence.train_on_cache", no_training)
    again = run_sweeps([a, b], model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    assert sorted(r["value"] for r in again["a"]) == [2, 6] and again["b"] == records["b"]


def test_deadline_starts_no_new_run(tmp_path: Path, monkeypatch, capsys) -> None:
    clock = iter([0.0, *[1e6] * 100])
    monkeypatch.setattr(sweep_mod.time, "monotonic", lambda: next(clock))
    records = run_sweep(_grid(), tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2), tmp_path / "out",
                        tmp_path / "res", special_tokens=[0], deadline_s=10.0)
    assert records == []
    assert "4 run(s) not started" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workers": 0}, "workers must be a positive int"),
        ({"workers": 2}, "needs model_loader"),
        ({"deadline_s": -1.0}, "deadline_s"),
        ({"capture_dtype": "bfloat16"}, "capture_dtype must be one of"),
        ({"capture_batch_size": 0}, "capture_batch_size"),
        ({"device": "gpu7"}, "device must be a torch device"),
    ],
)
def test_bad_run_settings_fail_before_any_work(kwargs: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        run_sweep(_grid(), tiny_hooked_transformer(), _rows(8, 1), _rows(4, 2), tmp_path / "out", tmp_path / "res",
                  special_tokens=[0], **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_new_hook_is_captured_beside_the_stored_ones(tmp_path: Path, monkeypatch) -> None:
    model = tiny_hooked_transformer()
    train, ev = _rows(48, 1), _rows(16, 2)
    one = _grid(name="one", archs=(ArchSweep("topk", 64, "k", (2,)),))
    run_sweep(one, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    calls: list[list[str]] = []
    import sae_ext.capture as capture_mod

    orig = capture_mod.capture_hooks

    def spy(model, rows, hooks, *a, **k):
        calls.append(list(hooks))
        return orig(model, rows, hooks, *a, **k)

    monkeypatch.setattr(capture_mod, "capture_hooks", spy)
    two = _grid(name="two", hook="blocks.1.hook_resid_post", archs=(ArchSweep("topk", 64, "k", (2,)),))
    run_sweeps([one, two], model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    assert calls == [["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"]]  # train and eval, new hook only
    assert sorted(p.name for p in (tmp_path / "out" / "captures" / "train").iterdir()) == ["0", "1"]


def test_a_sasa_run_records_the_stable_rank_of_all_and_of_its_live_groups(tmp_path: Path) -> None:
    grid = _grid(name="groups", archs=(ArchSweep("sasa", 64, "n_active_groups", (2,), config={"group_rank": 4}),))
    (r,) = run_sweep(grid, tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2), tmp_path / "out",
                     tmp_path / "res", special_tokens=[0])
    assert 1.0 <= r["mean_group_stable_rank"] <= 4.0 and 1.0 <= r["mean_live_group_stable_rank"] <= 4.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sweep_on_cuda_with_worker_processes(tmp_path: Path) -> None:
    import functools

    model = tiny_hooked_transformer(device="cuda")
    a = _grid(name="a", archs=(ArchSweep("topk", 64, "k", (2, 6)), ArchSweep("sign_aware_gated", 32, "l0_coefficient", (1.0,))))
    b = _grid(name="b", hook="blocks.1.hook_resid_post", archs=(ArchSweep("sasa_batchtopk", 64, "n_active_groups", (2,)),))
    records = run_sweeps([a, b], model, _rows(48, 1), _rows(16, 2), tmp_path / "out", tmp_path / "res",
                         special_tokens=[0], device="cuda", workers=2,
                         model_loader=functools.partial(tiny_hooked_transformer, device="cuda"))
    assert len(records["a"]) == 3 and len(records["b"]) == 1
    for r in [*records["a"], *records["b"]]:
        assert r["l0"] > 0 and math.isfinite(r["r2"]) and r["ce_loss_recovered"] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sweep_on_cuda_with_a_transformer_bridge(tmp_path: Path) -> None:
    """A TransformerBridge does not move its inputs to its device: capture, training and evaluation must."""
    import functools

    from sae_ext.testing import tiny_bridge

    model = tiny_bridge(device="cuda")
    grid = _grid(name="bridge", hook="blocks.0.hook_resid_post",
                 archs=(ArchSweep("topk", 64, "k", (2,)), ArchSweep("scaffold_batchtopk", 64, "k", (4,))))
    records = run_sweep(grid, model, _rows(48, 1), _rows(16, 2), tmp_path / "out", tmp_path / "res",
                        device="cuda", workers=2, model_loader=functools.partial(tiny_bridge, device="cuda"))
    assert len(records) == 2
    assert all(r["l0"] > 0 and math.isfinite(r["r2"]) and r["ce_loss_recovered"] is not None for r in records)


def test_a_failing_run_is_reported_and_the_grid_goes_on(tmp_path: Path, monkeypatch) -> None:
    real = sweep_mod._run_one

    def flaky(task, model=None):
        if task.value == 2 and task.arch.architecture == "topk":
            raise RuntimeError("boom")
        return real(task, model)

    monkeypatch.setattr(sweep_mod, "_run_one", flaky)
    records = run_sweep(_grid(), tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2), tmp_path / "out",
                        tmp_path / "res", special_tokens=[0])
    assert sorted((r["line"], r["value"]) for r in records) == [("batchtopk", 2), ("batchtopk", 6), ("topk", 6)]
    report = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert [(f["line"], f["value"], f["error"]) for f in report["failed"]] == [("topk", 2, "RuntimeError: boom")]
    assert "topk k=2 seed 0: RuntimeError: boom" in (tmp_path / "res" / "tiny.md").read_text()
    assert all(r["device"] == "cpu" for r in records)


def test_architecture_checks_run_before_any_work(tmp_path: Path) -> None:
    """SAELens's matryoshka config accepts empty widths and fails only when the SAE is built."""
    grid = _grid(archs=(ArchSweep("matryoshka_batchtopk", 64, "k", (2,)),))
    with pytest.raises(ValueError, match="matryoshka_batchtopk with k=2: .*matryoshka_widths"):
        run_sweep(grid, tiny_hooked_transformer(), _rows(8, 1), _rows(4, 2), tmp_path / "out", tmp_path / "res",
                  special_tokens=[0])
    assert not (tmp_path / "out").exists()


def test_a_committed_report_resumes_the_grid(tmp_path: Path, monkeypatch) -> None:
    """Records carry their whole key: a report from another machine counts as finished runs."""
    model, train, ev = tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2)
    records = run_sweep(_grid(), model, train, ev, tmp_path / "gpu_out", tmp_path / "res", special_tokens=[0])

    def no_training(*args, **kwargs):
        raise AssertionError("a reported run was trained again")

    monkeypatch.setattr("sae_ext.convergence.train_on_cache", no_training)
    again = run_sweep(_grid(), model, train, ev, tmp_path / "fresh_out", tmp_path / "res", special_tokens=[0])
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, records))


def test_only_trains_the_named_lines_and_keeps_the_others(tmp_path: Path, monkeypatch) -> None:
    model, train, ev = tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2)
    first = run_sweep(_grid(), model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0], only=["topk"])
    assert sorted((r["line"], r["value"]) for r in first) == [("topk", 2), ("topk", 6)]
    trained: list[str] = []
    real = sweep_mod._run_one

    def counting(task, model=None):
        trained.append(task.arch.name)
        return real(task, model)

    monkeypatch.setattr(sweep_mod, "_run_one", counting)
    both = run_sweep(_grid(), model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0],
                     only=["batchtopk"])
    assert trained == ["batchtopk", "batchtopk"] and len(both) == 4
    assert len(json.loads((tmp_path / "res" / "tiny.json").read_text())["runs"]) == 4
    with pytest.raises(ValueError, match="only must name lines"):
        run_sweep(_grid(), model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0], only=["nope"])


def test_reported_runs_of_other_settings_are_kept_apart_and_reused(tmp_path: Path, monkeypatch) -> None:
    """A call whose grid no longer has a reported run keeps it in the report (not in the curves) and
    a later call with that setting again reuses it instead of training it a second time."""
    model, train, ev = tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2)
    both = _grid(archs=(ArchSweep("topk", 64, "k", (2, 6)),))
    first = run_sweep(both, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    narrowed = run_sweep(_grid(archs=(ArchSweep("topk", 64, "k", (2,)),)), model, train, ev, tmp_path / "fresh",
                         tmp_path / "res", special_tokens=[0])
    assert [r["value"] for r in narrowed] == [2]
    report = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert [r["value"] for r in report["runs"]] == [2] and [r["value"] for r in report["other_runs"]] == [6]
    assert "k=6 seed 0" in (tmp_path / "res" / "tiny.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a reported run was trained again")

    monkeypatch.setattr("sae_ext.convergence.train_on_cache", no_training)
    again = run_sweep(both, model, train, ev, tmp_path / "fresh2", tmp_path / "res", special_tokens=[0])
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, first))
    assert "other_runs" not in json.loads((tmp_path / "res" / "tiny.json").read_text())


def test_finished_report_reads_a_grids_report_or_names_the_missing_one(tmp_path: Path) -> None:
    import argparse

    from sae_ext.sweep import add_report_arguments, finished_report

    spec = {"name": "g", "hook": HOOK, "archs": [{"architecture": "topk", "d_sae": 64, "knob": "k", "values": [2]}]}
    (tmp_path / "g.json").write_text(json.dumps(spec))
    p = argparse.ArgumentParser()
    add_report_arguments(p, tmp_path / "res")
    args = p.parse_args(["--grid", str(tmp_path / "g.json")])
    assert args.results == tmp_path / "res" and args.out == Path("sae_ext_out/sweeps")
    with pytest.raises(FileNotFoundError, match=r"no sweep report .*g\.json: run `sae-ext sweep --config"):
        finished_report(args.grid, args.results)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "g.json").write_text(json.dumps({"runs": [{"line": "topk", "value": 2}]}))
    grid, report, records = finished_report(args.grid, args.results)
    assert grid.name == "g" and report == tmp_path / "res" / "g.json" and records == [{"line": "topk", "value": 2}]


def test_finished_saved_runs_pairs_converged_records_with_their_saved_sae(tmp_path: Path) -> None:
    from sae_lens.registry import get_sae_class

    from sae_ext.sweep import finished_saved_runs

    spec = {"name": "g", "hook": HOOK, "archs": [{"architecture": "topk", "d_sae": 64, "knob": "k", "values": [2, 4]}]}
    (tmp_path / "g.json").write_text(json.dumps(spec))
    key = {"architecture": "topk", "line": "topk", "knob": "k", "value": 2, "seed": 0}
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "g.json").write_text(json.dumps({"runs": [
        {**key, "converged": True}, {**key, "value": 4, "converged": False}]}))
    with pytest.raises(FileNotFoundError, match=r"no converged run of .*g\.json has a saved SAE under .*g/runs"):
        finished_saved_runs(tmp_path / "g.json", tmp_path / "res", tmp_path / "out")
    sae_cls, cfg_cls = get_sae_class("topk")
    for k in (2, 4):  # both saved; the unconverged one is still left out
        run = tmp_path / "out" / "g" / "runs" / f"topk_k-{k}"
        sae_cls(cfg_cls(d_in=8, d_sae=16, k=k)).save_model(str(run))
        (run / "record.json").write_text(json.dumps({"key": {**key, "value": k}, "record": {}}))
    grid, report, found = finished_saved_runs(tmp_path / "g.json", tmp_path / "res", tmp_path / "out")
    assert grid.name == "g" and report == tmp_path / "res" / "g.json"
    assert [(r["value"], d.name) for r, d in found] == [(2, "topk_k-2")]
    _, _, every = finished_saved_runs(tmp_path / "g.json", tmp_path / "res", tmp_path / "out", converged_only=False)
    assert [(r["value"], d.name) for r, d in every] == [(2, "topk_k-2"), (4, "topk_k-4")]
    with pytest.raises(FileNotFoundError, match=r"no run of .*g\.json has a saved SAE"):
        finished_saved_runs(tmp_path / "g.json", tmp_path / "res", tmp_path / "empty", converged_only=False)


def test_finished_saved_runs_of_named_lines_only(tmp_path: Path) -> None:
    import argparse

    from sae_lens.registry import get_sae_class

    from sae_ext.sweep import add_report_arguments, finished_saved_runs

    spec = {"name": "g", "hook": HOOK, "archs": [
        {"architecture": "topk", "d_sae": 64, "knob": "k", "values": [2]},
        {"architecture": "topk", "label": "topk wide", "d_sae": 128, "knob": "k", "values": [2]}]}
    (tmp_path / "g.json").write_text(json.dumps(spec))
    keys = [{"architecture": "topk", "line": line, "knob": "k", "value": 2, "seed": 0} for line in ("topk", "topk wide")]
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "g.json").write_text(json.dumps({"runs": [{**k, "converged": True} for k in keys]}))
    sae_cls, cfg_cls = get_sae_class("topk")
    for key in keys:
        run = tmp_path / "out" / "g" / "runs" / key["line"].replace(" ", "_")
        sae_cls(cfg_cls(d_in=8, d_sae=16, k=2)).save_model(str(run))
        (run / "record.json").write_text(json.dumps({"key": key, "record": {}}))
    p = argparse.ArgumentParser()
    add_report_arguments(p, tmp_path / "res", only=True)
    args = p.parse_args(["--grid", str(tmp_path / "g.json"), "--only", "topk wide"])
    assert args.only == ["topk wide"]
    _, _, found = finished_saved_runs(args.grid, tmp_path / "res", tmp_path / "out", only=args.only)
    assert [r["line"] for r, _ in found] == ["topk wide"]
    _, _, every = finished_saved_runs(args.grid, tmp_path / "res", tmp_path / "out")
    assert [r["line"] for r, _ in every] == ["topk", "topk wide"]
    for bad in (["topk narrow"], []):
        with pytest.raises(ValueError, match=r"only must name lines of the grids, got .*the lines: \['topk', 'topk wide'\]"):
            finished_saved_runs(args.grid, tmp_path / "res", tmp_path / "out", only=bad)


def test_active_columns_counts_sasa_groups_times_their_rank() -> None:
    from sae_ext.saes.sasa import DEFAULT_GROUP_RANK
    from sae_ext.sweep import active_columns

    sasa = {"architecture": "sasa", "knob": "n_active_groups", "value": 8}
    assert active_columns({**sasa, "config": {"group_rank": 4}}) == 32
    assert active_columns({**sasa, "config": {}}) == 8 * DEFAULT_GROUP_RANK
    assert active_columns({**sasa, "config": {}, "resolved_config": {"group_rank": 2}}) == 16
    assert active_columns({"knob": "k", "value": 32, "config": {"group_rank": 4}}) == 32
    assert active_columns({"knob": "l0_coefficient", "value": 0.3}) == 0.3


def test_runs_are_matched_on_their_resolved_config(tmp_path: Path, monkeypatch) -> None:
    """A run key holds the training config with every default filled in: a line that spells out a
    default reuses the run made without it, a run made before keys held it (its record stripped of
    ``resolved_config`` here) keeps its meaning, and one made under a default that has changed since
    (:data:`PRE_RESOLVED_DEFAULTS`) is trained again instead of being passed off as the new setting."""
    from sae_ext.sweep import config_value, record_matches

    model, train, ev = tiny_hooked_transformer(), _rows(48, 1), _rows(16, 2)
    grid = _grid(archs=(ArchSweep("topk", 64, "k", (2,)),))
    (first,) = run_sweep(grid, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    resolved = first["resolved_config"]
    assert resolved["k"] == 2 and resolved["d_in"] == 32 and resolved["aux_loss_coefficient"] == 1.0
    assert config_value(first, "aux_loss_coefficient") == 1.0 and config_value(first, "k") == 2
    assert "device" not in resolved and "metadata" not in resolved

    trained: list[dict] = []
    real = sweep_mod._run_one

    def counting(task, model=None):
        trained.append(task.key)
        return real(task, model)

    monkeypatch.setattr(sweep_mod, "_run_one", counting)
    spelled = _grid(archs=(ArchSweep("topk", 64, "k", (2,), config={"aux_loss_coefficient": 1.0}),))
    assert run_sweep(spelled, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0]) == [first]
    other = _grid(archs=(ArchSweep("topk", 64, "k", (2,), config={"aux_loss_coefficient": 0.5}),))
    assert not record_matches(sweep_mod.run_key(other, other.archs[0], 2, 0, first["captured_tokens"], d_in=32)
                              | {"capture_dtype": first["capture_dtype"]}, first)
    assert trained == []

    # the same run as it was stored before keys held the resolved config
    legacy = {k: v for k, v in first.items() if k != "resolved_config"}
    (run,) = (tmp_path / "out" / "tiny" / "runs").iterdir()
    run = run.rename(run.with_name("topk_k-2_seed0_0ld0ld00"))  # its folder was named from its old key
    stored = json.loads((run / "record.json").read_text())
    (run / "record.json").write_text(json.dumps({"key": {k: v for k, v in stored["key"].items()
                                                          if k != "resolved_config"}, "record": legacy}))
    report = json.loads((tmp_path / "res" / "tiny.json").read_text())
    (tmp_path / "res" / "tiny.json").write_text(json.dumps({**report, "runs": [legacy]}))
    assert run_sweep(spelled, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0]) == [legacy]
    assert config_value(legacy, "aux_loss_coefficient") == 1.0 and trained == []

    # … and after the default it was made under changed: trained again, the old run kept apart
    monkeypatch.setitem(sweep_mod.PRE_RESOLVED_DEFAULTS, "topk", {"aux_loss_coefficient": 0.25})
    assert config_value(legacy, "aux_loss_coefficient") == 0.25
    (again,) = run_sweep(grid, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0])
    assert len(trained) == 1 and again["resolved_config"] == resolved
    assert len(list((tmp_path / "out" / "tiny" / "runs").iterdir())) == 2  # the old run's SAE is kept
    report = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert report["other_runs"] == [legacy]
    # a line that spells out the old default is the old run again
    old = _grid(archs=(ArchSweep("topk", 64, "k", (2,), config={"aux_loss_coefficient": 0.25}),))
    assert run_sweep(old, model, train, ev, tmp_path / "out", tmp_path / "res", special_tokens=[0]) == [legacy]
    assert len(trained) == 1


def test_sasa_runs_from_before_resolved_configs_keep_the_old_nuclear_default() -> None:
    """SASA's λ_nuc default went from 1.0 to 0.1: a stored run made without it is a λ = 1 run, reused
    by a line that spells out 1.0 and never by a line that leaves λ_nuc to the new default."""
    from sae_ext.saes.sasa import DEFAULT_NUCLEAR_COEFFICIENT
    from sae_ext.sweep import config_value, record_matches, run_key

    def line(config: dict) -> tuple[dict, dict]:
        arch = ArchSweep("sasa", 64, "n_active_groups", (4,), config={"group_rank": 2, **config})
        key = run_key(_grid(archs=(arch,)), arch, 4, 0, 768, d_in=32)
        return key, {k: v for k, v in key.items() if k != "resolved_config"}  # as stored before

    new_default, legacy = line({})
    spelled, _ = line({"nuclear_coefficient": 1.0})
    assert new_default["resolved_config"]["nuclear_coefficient"] == DEFAULT_NUCLEAR_COEFFICIENT == 0.1
    assert config_value(legacy, "nuclear_coefficient") == 1.0 and config_value(legacy, "group_rank") == 2
    assert record_matches(spelled, legacy) and not record_matches(new_default, legacy)
    assert record_matches(new_default, line({"nuclear_coefficient": 0.1})[0])
    assert not record_matches(spelled, {**legacy, "value": 2})  # every other key field still counts
    with pytest.raises(KeyError, match="no training-config value 'nope'"):
        config_value(legacy, "nope")
    with pytest.raises(KeyError, match="no training-config value 'nope'"):
        config_value(spelled, "nope")
    with pytest.raises(ValueError, match="unknown architecture 'gone'"):
        config_value({**legacy, "architecture": "gone"}, "group_rank")
    with pytest.raises(ValueError, match=r"not a sweep run's record or key.*\['knob', 'value'\]"):
        config_value({"architecture": "sasa"}, "group_rank")


def test_keep_earlier_adds_only_rows_of_converged_runs_not_measured_again() -> None:
    from sae_ext.sweep import keep_earlier

    def ident(r: dict) -> tuple:
        return r["line"], r["l0"]

    records = [{"line": "a", "l0": 1.0, "converged": True}, {"line": "b", "l0": 2.0, "converged": True},
               {"line": "c", "l0": 3.0, "converged": False}]
    new = [{"line": "a", "l0": 1.0, "v": "new"}]
    earlier = [{"line": n, "l0": x, "v": "old"} for n, x in [("a", 1.0), ("b", 2.0), ("b", 2.5), ("c", 3.0)]]
    assert keep_earlier(new, earlier, records, ident, ident) == [new[0], {"line": "b", "l0": 2.0, "v": "old", "earlier": True}]
