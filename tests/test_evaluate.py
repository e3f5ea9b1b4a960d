"""``evaluate_sae`` end to end on a tiny model and tiny SAEs, and the ``sae-ext eval`` entry points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
from sae_lens.registry import get_sae_class
from transformer_lens.hook_points import HookPoint

from sae_ext.evaluate import add_eval_arguments, evaluate_sae, run_eval_command
from sae_ext.evaluation_spec import EvaluationSpec
from sae_ext.metrics.groups import stable_rank
from sae_ext.testing import random_token_dataset, tiny_hooked_transformer

HOOK = "blocks.0.hook_resid_post"
N_TOKENS = 96  # 6 rows of 16


@pytest.fixture(scope="module")
def model() -> HookedSAETransformer:
    return tiny_hooked_transformer(cls=HookedSAETransformer)  # type: ignore[return-value]


def _sae(seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.context_size = 16
    return sae


class _ScaffoldStandIn(StandardSAE):
    """A built-in SAE with a ``hook_scaffold`` on its decoder bias path, declared to the
    evaluation through ``evaluation_spec`` (no PCA rank: the test passes ``pca_rank``)."""

    def __init__(self, cfg: StandardSAEConfig) -> None:
        super().__init__(cfg)
        self.hook_scaffold = HookPoint()
        self.setup()

    def evaluation_spec(self) -> EvaluationSpec:
        return EvaluationSpec(ablation_hook="hook_scaffold")

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        s = self.hook_scaffold(self.b_dec.expand(*feature_acts.shape[:-1], -1))
        return self.hook_sae_recons(feature_acts @ self.W_dec + s)


def test_evaluate_sae_writes_json_and_markdown(model, tmp_path):
    out = tmp_path / "eval"
    res = evaluate_sae(
        _sae(), model, random_token_dataset(), n_tokens=N_TOKENS, out_dir=out, progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "firing_rate_hist.png"]
    on_disk = json.loads((out / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk == res.to_dict()
    assert res.n_tokens == N_TOKENS and res.sae.hook_name == HOOK and res.n_special_positions == 0
    ev = res.run_evals
    for v in (ev.ce_loss_score, ev.kl_div_score, ev.explained_variance, ev.l0):
        assert isinstance(v, float) and v == v
    assert res.dark_matter.n_train + res.dark_matter.n_test == N_TOKENS
    assert res.dictionary.n_tokens == N_TOKENS
    # L0 from our own counters agrees with SAELens's run_evals on the same tokens
    assert res.dictionary.l0 == pytest.approx(ev.l0, rel=1e-5)
    assert res.error_node_ablation is not None and res.dark_matter_ce is not None
    zero = res.error_node_ablation["zero"]
    assert zero.ce_spliced == pytest.approx(zero.ce_clean, abs=1e-5)
    assert zero.ce_ablated == pytest.approx(zero.ce_sae, abs=1e-6)
    assert res.dark_matter_ce.ce_sae == pytest.approx(zero.ce_sae, abs=1e-6)
    assert res.error_node_ablation["mean"].mode == "mean"
    assert res.scaffold is None
    md = (out / "eval.md").read_text()
    assert "## Dark matter" in md and "## Error-node ablation" in md and "Scaffold" not in md
    assert (out / "firing_rate_hist.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_sae_scaffold_section(model, tmp_path):
    torch.manual_seed(0)
    sae = _ScaffoldStandIn(StandardSAEConfig(d_in=32, d_sae=64))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(32))
    sae.cfg.metadata.hook_name = HOOK
    res = evaluate_sae(
        sae,
        model,
        random_token_dataset(),
        n_tokens=N_TOKENS,
        pca_rank=2,
        out_dir=tmp_path,
        progress=False,
    )
    sc = res.scaffold
    assert sc is not None and sc.pca_rank == 2 and sc.pca_removal is not None
    assert sc.ablation.sae_hook == "hook_scaffold"
    assert sc.pca_removal.rank == 2
    assert sc.ablation.ce_ablated != pytest.approx(sc.ablation.ce_clean, abs=1e-4)
    assert res.to_dict()["scaffold"]["increase_ratio_scaffold_vs_pca"] == pytest.approx(
        sc.ablation.ce_increase / sc.pca_removal.ce_increase
    )
    assert sc.principal_angles_deg is None  # the stand-in declares no subspace
    assert "Scaffold ablation vs top-r PCA removal" in (tmp_path / "eval.md").read_text()
    # the demo's table row reads the typed result by attribute and stays strict JSON
    from sae_ext.demo import summarize

    row = summarize("stand-in", "standard", res)
    json.dumps(row, allow_nan=False)
    assert row["scaffold_ce_ratio"] == sc.ablation.ce_ratio
    assert row["pca_removal_ce_ratio"] == sc.pca_removal.ce_ratio
    assert row["ce_loss_recovered"] == res.run_evals.ce_loss_score and row["d_sae"] == 64
    assert row["bipolar_fraction"] is None and row["group_rank90_counts"] is None


def test_scaffold_principal_angles_to_the_removed_pca_directions(model, tmp_path):
    """A scaffold spanning the eval activations' top-2 PCA directions sits at ~0°, one spanning
    their least-variance directions near 90°; the stand-in without a subspace reports none."""
    from sae_ext.metrics.pca import pca_directions
    from sae_ext.model_io import as_token_tensor

    toks = as_token_tensor(random_token_dataset(), n_tokens=N_TOKENS)
    _, cache = model.run_with_cache(toks, names_filter=HOOK)
    acts = cache[HOOK].reshape(-1, 32).double()
    basis = pca_directions(acts, 32)
    sae_cls, cfg_cls = get_sae_class("scaffold_jumprelu")
    angles = {}
    for name, q in (("top", basis[:, :2]), ("bottom", basis[:, -2:])):
        torch.manual_seed(0)
        sae = sae_cls(cfg_cls(d_in=32, d_sae=64, scaffold_rank=2))
        sae.cfg.metadata.hook_name = HOOK
        with torch.no_grad():
            sae.scaffold_V.copy_(q.float())
            sae.scaffold_U.copy_(q.float().T)
        res = evaluate_sae(
            sae, model, random_token_dataset(), n_tokens=N_TOKENS, out_dir=tmp_path / name,
            progress=False,
        )
        assert res.scaffold is not None and res.scaffold.pca_rank == 2
        assert "principal angles to top-2 PCA" in (tmp_path / name / "eval.md").read_text()
        angles[name] = res.scaffold.principal_angles_deg
        assert res.to_dict()["scaffold"]["principal_angles_deg_vs_pca"] == angles[name]
    assert len(angles["top"]) == 2 and max(angles["top"]) < 0.1
    assert min(angles["bottom"]) > 80.0


def test_evaluation_spec_subspace_needs_its_hook():
    with pytest.raises(ValueError, match="ablation_subspace"):
        EvaluationSpec(ablation_subspace=torch.eye(4)[:, :2])
    with pytest.raises(ValueError, match="ablation_subspace"):
        EvaluationSpec(ablation_hook="hook_scaffold", ablation_subspace=torch.ones(4))
    with pytest.raises(ValueError, match="finite"):
        EvaluationSpec(ablation_hook="hook_scaffold", ablation_subspace=torch.full((4, 2), float("nan")))


@pytest.mark.parametrize("arch", ["scaffold_jumprelu", "sasa", "sasa_jumprelu", "sign_aware_gated"])
def test_evaluate_registered_plugin_sae(model, arch):
    """The plugin architectures, at their default configs and random weights."""
    try:
        sae_cls, cfg_cls = get_sae_class(arch)
    except (KeyError, ValueError):
        pytest.skip(f"{arch} is not registered")
    torch.manual_seed(0)
    sae = sae_cls(cfg_cls(d_in=32, d_sae=64))
    sae.cfg.metadata.hook_name = HOOK
    res = evaluate_sae(sae, model, random_token_dataset(), n_tokens=N_TOKENS, progress=False)
    assert res.error_node_ablation is not None
    zero = res.error_node_ablation["zero"]
    assert zero.ce_spliced == pytest.approx(zero.ce_clean, abs=1e-5)
    assert zero.ce_ablated == pytest.approx(zero.ce_sae, abs=1e-6)
    if arch == "scaffold_jumprelu":
        assert res.scaffold is not None and res.scaffold.pca_rank == sae.cfg.scaffold_rank
    else:
        assert res.scaffold is None
    if arch in ("sasa", "sasa_jumprelu"):
        assert res.dictionary.group_rank == sae.cfg.group_rank
        # the ranks of the blocks decode() uses (unit rows), not a re-derived decoder
        blocks = sae.group_decoder_blocks().detach()
        torch.testing.assert_close(res.dictionary.group_stable_rank, stable_rank(blocks))
    else:
        assert res.dictionary.group_rank is None


def test_evaluate_validates_before_writing(model, tmp_path):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        evaluate_sae(
            _sae(), model, random_token_dataset(), n_tokens=N_TOKENS, out_dir=a_file, progress=False
        )
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"asked for n_tokens = 2000 but the data hold only 1024"):
        evaluate_sae(
            _sae(), model, random_token_dataset(), n_tokens=2000, out_dir=out, progress=False
        )
    with pytest.raises(ValueError, match="unknown hook name 'blocks.9.hook_resid_post'"):
        evaluate_sae(
            _sae(),
            model,
            random_token_dataset(),
            n_tokens=N_TOKENS,
            hook_name="blocks.9.hook_resid_post",
            out_dir=out,
            progress=False,
        )
    with pytest.raises(ValueError, match="n_tokens must be an integer >= 2"):
        evaluate_sae(_sae(), model, random_token_dataset(), n_tokens=0, out_dir=out, progress=False)
    assert not out.exists()


def test_cli_entry_points(model, tmp_path, monkeypatch):
    sae_dir = tmp_path / "sae"
    _sae().save_model(sae_dir)
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(sae_dir), "--tokens", str(N_TOKENS), "--batch-size", "3"])
    assert args.out is None and args.hook is None

    calls: dict[str, object] = {}

    def fake_dataset(tokenizer, context_size, n_tokens=None, split="train"):
        calls.update(context_size=context_size, n_tokens=n_tokens, split=split)
        return random_token_dataset(n_rows=8, context_size=context_size)

    monkeypatch.setattr("sae_ext.models.load_default_model", lambda: model)
    monkeypatch.setattr("sae_ext.data.default_token_dataset", fake_dataset)
    assert run_eval_command(args) == 0
    assert calls == {"context_size": 16, "n_tokens": N_TOKENS, "split": "eval"}
    res = json.loads((sae_dir / "eval" / "eval.json").read_text())
    assert res["n_tokens"] == N_TOKENS and res["sae"]["architecture"] == "standard"

    with pytest.raises(ValueError, match="is not a saved SAE folder"):
        run_eval_command(parser.parse_args([str(tmp_path / "missing")]))
    with pytest.raises(ValueError, match="--tokens must be >= 2"):
        run_eval_command(parser.parse_args([str(sae_dir), "--tokens", "1"]))


def test_out_dir_default_is_inside_sae_dir():
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["some/sae", "--out", "x", "--hook", HOOK])
    assert args.out == Path("x") and args.hook == HOOK and args.tokens > 0


def test_evaluate_without_splices_skips_the_extra_model_passes(model, tmp_path):
    full = evaluate_sae(_sae(), model, random_token_dataset(), n_tokens=N_TOKENS, progress=False)
    light = evaluate_sae(
        _sae(), model, random_token_dataset(), n_tokens=N_TOKENS, out_dir=tmp_path, splices=False,
        progress=False,
    )
    assert light.error_node_ablation is None and light.dark_matter_ce is None
    assert light.dark_matter.to_dict() == full.dark_matter.to_dict()
    assert light.run_evals == full.run_evals
    assert "Error-node ablation" not in (tmp_path / "eval.md").read_text()


def test_evaluate_on_a_bridge_excludes_the_tokenizers_special_tokens():
    """On an SAETransformerBridge with a tokenizer (BOS = EOS = PAD = 0) the special ids come
    from the tokenizer by default: BOS positions are uncounted and the CE figures are SAELens
    ``run_evals``'s on the same rows."""
    from sae_ext.saelens_evals import loss_recovered
    from sae_ext.testing import tiny_bridge

    bridge = tiny_bridge()
    toks = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    toks[:, 0] = 0
    toks[1, 6] = 0
    sae = _sae()
    res = evaluate_sae(sae, bridge, toks, n_tokens=toks.numel(), batch_size=2, progress=False)
    assert res.sae.hook_name == "blocks.0.hook_out" and res.n_special_positions == 5
    assert sae.cfg.metadata.hook_name == HOOK  # the alias reached SAELens without mutating the SAE
    assert res.dictionary.n_tokens == toks.numel() - 5
    assert res.dark_matter.n_train + res.dark_matter.n_test == toks.numel() - 5
    ref = loss_recovered(bridge, _sae(), toks, batch_size_prompts=2)
    for name in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_with_sae"):
        assert getattr(res.run_evals, name) == pytest.approx(getattr(ref, name), abs=1e-5), name
    assert res.error_node_ablation is not None
    assert res.error_node_ablation["zero"].max_abs_logit_diff_spliced < 1e-4
