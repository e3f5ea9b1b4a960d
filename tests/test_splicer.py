"""The evaluation engine (:class:`sae_ext.splicer.Splicer`): model forwards per batch, every
measurement of ``evaluate_sae`` against a plain ``run_with_hooks`` reference written here, and
SPEC §8 on a tiny model whose BOS activation is a huge outlier: no splice touches a BOS
position and no statistic sees one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import HookedSAETransformer
from sae_lens.registry import get_sae_class

from sae_ext.evaluate import evaluate_sae
from sae_ext.interventions import (
    ERROR_TERM,
    SAE,
    ZERO_ABLATION,
    error_ablation,
    hook_ablation,
    linear_error_splice,
    nonlinear_error_splice,
    subspace_removal,
)
from sae_ext.metrics.dark_matter import dark_matter_from_reconstructions, linear_error
from sae_ext.metrics.dictionary import dictionary_stats_from_codes
from sae_ext.metrics.pca import orthonormal_basis
from sae_ext.model_io import special_token_ids
from sae_ext.sae_io import encode_decode
from sae_ext.saelens_evals import loss_recovered
from sae_ext.splicer import Intervention, Splicer
from sae_ext.testing import tiny_hooked_transformer

HOOK = "blocks.0.hook_resid_post"
NEXT = "blocks.1.hook_resid_pre"  # what flows on from HOOK
BOS, D, D_VOCAB = 0, 32, 97


@pytest.fixture(scope="module")
def model() -> HookedSAETransformer:
    """A tiny HookedSAETransformer whose BOS embedding row is 1000× the others: the BOS
    activation at HOOK is a huge outlier, as SmolLM2's attention sink."""
    m = tiny_hooked_transformer(cls=HookedSAETransformer)
    with torch.no_grad():
        m.embed.W_E[BOS] *= 1000.0
    return m  # type: ignore[return-value]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """12 rows of 16: BOS first in every row and once more mid-row in every other row."""
    g = torch.Generator().manual_seed(5)
    toks = torch.randint(1, D_VOCAB, (12, 16), generator=g)
    toks[:, 0] = BOS
    toks[::2, 9] = BOS
    return toks


@pytest.fixture(scope="module")
def sae() -> Any:
    """A scaffolded SAE (registered ``scaffold_jumprelu``) with a non-zero rank-3 scaffold."""
    sae_cls, cfg_cls = get_sae_class("scaffold_jumprelu")
    torch.manual_seed(0)
    s = sae_cls(cfg_cls(d_in=D, d_sae=2 * D, scaffold_rank=3))
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(D, 3))
        s.scaffold_V.copy_(q)
        s.scaffold_U.copy_(0.5 * q.T)
        s.b_dec.copy_(0.1 * torch.randn(D))
    s.cfg.metadata.hook_name = HOOK
    return s


def _bos(toks: torch.Tensor) -> torch.Tensor:
    return toks == BOS


@torch.no_grad()
def _acts(model: Any, toks: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    return cache[HOOK]


@torch.no_grad()
def _replaced(model: Any, toks: torch.Tensor, fn, everywhere: bool = False) -> torch.Tensor:
    """Reference: logits with the activation at HOOK replaced by ``fn(x)`` at non-BOS positions."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        new = fn(act)
        return new if everywhere else torch.where(_bos(toks)[..., None], act, new)

    return model.run_with_hooks(toks, return_type="logits", fwd_hooks=[(HOOK, hook)])


def _ce(logits: torch.Tensor, toks: torch.Tensor) -> float:
    """Reference CE: mean next-token NLL over positions whose input token is not BOS."""
    lp = logits.double().log_softmax(-1)[:, :-1]
    nll = -lp.gather(-1, toks[:, 1:, None])[..., 0]
    return float(nll[~_bos(toks)[:, :-1]].mean())


def _kl(ref: torch.Tensor, new: torch.Tensor, toks: torch.Tensor) -> float:
    p, q = ref.double().log_softmax(-1), new.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    return float(kl[~_bos(toks)].mean())


def _sae_out(sae: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.decode(sae.encode(x))


def test_fixture_bos_is_a_huge_outlier(model, tokens):
    norms = _acts(model, tokens).norm(dim=-1)
    assert norms[_bos(tokens)].min() > 50 * norms[~_bos(tokens)].max()


def test_special_token_sources(model):
    from sae_ext.testing import tiny_bridge

    assert special_token_ids(model) == ()  # no tokenizer: nothing to exclude by default
    assert special_token_ids(model, [3, BOS, 3]) == (BOS, 3)
    bridge = tiny_bridge()
    assert special_token_ids(bridge) == (0,)  # its tokenizer's BOS/EOS/PAD
    assert special_token_ids(model, bridge.tokenizer) == (0,)  # a tokenizer as the source
    with pytest.raises(ValueError, match=r"special token id 97 is not a token id in \[0, 97\)"):
        special_token_ids(model, [97])
    with pytest.raises(ValueError, match="special token id 'a'"):
        special_token_ids(model, ["a"])
    with pytest.raises(ValueError, match="special_tokens must be None, a tokenizer or an iterable"):
        special_token_ids(model, "bos")


def test_forwards_per_batch_of_a_full_scaffold_evaluation(model, tokens, sae):
    """Count model forwards (full or stopped at the hook) of ``evaluate_sae`` with every splice:
    the per-batch count is the difference between 3 and 2 batches."""
    calls = [0]
    handle = model.embed.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    counts = []
    try:
        for rows in (8, 12):
            calls[0] = 0
            evaluate_sae(sae, model, tokens[:rows], n_tokens=rows * 16, batch_size=4,
                         special_tokens=[BOS], progress=False)  # fmt: skip
            counts.append(calls[0])
    finally:
        handle.remove()
    per_batch = counts[1] - counts[0]
    assert 3 <= per_batch <= 12, counts


def test_evaluate_sae_matches_plain_run_with_hooks_references(model, tokens, sae):
    """Every CE/KL of a full scaffold evaluation equals an independent splice written here
    (special positions unspliced and uncounted), to 1e-5; loss recovered equals SAELens's
    ``run_evals`` on the same rows."""
    res = evaluate_sae(sae, model, tokens, n_tokens=tokens.numel(), batch_size=4,
                       special_tokens=[BOS], progress=False)  # fmt: skip
    bos = _bos(tokens)
    assert res.n_special_positions == int(bos.sum())
    x = _acts(model, tokens)
    clean = model(tokens)
    plain = _replaced(model, tokens, lambda a: _sae_out(sae, a))
    W = res.dark_matter.W
    flat = x[~bos]
    mean_err = (flat - _sae_out(sae, flat)).double().mean(0).float()
    cov = torch.cov(flat.double().T, correction=0)
    q = torch.linalg.eigh(cov)[1][:, -3:].float()  # top-3 PCA directions, any order and sign
    mu = flat.double().mean(0).float()  # PCA removal is centred and keeps the mean (SPEC §2)
    refs = {
        "clean": clean,
        "sae": plain,
        "zero": _replaced(model, tokens, torch.zeros_like, everywhere=True),
        "linear": _replaced(model, tokens, lambda a: _sae_out(sae, a) + linear_error(a, W)),
        "nonlinear": _replaced(model, tokens, lambda a: a - linear_error(a, W)),
        "error_term": _replaced(model, tokens, lambda a: a),
        "error_mean": _replaced(model, tokens, lambda a: _sae_out(sae, a) + mean_err),
        "scaffold": _replaced(model, tokens, lambda a: a - sae.scaffold(a)),
        "pca": _replaced(model, tokens, lambda a: a - ((a - mu) @ q) @ q.T),
    }
    ce = {k: _ce(v, tokens) for k, v in refs.items()}
    ev, dmc = res.run_evals, res.dark_matter_ce
    err, sc = res.error_node_ablation, res.scaffold
    assert dmc is not None and err is not None and sc is not None and sc.pca_removal is not None
    got = {
        "clean": [ev.ce_loss_without_sae, dmc.ce_clean, err["zero"].ce_clean, sc.ablation.ce_clean],
        "sae": [ev.ce_loss_with_sae, dmc.ce_sae, err["zero"].ce_sae, err["zero"].ce_ablated],
        "zero": [ev.ce_loss_with_ablation],
        "linear": [dmc.ce_sae_linear],
        "nonlinear": [dmc.ce_sae_nonlinear],
        "error_term": [err["zero"].ce_spliced, sc.ablation.ce_spliced],
        "error_mean": [err["mean"].ce_ablated],
        "scaffold": [sc.ablation.ce_ablated],
        "pca": [sc.pca_removal.ce_removed],
    }
    for key, values in got.items():
        for v in values:
            assert v == pytest.approx(ce[key], abs=1e-5), key
    assert ev.kl_div_with_sae == pytest.approx(_kl(clean, plain, tokens), abs=1e-5)
    assert err["mean"].kl_ablated_vs_sae == pytest.approx(_kl(plain, refs["error_mean"], tokens), abs=1e-5)
    assert sc.ablation.kl_ablated_vs_clean == pytest.approx(_kl(clean, refs["scaffold"], tokens), abs=1e-5)
    assert err["zero"].max_abs_logit_diff_spliced < 1e-4
    # SAELens's own run_evals on the same rows and special ids: the same CE convention
    full = loss_recovered(model, sae, tokens, special_tokens=[BOS], batch_size_prompts=4)
    for name in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score",
                 "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score", "explained_variance", "l0"):  # fmt: skip
        assert getattr(ev, name) == pytest.approx(getattr(full, name), abs=1e-5), name


def test_every_splice_leaves_bos_positions_alone(model, tokens, sae):
    splicer = Splicer(model, sae, tokens, special_tokens=[BOS], progress=False)
    x = _acts(model, tokens)
    flat = x[~_bos(tokens)]
    q = orthonormal_basis(torch.linalg.qr(torch.randn(D, 3, dtype=torch.float64))[0], D)
    W = 0.1 * torch.randn(D, D, dtype=torch.float64)
    interventions = [
        SAE,
        linear_error_splice(W),
        nonlinear_error_splice(W),
        ERROR_TERM,
        error_ablation("zero"),
        error_ablation("mean", (flat - _sae_out(sae, flat)).mean(0)),
        hook_ablation("hook_scaffold"),
        subspace_removal(q),
    ]
    clean_logits = model(tokens)
    bos = _bos(tokens)
    for iv in interventions:
        seen: list[torch.Tensor] = []
        with model.hooks(fwd_hooks=[(NEXT, lambda a, hook, seen=seen: seen.append(a.detach()))]):
            logits = splicer.forward(iv, tokens)
        out = seen[0]
        torch.testing.assert_close(out[bos], x[bos], rtol=0, atol=0, msg=iv.name)
        torch.testing.assert_close(logits[:, 0], clean_logits[:, 0], rtol=0, atol=1e-6, msg=iv.name)
        if iv is not ERROR_TERM:
            assert (out[~bos] - x[~bos]).abs().max() > 1e-3, iv.name  # the splice did act
    # the opt-out splices BOS too: the check above can fail
    everywhere = Splicer(model, sae, tokens, special_tokens=(), progress=False)
    assert (everywhere.forward(SAE, tokens)[:, 0] - clean_logits[:, 0]).abs().max() > 1e-3


def test_statistics_never_see_bos(model, tokens, sae):
    """The statistics of an evaluation with BOS positions equal those computed on the same
    activations with the BOS rows removed; keeping BOS (opt-out) changes them."""
    res = evaluate_sae(sae, model, tokens, n_tokens=tokens.numel(), batch_size=4,
                       special_tokens=[BOS], progress=False)  # fmt: skip
    flat = _acts(model, tokens).reshape(-1, D)[~_bos(tokens).reshape(-1)]
    feats, out = encode_decode(sae, flat)
    dic = dictionary_stats_from_codes(feats)
    torch.testing.assert_close(res.dictionary.firing_rates, dic.firing_rates)
    assert res.dictionary.n_tokens == flat.shape[0]
    dm = dark_matter_from_reconstructions([(flat, out)])
    assert res.dark_matter.fvu == pytest.approx(dm.fvu, rel=1e-9)
    assert res.dark_matter.error_r2 == pytest.approx(dm.error_r2, rel=1e-9)
    assert res.scaffold is not None and res.scaffold.pca_explained_variance is not None
    kept = evaluate_sae(sae, model, tokens, n_tokens=tokens.numel(), batch_size=4, splices=False,
                        special_tokens=(), progress=False)  # fmt: skip
    assert kept.dictionary.n_tokens == tokens.numel()
    assert abs(kept.dark_matter.fvu - res.dark_matter.fvu) > 1e-3


def test_splicer_validates_before_any_work(model, tokens, sae):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        Splicer(model, sae, tokens, batch_size=0)
    splicer = Splicer(model, sae, tokens, progress=False)
    with pytest.raises(ValueError, match="'sae' is used twice"):
        splicer.measure([SAE, SAE])
    with pytest.raises(ValueError, match=r"compares with \['later'\]"):
        splicer.measure([Intervention.splice("x", compare_to=("later",)), ZERO_ABLATION])
    with pytest.raises(ValueError, match="has no hook point 'hook_scafold'"):
        splicer.measure([hook_ablation("hook_scafold")])
    with pytest.raises(ValueError, match="hook_name is required"):
        Splicer(model, None, tokens)
