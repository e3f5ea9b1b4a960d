import json
import subprocess
import sys
from pathlib import Path

import pytest
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

from sae_ext.cli import main


@pytest.mark.parametrize("arch", sorted(SAE_TRAINING_CLASS_REGISTRY))
def test_train_help_works_for_every_registered_architecture(arch: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--architecture", arch, "--help"])
    assert exit_.value.code == 0
    assert "--architecture" in capsys.readouterr().out


def test_python_dash_m_is_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "sae_ext", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "train" in out.stdout


def test_demo_on_a_tiny_budget_writes_the_report(tmp_path: Path, capsys) -> None:
    args = ["demo", "--capture-tokens", "1024", "--tokens", "2048", "--width", "64", "--k", "8", "--eval-tokens", "256",
            "--batch-size", "256", "--out", str(tmp_path)]
    main(args)
    report = json.loads((tmp_path / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert {"gated@2H", "batchtopk", "sign_aware_gated@H", "scaffold_batchtopk", "topk", "sasa"} == set(names)
    for row in report["rows"]:
        assert 0 <= row["dead_fraction"] <= 1
        assert row["ce_sae"] > 0 and row["ce_clean"] > 0
        # the convergence check's half-budget twin is a run of its own (SPEC §8)
        half = json.loads((Path(row["path"]) / "half_budget" / "sae_ext_protocol.json").read_text())
        assert half["training_tokens"] == 1024 and row["r2_half"] is not None
    assert (tmp_path / "report.md").read_text().count("|") > 20
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "CE without SAE" in capsys.readouterr().out
    # the capture sits where benchmarks sharing it look for it
    from sae_ext.demo import capture_dir

    n_rows = report["captured_tokens"] // report["args"]["context_size"]
    assert capture_dir(tmp_path / "activations", report["hook"], report["args"]["context_size"], n_rows).is_dir()
    # `sae-ext eval` on a trained plugin SAE, with every splice, on the embedded model
    sasa = next(r for r in report["rows"] if r["name"] == "sasa")
    main(["eval", sasa["path"], "--tokens", "256", "--out", str(tmp_path / "eval"),
          "--probes", "--probe-per-class", "6", "--absorption-words", "60"])
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["sae"]["architecture"] == "sasa"
    probes = json.loads((tmp_path / "eval" / "probes.json").read_text())
    assert {"k_sparse_probing", "absorption"} <= set(probes)
    zero = evaluated["error_node_ablation"]["zero"]
    assert zero["ce_spliced"] == pytest.approx(zero["ce_clean"], abs=1e-3)


def test_demo_rejects_bad_arguments_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--width"):
        main(["demo", "--width", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="unknown demo entries"):
        main(["demo", "--only", "nope", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--probe-per-class must be >= 1"):
        main(["eval", str(tmp_path), "--probe-per-class", "0"])
    with pytest.raises(ValueError, match="--absorption-words must be >= 53"):
        main(["eval", str(tmp_path), "--absorption-words", "40"])


def test_demo_l1_coefficient_reaches_gated_and_sa_gsae_uses_its_l0_coefficient() -> None:
    from sae_ext.demo import demo_entries

    gated = [e.config(64, 32) for e in demo_entries(l1_coefficient=3.0) if "gated" in e.architecture]
    assert [c.architecture() for c in gated] == ["gated", "sign_aware_gated"]
    assert gated[0].l1_coefficient == 3.0
    assert gated[1].l0_coefficient == 1.0 and not hasattr(gated[1], "l1_coefficient")  # SA-GSAE v2: L0
    with pytest.raises(ValueError, match="--l1-coefficient must be >= 0, got -1"):
        demo_entries(l1_coefficient=-1.0)


def test_capture_dir_names_model_hook_and_size_and_rejects_bad_values(tmp_path: Path) -> None:
    from sae_ext.demo import capture_dir
    from sae_ext.models import DEFAULT_MODEL_NAME

    path = capture_dir(tmp_path, "blocks.15.hook_mlp_out", 128, 468)
    assert path == tmp_path / f"{DEFAULT_MODEL_NAME}_blocks_15_hook_mlp_out_128_468"
    assert capture_dir(tmp_path, "blocks.15.hook_attn_out", 128, 468) != path
    for bad in [dict(hook=""), dict(hook="a/b"), dict(context_size=0), dict(n_rows=-1), dict(n_rows=2.5)]:
        kw = {"hook": "blocks.15.hook_mlp_out", "context_size": 128, "n_rows": 468, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            capture_dir(tmp_path, **kw)
