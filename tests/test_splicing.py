"""Splicing, error-node ablation and subspace removal (:mod:`sae_ext.interventions`) on both model classes: a tiny
``HookedSAETransformer`` and a tiny ``SAETransformerBridge`` (a randomly initialised GPT-2
built in-process with a word-level tokenizer: no download), plus plain ``HookedTransformer``
for the hook-based fallback."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import HookedSAETransformer, SAETransformerBridge, StandardSAE, StandardSAEConfig
from transformer_lens.hook_points import HookPoint

from sae_ext.interventions import (
    ablate_hook,
    dark_matter_ce,
    error_node_ablation,
    mean_sae_error,
    remove_directions_ce,
    run_spliced,
    splice_ce,
)
from sae_ext.metrics.pca import top_pca_basis
from sae_ext.model_io import as_token_tensor, iter_activations, resolve_hook_name
from sae_ext.saelens_evals import loss_recovered
from sae_ext.testing import random_token_dataset, tiny_hooked_transformer
from sae_ext.testing import tiny_bridge as tiny_bridge_model

HOOK = "blocks.0.hook_resid_post"
D_MODEL, D_VOCAB = 32, 97


@pytest.fixture(scope="module")
def tiny_bridge() -> SAETransformerBridge:
    return tiny_bridge_model()


@pytest.fixture(scope="module")
def tiny_sae_model() -> HookedSAETransformer:
    return tiny_hooked_transformer(cls=HookedSAETransformer)  # type: ignore[return-value]


@pytest.fixture(params=["hooked_sae", "bridge"])
def model(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(
        {"hooked_sae": "tiny_sae_model", "bridge": "tiny_bridge"}[request.param]
    )


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, D_VOCAB, (6, 12), generator=g)


def _sae(hook: str = HOOK, d_in: int = D_MODEL, seed: int = 0, scale: float = 1.0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in))
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(d_in))
        sae.W_dec.mul_(scale)
    sae.cfg.metadata.hook_name = hook
    return sae


def _ce(logits: torch.Tensor, toks: torch.Tensor) -> float:
    """Mean next-token cross-entropy, independently of the code under test."""
    lp = logits[:, :-1].log_softmax(-1)
    return float(-lp.gather(-1, toks[:, 1:, None]).mean())


@torch.no_grad()
def _replace(model: Any, toks: torch.Tensor, fn) -> torch.Tensor:
    """Logits with the activation at HOOK replaced by ``fn(activation)``."""
    hook = resolve_hook_name(model, HOOK)
    return model.run_with_hooks(
        toks, return_type="logits", fwd_hooks=[(hook, lambda a, hook: fn(a))]
    )


def _sae_out(sae: StandardSAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.decode(sae.encode(x))


# ---------------------------------------------------------------------------------------------


def test_bridge_fixture_is_offline_and_hooked(tiny_bridge):
    assert isinstance(tiny_bridge, SAETransformerBridge)
    assert resolve_hook_name(tiny_bridge, HOOK) == "blocks.0.hook_out"
    acts = next(iter_activations(tiny_bridge, HOOK, torch.ones(2, 5, dtype=torch.long)))
    assert acts.shape == (10, D_MODEL)


def _check_error_term_reproduces_clean(model: Any, tokens: torch.Tensor) -> None:
    sae = _sae()
    clean = model(tokens)
    spliced = run_spliced(model, sae, tokens, use_error_term=True)
    torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=0)
    plain = run_spliced(model, sae, tokens, use_error_term=False)
    assert (plain - clean).abs().max() > 1e-3
    # the model is left as it was: no SAE attached, same logits
    assert not getattr(model, "acts_to_saes", {})
    torch.testing.assert_close(model(tokens), clean)


def test_error_term_reproduces_clean_logits(model, tokens):
    _check_error_term_reproduces_clean(model, tokens)


def test_error_term_reproduces_clean_logits_plain_hooked_transformer(tiny_model, tokens):
    """A plain HookedTransformer has no add_sae: the hook-based fallback does the splice."""
    _check_error_term_reproduces_clean(tiny_model, tokens)


def test_bridge_hook_point_still_fires_after_splice(tiny_bridge, tokens):
    """SAELens's bridge reset installs a renamed HookPoint that run_with_hooks then ignores;
    the splice must leave the original hook point (and its hooks) working."""
    run_spliced(tiny_bridge, _sae(), tokens)
    fired: list[int] = []
    tiny_bridge.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.hook_out", lambda a, hook: fired.append(1))]
    )
    assert fired == [1]
    assert tiny_bridge.blocks[0].hook_out.name == "blocks.0.hook_out"


def test_zero_error_ablation_moves_ce_to_plain_splice(model, tokens):
    sae = _sae()
    res = error_node_ablation(model, sae, tokens, "zero", batch_size=4, progress=False)
    assert res.ce_spliced == pytest.approx(res.ce_clean, abs=1e-5)
    assert res.max_abs_logit_diff_spliced < 1e-4
    assert abs(res.ce_sae - res.ce_clean) > 1e-4  # the SAE does change the model
    # zero-ablating the error node turns the error-term splice into the plain splice
    assert res.ce_ablated == pytest.approx(res.ce_sae, abs=1e-6)
    assert res.kl_ablated_vs_sae == pytest.approx(0.0, abs=1e-6)
    assert res.kl_ablated_vs_clean == pytest.approx(res.kl_sae_vs_clean, abs=1e-6)
    assert res.kl_ablated_vs_clean > 0
    assert res.delta_ce_vs_clean == pytest.approx(res.ce_ablated - res.ce_clean)
    assert res.n_tokens == tokens.shape[0] * (tokens.shape[1] - 1)


def test_mean_error_ablation_matches_manual_hook(model, tokens):
    sae = _sae()
    mean_err = mean_sae_error(model, sae, tokens, progress=False)
    acts = torch.cat(list(iter_activations(model, HOOK, tokens)))
    torch.testing.assert_close(mean_err, (acts - _sae_out(sae, acts)).mean(0), atol=1e-5, rtol=1e-5)
    res = error_node_ablation(model, sae, tokens, "mean", progress=False)
    manual = _replace(model, tokens, lambda a: _sae_out(sae, a) + mean_err)
    assert res.ce_ablated == pytest.approx(_ce(manual, tokens), abs=1e-5)
    assert res.ce_ablated != pytest.approx(res.ce_sae, abs=1e-6)  # not the zero ablation


def test_fallback_hooks_match_add_sae(tiny_sae_model, tiny_model, tokens):
    torch.testing.assert_close(tiny_sae_model(tokens), tiny_model(tokens))  # same weights
    sae = _sae()
    a = error_node_ablation(tiny_sae_model, sae, tokens, "zero", progress=False)
    b = error_node_ablation(tiny_model, sae, tokens, "zero", progress=False)
    for key in ("ce_clean", "ce_spliced", "ce_sae", "ce_ablated", "kl_ablated_vs_clean"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), abs=1e-5)
    ha = ablate_hook(tiny_sae_model, sae, tokens, "hook_sae_acts_post", progress=False)
    hb = ablate_hook(tiny_model, sae, tokens, "hook_sae_acts_post", progress=False)
    assert ha.ce_ablated == pytest.approx(hb.ce_ablated, abs=1e-5)


def test_splice_modes_exact_cases(model, tokens):
    sae = _sae()
    clean_ce = _ce(model(tokens), tokens)
    assert splice_ce(model, sae, tokens, mode="clean", progress=False) == pytest.approx(
        clean_ce, abs=1e-6
    )
    sae_ce = _ce(_replace(model, tokens, lambda a: _sae_out(sae, a)), tokens)
    assert splice_ce(model, sae, tokens, mode="sae", batch_size=4, progress=False) == pytest.approx(
        sae_ce, abs=1e-5
    )
    # with W = 0 the linear error is 0: SAE(x)+linear = SAE(x), SAE(x)+nonlinear = x
    W0 = torch.zeros(D_MODEL, D_MODEL, dtype=torch.float64)
    res = dark_matter_ce(model, sae, tokens, W0, progress=False)
    assert res.ce_clean == pytest.approx(clean_ce, abs=1e-6)
    assert res.ce_sae == pytest.approx(sae_ce, abs=1e-5)
    assert res.ce_sae_linear == pytest.approx(res.ce_sae, abs=1e-6)
    assert res.ce_sae_nonlinear == pytest.approx(res.ce_clean, abs=1e-5)
    assert res.pct_recovered_linear == pytest.approx(0.0, abs=1e-3)
    assert res.pct_recovered_nonlinear == pytest.approx(100.0, abs=0.5)
    # with an intercept-only W (= the mean error), SAE(x) + linear error adds that constant
    W_b = torch.zeros(D_MODEL + 1, D_MODEL, dtype=torch.float64)
    W_b[-1] = torch.linspace(-0.2, 0.2, D_MODEL).double()
    lin = splice_ce(model, sae, tokens, mode="sae+linear", W=W_b, progress=False)
    manual = _replace(model, tokens, lambda a: _sae_out(sae, a) + W_b[-1].float())
    assert lin == pytest.approx(_ce(manual, tokens), abs=1e-5)


def test_ablate_hook_matches_manual_replacement(model, tokens):
    sae = _sae()
    # zeroing the latents without the error term leaves b_dec everywhere
    res = ablate_hook(
        model, sae, tokens, "hook_sae_acts_post", use_error_term=False, progress=False
    )
    manual = _replace(model, tokens, lambda a: sae.b_dec.detach().expand_as(a).clone())
    assert res.ce_ablated == pytest.approx(_ce(manual, tokens), abs=1e-5)
    # with the error term the model sees x - (SAE(x) - b_dec)
    res = ablate_hook(model, sae, tokens, "hook_sae_acts_post", use_error_term=True, progress=False)
    manual = _replace(model, tokens, lambda a: a - (_sae_out(sae, a) - sae.b_dec.detach()))
    assert res.ce_ablated == pytest.approx(_ce(manual, tokens), abs=1e-5)
    assert res.ce_spliced == pytest.approx(res.ce_clean, abs=1e-5)
    assert res.ce_ratio == pytest.approx(res.ce_ablated / res.ce_clean)


class _ScaffoldStandIn(StandardSAE):
    """A built-in SAE with a ``hook_scaffold`` on its decoder bias path (``x̂ = f W_dec + s``)."""

    def __init__(self, cfg: StandardSAEConfig) -> None:
        super().__init__(cfg)
        self.hook_scaffold = HookPoint()
        self.setup()

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        s = self.hook_scaffold(self.b_dec.expand(*feature_acts.shape[:-1], -1))
        out = self.hook_sae_recons(feature_acts @ self.W_dec + s)
        return self.run_time_activation_norm_fn_out(out)


def test_scaffold_hook_ablation_and_pca_removal(model, tokens):
    torch.manual_seed(0)
    sae = _ScaffoldStandIn(StandardSAEConfig(d_in=D_MODEL, d_sae=2 * D_MODEL))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_MODEL))
    sae.cfg.metadata.hook_name = HOOK
    res = ablate_hook(model, sae, tokens, "hook_scaffold", progress=False)
    manual = _replace(model, tokens, lambda a: a - sae.b_dec.detach())  # x - s
    assert res.ce_ablated == pytest.approx(_ce(manual, tokens), abs=1e-5)

    acts = torch.cat(list(iter_activations(model, HOOK, tokens)))
    pca = top_pca_basis(acts, 3)
    rem = remove_directions_ce(model, HOOK, pca.basis, tokens, progress=False)
    q = pca.basis.float()
    manual = _replace(model, tokens, lambda a: a - (a @ q) @ q.T)
    assert rem.ce_removed == pytest.approx(_ce(manual, tokens), abs=1e-5)
    assert rem.rank == 3 and rem.ce_ratio == pytest.approx(rem.ce_removed / rem.ce_clean)


def test_removing_every_direction_is_zero_ablation(model, tokens):
    basis = torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(3))
    rem = remove_directions_ce(model, HOOK, basis, tokens, progress=False)  # QR-orthonormalised
    zero = _replace(model, tokens, lambda a: torch.zeros_like(a))
    assert rem.ce_removed == pytest.approx(_ce(zero, tokens), abs=1e-4)
    with pytest.raises(ValueError, match="linearly dependent"):
        remove_directions_ce(model, HOOK, torch.ones(D_MODEL, 2), tokens, progress=False)
    with pytest.raises(
        ValueError, match=r"basis has shape \(5, 2\) but the activation width is 32"
    ):
        remove_directions_ce(model, HOOK, torch.randn(5, 2), tokens, progress=False)


def test_top_pca_basis_recovers_axes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 5, generator=g) * torch.tensor([5.0, 0.1, 3.0, 0.2, 1.0]) + 7.0
    pca = top_pca_basis([x[:1000], x[1000:]], 2)
    assert pca.basis.shape == (5, 2)
    assert pca.basis[:, 0].abs().argmax().item() == 0 and pca.basis[:, 1].abs().argmax().item() == 2
    torch.testing.assert_close(pca.basis.T @ pca.basis, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(
        pca.mean, torch.full((5,), 7.0, dtype=torch.float64), atol=0.2, rtol=0
    )
    assert 0.95 < float(pca.explained_variance_ratio.sum()) < 1.0


def test_loss_recovered_wraps_run_evals(model, tokens):
    sae = _sae()
    m = loss_recovered(model, sae, tokens, batch_size_prompts=3)
    for v in (m.ce_loss_score, m.kl_div_score, m.explained_variance, m.l0, m.ce_loss_with_sae):
        assert isinstance(v, float) and v == v  # computed (not NaN)
    # same tokens (2 batches of 3 rows) as our own splices
    assert m.ce_loss_without_sae == pytest.approx(
        splice_ce(model, sae, tokens, mode="clean", progress=False), abs=1e-4
    )
    assert m.ce_loss_with_sae == pytest.approx(
        splice_ce(model, sae, tokens, mode="sae", progress=False), abs=1e-4
    )
    expected = (m.ce_loss_with_ablation - m.ce_loss_with_sae) / (
        m.ce_loss_with_ablation - m.ce_loss_without_sae
    )
    assert m.ce_loss_score == pytest.approx(expected)
    assert m.total_tokens_eval_reconstruction == tokens.numel()
    # 5 rows at batch size 3: run_evals reads every row once (5 batches of 1 row)
    m5 = loss_recovered(model, sae, tokens[:5], batch_size_prompts=3)
    assert m5.total_tokens_eval_reconstruction == tokens[:5].numel()
    assert m5.ce_loss_without_sae == pytest.approx(
        splice_ce(model, sae, tokens[:5], mode="clean", progress=False), abs=1e-4
    )


def test_unknown_hook_lists_close_names(model, tokens):
    with pytest.raises(
        ValueError,
        match=r"unknown hook name 'blocks\.0\.hook_resid_pst'.*blocks\.0\.hook_resid_post",
    ):
        resolve_hook_name(model, "blocks.0.hook_resid_pst")
    with pytest.raises(ValueError, match="closest valid names"):
        splice_ce(model, _sae(hook="blocks.0.hook_mlp_ot"), tokens, progress=False)


def test_input_validation(model, tokens):
    sae = _sae()
    with pytest.raises(
        ValueError, match=r"tokens must be 2-D \[batch, position\], got shape \(12,\)"
    ):
        splice_ce(model, sae, tokens[0], progress=False)
    with pytest.raises(ValueError, match="tokens must be integer ids"):
        splice_ce(model, sae, tokens.float(), progress=False)
    bad = tokens.clone()
    bad[0, 0] = D_VOCAB
    with pytest.raises(
        ValueError, match=r"token ids range over \[1, 97\] but must lie in \[0, 97\)"
    ):
        splice_ce(model, sae, bad, progress=False)
    with pytest.raises(ValueError, match="width 32 but the SAE's d_in is 16"):
        error_node_ablation(model, _sae(d_in=16), tokens, progress=False)
    with pytest.raises(ValueError, match="has no hook point 'hook_scafold'"):
        ablate_hook(model, sae, tokens, "hook_scafold", progress=False)
    with pytest.raises(ValueError, match=r"W has shape \(3, 32\)"):
        dark_matter_ce(model, sae, tokens, torch.zeros(3, D_MODEL), progress=False)
    with pytest.raises(ValueError, match="mode 'sae\\+linear' needs W"):
        splice_ce(model, sae, tokens, mode="sae+linear", progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        splice_ce(model, sae, tokens, mode="linear", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be 'zero' or 'mean'"):
        error_node_ablation(model, sae, tokens, "one", progress=False)  # type: ignore[arg-type]


def test_already_attached_sae_is_reported(tiny_sae_model, tokens):
    sae = _sae()
    tiny_sae_model.add_sae(sae)
    try:
        with pytest.raises(ValueError, match="already attached"):
            splice_ce(tiny_sae_model, sae, tokens, progress=False)
    finally:
        tiny_sae_model.reset_saes()


def test_as_token_tensor_sources():
    ds = random_token_dataset(n_rows=10, context_size=8)
    assert as_token_tensor(ds, n_tokens=20).shape == (3, 8)  # whole rows, rounded up
    ds.set_format("torch", columns=["input_ids"])
    torch.testing.assert_close(as_token_tensor(ds), torch.as_tensor(ds[:]["input_ids"]))
    assert as_token_tensor([[1, 2, 3]]).dtype == torch.long
    with pytest.raises(ValueError, match="asked for n_tokens = 81 but the data hold only 80"):
        as_token_tensor(ds, n_tokens=81)
    with pytest.raises(ValueError, match="needs an 'input_ids' or 'tokens' column"):
        as_token_tensor(ds.rename_column("input_ids", "ids"))


def test_iter_activations_drops_excluded_token_positions(tiny_sae_model) -> None:
    toks = torch.tensor([[5, 1, 2, 5], [3, 5, 4, 6]])
    full = torch.cat(list(iter_activations(tiny_sae_model, "blocks.0.hook_resid_post", toks)))
    kept = torch.cat(
        list(iter_activations(tiny_sae_model, "blocks.0.hook_resid_post", toks, special_tokens=[5]))
    )
    assert full.shape[0] == 8 and kept.shape[0] == 5
    torch.testing.assert_close(kept, full[(toks.reshape(-1) != 5)])
