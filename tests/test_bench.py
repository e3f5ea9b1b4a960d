from pathlib import Path

import pytest

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


def _bench(name: str):
    """Import ``benchmarks/<name>.py``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, benchmarks_dir() / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smollm2_resume_reuses_only_runs_with_identical_arguments(tmp_path: Path) -> None:
    import json

    bench = _bench("bench_smollm2")
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


def _record(arch: str, line: str, k: int, l0: float, dense: float, converged: bool = True) -> dict:
    return {"architecture": arch, "line": line, "knob": "k", "value": k, "seed": 0, "l0": l0, "r2": 0.9,
            "dense_fraction": dense, "dead_fraction": 0.01, "converged": converged}


def test_scaffold_dense_latents_are_read_against_the_plain_curve_at_matched_l0() -> None:
    import math

    bench = _bench("bench_scaffold_smollm2")
    records = [
        _record("batchtopk", "batchtopk", 16, 10.0, 0.2),
        _record("batchtopk", "batchtopk", 64, 40.0, 0.1),
        _record("scaffold_batchtopk", "scaffold r8", 32, 20.0, 0.03),
        _record("scaffold_batchtopk", "scaffold r8", 128, 80.0, 0.05),  # beyond the plain curve
        _record("scaffold_batchtopk", "scaffold r8", 8, 5.0, 0.0, converged=False),  # left out
    ]
    rows = bench.dense_at_matched_l0(records)
    assert [r["k"] for r in rows] == [32, 128]
    assert rows[0]["dense_plain"] == pytest.approx(0.15)  # halfway in log L0 between 10 and 40
    assert rows[0]["dense_reduction"] == pytest.approx(0.8)
    assert math.isnan(rows[1]["dense_plain"]) and math.isnan(rows[1]["dense_reduction"])
    assert math.isnan(rows[0]["dense_plain_same_k"])  # no plain run at k 32
    records.append(_record("batchtopk", "batchtopk", 128, 90.0, 0.1))
    rows = bench.dense_at_matched_l0(records)
    assert rows[1]["dense_plain_same_k"] == 0.1 and rows[1]["dense_reduction_same_k"] == pytest.approx(0.5)
    md = bench.markdown("g", "hook", rows, [], records, "g.png")
    assert "| scaffold r8 | 32 | 20.0 | 0.0300 | 0.1500 | 80% | – | – |" in md and "1 unconverged" in md


def test_scaffold_ablations_of_saved_sweep_runs_end_to_end(tmp_path: Path) -> None:
    import json

    import torch
    from sae_lens import HookedSAETransformer
    from sae_lens.registry import get_sae_class

    from sae_ext.testing import random_token_dataset, tiny_hooked_transformer

    bench = _bench("bench_scaffold_smollm2")
    model = tiny_hooked_transformer(cls=HookedSAETransformer)
    sae_cls, cfg_cls = get_sae_class("scaffold_jumprelu")
    torch.manual_seed(0)
    sae = sae_cls(cfg_cls(d_in=32, d_sae=64, scaffold_rank=2))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.cfg.metadata.context_size = 16
    key = {"architecture": "scaffold_batchtopk", "line": "scaffold r2", "knob": "k", "value": 4, "seed": 0,
           "config": {"scaffold_rank": 2}}
    run = tmp_path / "runs" / "scaffold_r2_k-4"
    sae.save_model(str(run))
    (run / "record.json").write_text(json.dumps({"key": key, "record": {}}))
    records = [
        {**key, "l0": 4.0, "r2": 0.5, "dense_fraction": 0.0, "dead_fraction": 0.0, "converged": True},
        {**key, "value": 8, "l0": 8.0, "r2": 0.6, "dense_fraction": 0.0, "dead_fraction": 0.0, "converged": True},
    ]
    found = bench.saved_scaffold_runs(records, tmp_path / "runs")
    assert [(r["value"], d) for r, d in found] == [(4, run)]  # k 8 has no saved SAE
    assert bench.saved_scaffold_runs(records, tmp_path / "runs", only=["scaffold r8"]) == []
    rows = bench.evaluate_scaffolds(found, model, random_token_dataset(), n_tokens=96)
    (row,) = rows
    assert row["rank"] == 2 and len(row["angles_deg"]) == 2 and row["n_tokens"] == 96
    assert row["ce_ratio_scaffold"] > 0 and row["ce_ratio_pca"] > 0
    assert 0.0 <= min(row["angles_deg"]) <= max(row["angles_deg"]) <= 90.0
    massive = bench.pca_without_massive_tokens(
        model, "blocks.0.hook_resid_post", random_token_dataset(), 96, [2], found
    )
    assert massive["tokens"] == 96 and 0 <= massive["massive"] < 96
    m = massive["by_rank"][2]
    assert 0 < m["explained_variance_without_massive"] <= 1 and m["ce_ratio_pca_without_massive"] > 0
    (angles,) = m["scaffold_angles_deg"].values()
    assert len(angles) == 2 and list(m["scaffold_angles_deg"]) == ["scaffold r2 k=4"]
    md = bench.markdown("g", "h", [], rows, records, "g.png", massive)
    assert "Scaffold zeroed vs top-r PCA removed" in md and "## The same PCA without massive tokens" in md
    assert "Not ablated (no saved SAE under the sweep's `--out`): scaffold r2 k=8 seed 0." in md


def test_probes_of_saved_sweep_runs_against_their_baseline_at_matched_l0(tmp_path: Path) -> None:
    """One probe-data pass on a tiny model scores every saved converged run; the scaffold run is read
    against the plain curve interpolated at its L0 and the plain run of the same k."""
    import json
    import math

    import torch
    from sae_lens.registry import get_sae_class

    from sae_ext.metrics.probing import probe_data
    from sae_ext.testing import tiny_hooked_transformer, tiny_word_tokenizer

    bench = _bench("bench_probes_smollm2")
    tok = tiny_word_tokenizer([a + b for a in "abcdefgh" for b in "aeiouxyz"])
    model = tiny_hooked_transformer(d_model=32, d_vocab=len(tok), n_ctx=80)
    torch.manual_seed(0)
    records = []
    for arch, line, inference, k, l0, extra in [
        ("scaffold_batchtopk", "scaffold r2", "scaffold_jumprelu", 4, 4.0, {"scaffold_rank": 2}),
        ("batchtopk", "batchtopk", "jumprelu", 2, 2.0, {}),
        ("batchtopk", "batchtopk", "jumprelu", 4, 5.0, {}),
        ("batchtopk", "batchtopk", "jumprelu", 8, 8.0, {}),
        ("sasa", "sasa r2", "sasa", 2, 4.0, {"group_rank": 2, "n_active_groups": 2}),  # s·r = 4
        ("topk", "topk", "topk", 4, 4.0, {"k": 4}),
    ]:
        knob = "n_active_groups" if arch == "sasa" else "k"
        key = {"architecture": arch, "line": line, "knob": knob, "value": k, "seed": 0, "config": extra}
        records.append({**key, "l0": l0, "r2": 0.5, "converged": True})
        if k == 8:
            continue  # reported but not saved: skipped
        sae_cls, cfg_cls = get_sae_class(inference)
        run = tmp_path / "runs" / f"{line.replace(' ', '_')}_k-{k}"
        sae_cls(cfg_cls(d_in=32, d_sae=48, **extra)).save_model(str(run))
        (run / "record.json").write_text(json.dumps({"key": key, "record": {}}))
    records.append({**records[1], "value": 16, "l0": 16.0, "converged": False})
    from sae_ext.sweep import saved_runs

    found = saved_runs(records, tmp_path / "runs")
    assert sorted((r["line"], r["value"]) for r, _ in found) == [
        ("batchtopk", 2), ("batchtopk", 4), ("sasa r2", 2), ("scaffold r2", 4), ("topk", 4)]
    data = probe_data(model, "blocks.0.hook_resid_post", tokenizer=tok, per_class=4)
    rows = bench.score_runs(found, data)
    assert all(0 <= r["sparse_acc_1"] <= 1 and 0 <= r["dense_acc"] <= 1 for r in rows)
    (scaffold,) = [r for r in rows if r["architecture"] == "scaffold_batchtopk"]
    assert scaffold["topic_n_latents"] == 32 and "topic_scaffold_removed" in scaffold
    pair, sasa_pair = sorted(bench.against_baseline(rows), key=lambda p: p["baseline"])
    assert (pair["curve"], sasa_pair["curve"], sasa_pair["baseline"]) == ("scaffold r2", "sasa r2", "topk")
    (topk,) = [r for r in rows if r["architecture"] == "topk"]
    for m in bench.METRICS:  # the TopK run of k = s·r = 4 is SASA's run of the same active columns
        assert sasa_pair[f"{m}_baseline_same_value"] == topk[m] or math.isnan(topk[m])
    plain = {r["value"]: r for r in rows if r["architecture"] == "batchtopk"}
    for m in bench.METRICS:
        a, b = plain[2][m], plain[4][m]  # plain L0 2 and 5: read at L0 4 in log L0
        want = a + (b - a) * math.log(4 / 2) / math.log(5 / 2)
        assert math.isclose(pair[f"{m}_baseline"], want, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(want) and math.isnan(pair[f"{m}_baseline"]))
        assert pair[f"{m}_baseline_same_value"] == b or math.isnan(b)
    md = bench.markdown("g", "h", rows, [pair], (10, 2), (20, 20), 1.0, "cmd")
    assert "## Scaffold vs sparse latents" in md and "## Against the baseline architecture at matched L0" in md
    # a re-run where only the scaffold SAE is saved keeps the earlier rows of the same probe data
    sizes = (len(data.spelling.train_letters), len(data.spelling.test_letters)), (len(data.train.labels), len(data.test.labels))
    earlier = {"words": list(sizes[0]), "texts": list(sizes[1]), "runs": json.loads(json.dumps(rows))}
    merged = bench.keep_earlier_rows([scaffold], earlier, records, *sizes)
    assert merged[0] is scaffold and len(merged) == len(rows) and all(r["earlier"] for r in merged[1:])
    assert "4 of the 5 runs were scored by an earlier call" in bench.markdown("g", "h", merged, [], *sizes, 1.0, "cmd")
    retrained = [{**r, "l0": 2.5} if r["line"] == "topk" else r for r in records]  # another run now: not kept
    assert "topk" not in {r["line"] for r in bench.keep_earlier_rows([scaffold], earlier, retrained, *sizes)}
    other_data = ((sizes[0][0] + 1, sizes[0][1]), sizes[1])
    assert bench.keep_earlier_rows([scaffold], earlier, records, *other_data) == [scaffold]


def _sasa_record(arch: str, r: int, s: int, r2: float, r2_half: float | None = None, converged: bool = True) -> dict:
    knob = "n_active_groups" if arch.startswith("sasa") else "k"
    config = {"group_rank": r} if arch.startswith("sasa") else {}
    line = f"{arch} r{r}" if arch.startswith("sasa") else arch
    return {"architecture": arch, "line": line, "knob": knob, "value": s, "seed": 0, "config": config,
            "l0": float(r * s), "r2": r2, "r2_half": r2 if r2_half is None else r2_half, "converged": converged,
            "ce_loss_recovered": r2 - 0.1, "kl_score": r2 - 0.2, "dead_fraction": 0.0, "dense_fraction": 0.01,
            "mean_group_stable_rank": 1.5}


def test_sasa_rank_rows_compare_each_rank_with_the_baseline_of_the_same_active_columns(tmp_path: Path) -> None:
    """SASA runs at s·r = 8 are read against the TopK / BatchTopK run of k = 8 (not k = 4, nor the
    unconverged k = 8 seed), at full and half budget; probes rows join by line, value and seed;
    the recommended r is the converged run with the best R²."""
    import math

    bench = _bench("bench_sasa_rank_smollm2")
    records = [
        _sasa_record("topk", 1, 8, 0.90), _sasa_record("topk", 1, 4, 0.80),
        {**_sasa_record("topk", 1, 8, 0.50), "seed": 1, "converged": False},
        _sasa_record("batchtopk", 1, 8, 0.92),
        _sasa_record("sasa", 1, 8, 0.88, r2_half=0.86), _sasa_record("sasa", 2, 4, 0.89),
        {**_sasa_record("sasa", 4, 2, 0.95, converged=False), "config": {"group_rank": 4, "nuclear_coefficient": 0.1}},
        _sasa_record("sasa_batchtopk", 2, 4, 0.93, r2_half=None),
    ]
    probes = [{"line": "sasa r2", "value": 4, "seed": 0, "absorption_fraction": 0.1, "full_absorption_rate": 0.0,
               "split_features": 1.0},
              {"line": "topk", "value": 8, "seed": 0, "absorption_fraction": 0.3, "full_absorption_rate": 0.1,
               "split_features": 2.0}]
    rows = bench.rank_rows(records, probes)
    assert [(r["architecture"], r["group_rank"]) for r in rows] == [
        ("sasa", 1), ("sasa", 2), ("sasa", 4), ("sasa_batchtopk", 2)]
    r1, r2, r4, bt = rows
    assert r1["active_columns"] == r2["active_columns"] == 8
    assert r1["r2_gap_topk"] == pytest.approx(-0.02) and r1["r2_half_gap_topk"] == pytest.approx(-0.04)
    assert r1["ce_loss_recovered_gap_topk"] == pytest.approx(-0.02)
    assert bt["r2_gap_batchtopk"] == pytest.approx(0.01) and bt["r2_gap_topk"] == pytest.approx(0.03)
    assert r2["absorption_fraction"] == 0.1 and r2["absorption_fraction_topk"] == 0.3 and r2["split_features_topk"] == 2.0
    assert math.isnan(r1["absorption_fraction"]) and math.isnan(bt["absorption_fraction_batchtopk"])
    best = bench.recommend(rows)
    assert best["sasa"]["group_rank"] == 2 and best["sasa_batchtopk"]["group_rank"] == 2  # r 4 is unconverged
    md = bench.markdown("g", "hook", rows, best, "cmd", "g.png")
    assert "| sasa r1 | 1 | 8 | 1 | 8.0 | yes | 0.8800 | -0.0200 | -0.0400 |" in md and "- `sasa`: r = 2" in md
    assert "| sasa r4 | 4 | 2 | 0.1 | 8.0 | no |" in md  # λ_nuc as trained: spelled out, else the default of its time
    bench.plot(rows, tmp_path / "g.png", "t")
    assert (tmp_path / "g.png").stat().st_size > 0


def test_dark_matter_of_saved_sweep_runs_with_and_without_massive_tokens(tmp_path: Path) -> None:
    """Every saved converged run is scored on the held-out activations, both with every token and
    without the massive ones; the error norms along a curve are regressed densest on sparsest."""
    import json
    import math

    import torch
    from sae_lens.registry import get_sae_class

    from sae_ext.sweep import saved_runs
    from sae_ext.testing import random_token_dataset, tiny_hooked_transformer

    bench = _bench("bench_dark_matter_smollm2")
    model = tiny_hooked_transformer()
    torch.manual_seed(0)
    records = []
    for k, l0, converged in [(2, 2.0, True), (4, 4.0, True), (8, 8.0, False)]:
        key = {"architecture": "topk", "line": "topk", "knob": "k", "value": k, "seed": 0, "config": {}}
        records.append({**key, "l0": l0, "r2": 0.5, "converged": converged})
        sae_cls, cfg_cls = get_sae_class("topk")
        run = tmp_path / "runs" / f"topk_k-{k}"
        sae_cls(cfg_cls(d_in=32, d_sae=48, k=k)).save_model(str(run))
        (run / "record.json").write_text(json.dumps({"key": key, "record": {}}))
    found = saved_runs(records, tmp_path / "runs")
    assert [r["value"] for r, _ in found] == [2, 4]  # the unconverged run is not read

    x = bench.heldout_activations(model, "blocks.0.hook_resid_post", random_token_dataset(), 1024)
    assert x.shape == (1024, 32)
    assert list(bench.token_sets(x)) == ["all"]  # no massive token in a tiny model
    x = torch.cat([x, 1000 * x[:1]])  # one attention-sink-like row
    sets = bench.token_sets(x)
    assert list(sets) == ["all", "no_massive"] and len(sets["no_massive"]) == 1024
    rows, norms = bench.dark_matter_rows(found, sets)
    assert [r["value"] for r in rows] == [2, 4]
    for r in rows:
        for name in sets:
            assert all(math.isfinite(r[f"{s}_{name}"]) for s in bench.SCORES)
            assert r[f"n_test_{name}"] > 400 and 0.0 <= r[f"linear_error_norm_share_{name}"] <= 1.0
        # part of a random SAE's error is linear in x; the one outlier row spoils that fit
        assert r["error_r2_no_massive"] > max(0.0, r["error_r2_all"])
    assert all(len(n) == 1024 for n in norms.values())
    (scaling,) = bench.norm_scaling(norms, sets["no_massive"])
    assert (scaling["seed"], scaling["l0_sparse"], scaling["l0_dense"]) == (0, 2.0, 4.0)
    assert scaling["r2_from_sparsest"] <= 1.0
    # another seed's run on the same curve is a pair of its own, never mixed with seed 0's
    other = {**norms, ("topk", 1, 8.0): norms[("topk", 0, 4.0)]}
    assert [s["seed"] for s in bench.norm_scaling(other, sets["no_massive"])] == [0]
    summ = bench.summary(rows, list(sets))
    assert summ["error_r2_all"]["min"] <= summ["error_r2_all"]["median"] <= summ["error_r2_all"]["max"]
    bench.plot(rows, list(sets), tmp_path / "dm.png", "t")
    assert (tmp_path / "dm.png").stat().st_size > 0
    md = bench.markdown("g", "h", rows, [scaling], list(sets), {k: len(v) for k, v in sets.items()}, "cmd", "dm.png")
    assert "## Every run, without massive tokens" in md and "## Per-token error norms along each curve" in md


def test_sasa_group_use_of_every_saved_run_and_its_half_budget_twin(tmp_path: Path) -> None:
    """Each saved SASA SAE (converged or not) and its half-budget twin gets the live / dead groups'
    stable ranks, checked against the SAE's own group API; non-SASA runs are left out."""
    import json
    import math

    import torch
    from sae_lens.registry import get_sae_class

    from sae_ext.convergence import HALF_BUDGET_DIR
    from sae_ext.sweep import saved_runs

    bench = _bench("bench_sasa_groups_smollm2")
    torch.manual_seed(0)
    records, saes = [], {}
    for arch, value, config, converged in [("sasa", 2, {"group_rank": 4}, False),
                                           ("sasa", 4, {"group_rank": 2, "nuclear_coefficient": 0.0}, True),
                                           ("topk", 8, {}, True)]:
        key = {"architecture": arch, "line": f"{arch} {value}", "knob": "n_active_groups" if arch == "sasa" else "k",
               "value": value, "seed": 0, "config": config}
        records.append({**key, "l0": 8.0, "r2": 0.5, "r2_half": 0.4, "converged": converged, "tokens": 1000})
        sae_cls, cfg_cls = get_sae_class(arch)
        run = tmp_path / "runs" / f"{arch}-{value}"
        fields = {"group_rank": config["group_rank"], "n_active_groups": value} if arch == "sasa" else {"k": value}
        sae = sae_cls(cfg_cls(d_in=16, d_sae=24, **fields))
        with torch.no_grad():
            sae.W_enc.normal_()
            if arch == "sasa" and value == 2:  # group 0 of the unconverged run collapsed to one direction
                sae.W_dec[:4] = sae.W_dec[:1]
        sae.save_model(str(run))
        saes[key["line"]] = sae
        if value == 2:  # only this run has a saved half-budget twin
            sae.save_model(str(run / HALF_BUDGET_DIR))
        (run / "record.json").write_text(json.dumps({"key": key, "record": {}}))
    found = saved_runs(records, tmp_path / "runs", converged_only=False)
    assert len(found) == 3
    x = torch.randn(512, 16)
    rows = bench.group_rows(found, x)
    assert [(r["line"], r["budget"], r["tokens"]) for r in rows] == [
        ("sasa 2", "full", 1000), ("sasa 2", "half", 500), ("sasa 4", "full", 1000)]
    assert [r["nuclear_coefficient"] for r in rows] == [1.0, 1.0, 0.0]  # the config default, then the grid's
    # a record that holds its resolved training config is read from it, whatever the default is now
    assert bench.nuclear_coefficient_of({**records[0], "resolved_config": {"nuclear_coefficient": 0.1}}) == 0.1
    assert [r["r2"] for r in rows] == [0.5, 0.4, 0.5]
    for r in rows:
        sae = saes[r["line"]]
        live = sae.active_group_mask(x).any(0)
        sr = sae.group_stable_rank().double()
        assert r["live_stable_rank"] == pytest.approx(sr[live].mean().item())
        assert r["dead_groups"] == pytest.approx((~live).double().mean().item())
        assert len(r["quartiles"]) == bench.N_QUARTILES
        rates = [q["firing_rate"] for q in r["quartiles"]]
        assert rates == sorted(rates) and all(1.0 <= q["stable_rank"] <= r["group_rank"] + 1e-6 for q in r["quartiles"])
        assert math.isnan(r["dead_stable_rank"]) == (not bool((~live).any()))
    assert saes["sasa 2"].group_stable_rank()[0].item() == pytest.approx(1.0, abs=1e-5)
    md = bench.markdown("g", "h", rows, len(x), "cmd")
    assert md.count("| sasa 2 | 4 | 2 | 1 |") == 2 and "| **no** |" in md and "| sasa 4 | 2 | 4 | 0 |" in md
    with pytest.raises(ValueError, match="no sasa / sasa_batchtopk run among the 1 saved runs"):
        bench.group_rows(found[2:], x)


def test_scaffold_bench_rejects_only_without_ablations_before_any_work(tmp_path: Path, monkeypatch) -> None:
    bench = _bench("bench_scaffold_smollm2")
    argv = ["bench", "--grid", str(tmp_path / "missing.toml"), "--no-ablations", "--only", "scaffold r8"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit, match=r"--only picks the runs to ablate.*--only \['scaffold r8'\]"):
        bench.main()


def test_scaffold_bench_keeps_earlier_ablations_of_runs_not_saved_here() -> None:
    bench = _bench("bench_scaffold_smollm2")
    records = [
        _record("scaffold_batchtopk", "scaffold r8", 16, 15.0, 0.01),
        _record("scaffold_batchtopk", "scaffold r8", 32, 30.0, 0.02),
        _record("scaffold_batchtopk", "scaffold r8", 64, 61.0, 0.03),  # retrained: earlier row had L0 60
        _record("batchtopk", "batchtopk", 32, 30.0, 0.05),
    ]

    def row(k: int, l0: float, ratio: float, seed: int | None = 0) -> dict:
        r = {"line": "scaffold r8", "k": k, "l0": l0, "rank": 8, "ce_ratio_scaffold": ratio, "ce_ratio_pca": 1.2,
             "increase_ratio": 0.5, "kl_scaffold": 0.1, "kl_pca": 0.2, "pca_explained_variance": 0.3,
             "angles_deg": [10.0], "angle_median": 10.0}
        return r if seed is None else {**r, "seed": seed}

    def rank(angles: dict) -> dict:
        return {"explained_variance_all": 0.9, "explained_variance_without_massive": 0.3,
                "max_angle_between_bases_deg": 80.0, "ce_ratio_pca_without_massive": 1.1,
                "kl_pca_without_massive": 0.1, "scaffold_angles_deg": angles}

    new = [row(32, 30.0, 1.5)]
    new_massive = {"tokens": 9, "massive": 1, "by_rank": {8: rank({"scaffold r8 k=32": [5.0]})}}
    earlier = {
        "eval_tokens": 8192,
        "scaffold_ablations": [row(16, 15.0, 1.1, seed=None), row(32, 30.0, 9.9), row(64, 60.0, 9.9)],
        "pca_without_massive_tokens": {"tokens": 9, "massive": 1, "by_rank": {
            "8": rank({"scaffold r8 k=16": [7.0], "scaffold r8 k=32": [9.0], "scaffold r8 k=64": [9.0]}),
            "24": rank({"scaffold r24 k=32": [8.0]})}},
    }
    abl, massive = bench.keep_earlier_ablations(new, new_massive, earlier, records, 8192)
    # k 16 kept (seedless row = seed 0), k 32 from this call, k 64 dropped (its L0 no longer matches)
    assert [(a["k"], a["ce_ratio_scaffold"], a.get("earlier", False)) for a in abl] == [(16, 1.1, True), (32, 1.5, False)]
    assert massive is not None and list(massive["by_rank"]) == [8, 24]
    assert massive["by_rank"][8]["scaffold_angles_deg"] == {"scaffold r8 k=16": [7.0], "scaffold r8 k=32": [5.0]}
    assert massive["by_rank"][24]["scaffold_angles_deg"] == {}
    md = bench.markdown("g", "h", [], abl, records, "g.png", massive)
    assert "1 of these rows come from the earlier report" in md
    assert "Not ablated (no saved SAE under the sweep's `--out`): scaffold r8 k=64 seed 0." in md
    # measured on other held-out tokens, or no earlier report: nothing is kept
    assert bench.keep_earlier_ablations(new, new_massive, {**earlier, "eval_tokens": 16384}, records, 8192) == (new, new_massive)
    assert bench.keep_earlier_ablations(new, new_massive, None, records, 8192) == (new, new_massive)
