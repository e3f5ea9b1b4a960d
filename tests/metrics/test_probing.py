"""k-sparse probing, the labelled corpus, pooling and the scaffold-vs-sparse-latents topic test."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_ext.labelled_text import SECTIONS, LabelledTexts, python_doc_sections
from sae_ext.metrics.probing import (
    PooledActivations,
    balanced_task,
    k_sparse_probing,
    pooled_activations,
    scaffold_topic_ablation,
    top_k_mean_diff,
    topic_aligned_latents,
)
from sae_ext.probes import binary_f1, fit_logistic, sae_codes
from sae_ext.saes.scaffold import ScaffoldJumpReLUSAE, ScaffoldJumpReLUSAEConfig
from sae_ext.testing import tiny_bridge

CLASSES = ("p", "q", "r")


def _pooled(codes: torch.Tensor, labels: torch.Tensor, d_in: int = 4) -> PooledActivations:
    x = torch.randn(len(labels), d_in, generator=torch.Generator().manual_seed(7))
    return PooledActivations(x=x, codes=codes, scaffold=None, labels=labels, classes=CLASSES)


def _class_latent_codes(
    n_per: int, seed: int, informative: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [3n, 30]: latent c fires (≈1) on class c when informative; the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per)
    codes = torch.rand(3 * n_per, 30, generator=g) * 0.3
    if informative:
        codes[torch.arange(3 * n_per), labels] += 1.0
    return codes, labels


def test_fit_logistic_separates_and_matches_the_regularised_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    probe = fit_logistic(x, y, C=1.0)
    assert (probe.predict(x)[:, 0] == y).float().mean() > 0.95
    # at the optimum the gradient of the objective vanishes
    w, b = probe.weight.clone().requires_grad_(), probe.bias.clone().requires_grad_()
    sw = torch.where(y > 0, 200 / (2 * y.sum()), 200 / (2 * (200 - y.sum()))).double()
    nll = torch.nn.functional.binary_cross_entropy_with_logits(
        (x @ w.T + b)[:, 0], y.double(), reduction="none"
    )
    ((nll * sw).mean() + w.pow(2).sum() / (2 * 200)).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
    assert binary_f1(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)


def test_fit_logistic_rejects_bad_inputs() -> None:
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="both positive and negative"):
        fit_logistic(x, torch.ones(10))
    with pytest.raises(ValueError, match="0/1"):
        fit_logistic(x, torch.arange(10) % 3)
    with pytest.raises(ValueError, match="C must"):
        fit_logistic(x, torch.arange(10) % 2, C=0)
    with pytest.raises(ValueError, match="finite"):
        fit_logistic(torch.full((10, 2), float("inf")), torch.arange(10) % 2)


def test_k_sparse_probing_finds_the_class_latents_and_fails_on_uninformative_codes() -> None:
    codes, labels = _class_latent_codes(40, 0, informative=True)
    codes_te, labels_te = _class_latent_codes(20, 1, informative=True)
    res = k_sparse_probing(_pooled(codes, labels), _pooled(codes_te, labels_te), ks=(1, 5))
    assert res.sparse_accuracy[1] > 0.95 and res.sparse_accuracy[5] > 0.95
    # the dense probe sees random x: chance level
    assert res.dense_accuracy < 0.75
    idx, y = balanced_task(labels, 0, seed=0)
    assert int(top_k_mean_diff(codes[idx], y, 1)) == 0
    # control: the same codes with no class signal -> near chance
    c0, l0 = _class_latent_codes(40, 0, informative=False)
    c1, l1 = _class_latent_codes(20, 1, informative=False)
    ctrl = k_sparse_probing(_pooled(c0, l0), _pooled(c1, l1), ks=(1,))
    assert ctrl.sparse_accuracy[1] < 0.75


def test_balanced_task_draws_negatives_evenly() -> None:
    labels = torch.tensor([0] * 6 + [1] * 10 + [2] * 10)
    idx, y = balanced_task(labels, 0, seed=3)
    assert int(y.sum()) == 6 and y.numel() == 12
    neg = labels[idx[y == 0]]
    assert int((neg == 1).sum()) == 3 and int((neg == 2).sum()) == 3
    assert torch.equal(idx, balanced_task(labels, 0, seed=3)[0])  # seeded


def test_k_sparse_probing_rejects_bad_inputs() -> None:
    codes, labels = _class_latent_codes(10, 0, informative=True)
    p = _pooled(codes, labels)
    with pytest.raises(ValueError, match="k = 31 exceeds"):
        k_sparse_probing(p, p, ks=(31,))
    with pytest.raises(ValueError, match="every k"):
        k_sparse_probing(p, p, ks=(0,))
    with pytest.raises(ValueError, match="no test example"):
        k_sparse_probing(p, _pooled(codes[:10], labels[:10]))
    with pytest.raises(ValueError, match="PooledActivations"):
        k_sparse_probing(p, codes)


def test_labelled_corpus_ships_five_sections_with_disjoint_splits() -> None:
    train, test = python_doc_sections("train"), python_doc_sections("test")
    assert train.classes == SECTIONS == ("tutorial", "library", "reference", "howto", "faq")
    for data, lo in ((train, 150), (test, 50)):
        counts = torch.bincount(torch.tensor(data.labels), minlength=5)
        assert bool((counts >= lo).all()), counts
    assert not set(train.texts) & set(test.texts)
    small = python_doc_sections("test", per_class=3)
    assert len(small) == 15 and small.texts[:3] == test.texts[:3]
    with pytest.raises(ValueError, match="split"):
        python_doc_sections("eval")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_class"):
        python_doc_sections("train", per_class=0)
    with pytest.raises(ValueError, match="labels must index"):
        LabelledTexts(("a",), (5,), SECTIONS)


@pytest.fixture(scope="module")
def bridge():
    return tiny_bridge(d_model=32)


def test_pooled_activations_average_non_special_tokens(bridge) -> None:
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    data = LabelledTexts(("t3 t4 t5", "t7 t8", "t9 t10 t11 t12"), (0, 1, 1), ("x", "y"))
    pooled = pooled_activations(bridge, sae, "blocks.0.hook_resid_post", data, batch_size=2)
    assert pooled.x.shape == (3, 32) and pooled.codes.shape == (3, 64) and pooled.scaffold is None
    hook = "blocks.0.hook_out"
    for i, text in enumerate(data.texts):
        toks = bridge.to_tokens(text)  # BOS + the words
        _, cache = bridge.run_with_cache(toks, names_filter=[hook])
        act = cache[hook][0, 1:]  # drop BOS
        torch.testing.assert_close(pooled.x[i], act.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled.codes[i], sae.encode(act).mean(0), atol=1e-5, rtol=1e-5)
    scaffolded = _scaffold_sae(32)
    pooled_s = pooled_activations(bridge, scaffolded, hook, data)
    act = bridge.run_with_cache(bridge.to_tokens(data.texts[2]), names_filter=[hook])[1][hook][
        0, 1:
    ]
    torch.testing.assert_close(
        pooled_s.scaffold[2], scaffolded.scaffold(act).mean(0), atol=1e-5, rtol=1e-5
    )
    assert scaffolded._pending_scaffold is None  # encode/decode paired: nothing left pending
    with pytest.raises(ValueError, match="context_size"):
        pooled_activations(bridge, sae, hook, data, context_size=1)
    with pytest.raises(ValueError, match="unknown hook"):
        pooled_activations(bridge, sae, "blocks.0.hook_nope", data)


def _scaffold_sae(d: int = 16) -> ScaffoldJumpReLUSAE:
    """Scaffold = span(e0, e1); latent j reads and writes e_{j+2} (threshold 0)."""
    sae = ScaffoldJumpReLUSAE(ScaffoldJumpReLUSAEConfig(d_in=d, d_sae=d - 2, scaffold_rank=2))
    with torch.no_grad():
        for p_ in sae.parameters():
            p_.zero_()
        sae.scaffold_V[:2] = torch.eye(2)
        sae.scaffold_U[:, :2] = torch.eye(2)
        sae.W_enc[2:, :] = torch.eye(d - 2)
        sae.W_dec[:, 2:] = torch.eye(d - 2)
    return sae


def _topic_data(
    sae: ScaffoldJumpReLUSAE, dims: tuple[int, int], n_per: int, seed: int
) -> PooledActivations:
    """Class 0 adds 2 on ``dims[0]``, class 1 on ``dims[1]``, class 2 neither; noise in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per)
    x = torch.rand(3 * n_per, 16, generator=g) + 0.5
    for c, dim in enumerate(dims):
        x[labels == c, dim] += 2.0
    return PooledActivations(
        x=x,
        codes=sae_codes(sae, x),
        scaffold=sae.scaffold(x).detach(),
        labels=labels,
        classes=CLASSES,
    )


def test_topic_in_the_scaffold_is_lost_with_the_scaffold_not_with_the_latents() -> None:
    sae = _scaffold_sae()
    train, test = _topic_data(sae, (0, 1), 40, 0), _topic_data(sae, (0, 1), 20, 1)
    res = scaffold_topic_ablation(sae, train, test, n_latents=3)
    assert res.baseline_accuracy > 0.9
    assert res.scaffold_removed_accuracy < 0.7  # chance is 0.5 on balanced tasks
    assert res.latents_ablated_accuracy > 0.9
    assert res.scaffold_rank == 2 and len(res.ablated_latents) == 3


def test_topic_in_latents_is_lost_with_the_latents_not_with_the_scaffold() -> None:
    sae = _scaffold_sae()
    train, test = _topic_data(sae, (5, 6), 40, 0), _topic_data(sae, (5, 6), 20, 1)
    aligned = topic_aligned_latents(train.codes, train.labels, 2)
    assert sorted(aligned.tolist()) == [3, 4]  # latents 3 and 4 write e5 and e6
    res = scaffold_topic_ablation(sae, train, test, n_latents=2)
    assert res.baseline_accuracy > 0.9
    assert res.scaffold_removed_accuracy > 0.9
    assert res.latents_ablated_accuracy < 0.7
    assert sorted(res.ablated_latents) == [3, 4]


def test_scaffold_topic_ablation_rejects_bad_inputs() -> None:
    sae = _scaffold_sae()
    train = _topic_data(sae, (0, 1), 10, 0)
    with pytest.raises(ValueError, match="n_latents"):
        scaffold_topic_ablation(sae, train, train, n_latents=0)
    with pytest.raises(ValueError, match="exceeds d_sae"):
        scaffold_topic_ablation(sae, train, train, n_latents=99)
    no_scaffold = PooledActivations(train.x, train.codes, None, train.labels, CLASSES)
    with pytest.raises(ValueError, match="scaffolded SAE"):
        scaffold_topic_ablation(sae, no_scaffold, no_scaffold, n_latents=1)


def _tiny_model_and_tokenizer():
    """A tiny HookedTransformer and a word-level tokenizer with 64 alphabetic words."""
    from sae_ext.testing import tiny_hooked_transformer, tiny_word_tokenizer

    tok = tiny_word_tokenizer([a + b for a in "abcdefgh" for b in "aeiouxyz"])
    return tiny_hooked_transformer(d_model=32, d_vocab=len(tok), n_ctx=80), tok


def test_probe_metrics_runs_every_metric_on_a_tiny_model() -> None:
    """End to end on a tiny HookedTransformer with a word-level tokenizer: the labelled corpus
    (mostly unknown words here), the scaffold topic test and the absorption pipeline all run
    and report their fields; the numbers of a random model carry no meaning."""
    from sae_ext.metrics.probing import probe_metrics

    model, tok = _tiny_model_and_tokenizer()
    out = probe_metrics(
        model, _scaffold_sae(32), "blocks.0.hook_resid_post", tokenizer=tok, ks=(1, 2),
        per_class=4, n_topic_latents=3,
    )  # fmt: skip
    assert set(out) == {"k_sparse_probing", "scaffold_topic", "absorption"}
    assert set(out["k_sparse_probing"]["sparse_accuracy"]) == {1, 2}
    assert out["scaffold_topic"]["n_latents_ablated"] == 3
    assert out["absorption"]["group_rank"] == 1 and len(out["absorption"]["letters"]) >= 8
    with pytest.raises(ValueError, match="n_topic_latents"):
        probe_metrics(
            model, _scaffold_sae(32), "blocks.0.hook_resid_post", tokenizer=tok, n_topic_latents=0
        )


def test_one_model_pass_scores_several_saes_as_probe_metrics_does() -> None:
    """``probe_data`` once, then ``probe_metrics_of`` per SAE: the same numbers as a separate
    ``probe_metrics`` call for each SAE (what the sweep benches rely on)."""
    from sae_ext.metrics.probing import probe_data, probe_metrics, probe_metrics_of

    model, tok = _tiny_model_and_tokenizer()
    hook = "blocks.0.hook_resid_post"
    torch.manual_seed(0)
    plain = StandardSAE(StandardSAEConfig(d_in=32, d_sae=48))
    data = probe_data(model, hook, tokenizer=tok, per_class=4, seed=1)
    assert data.train.x.shape[1] == 32 and len(data.train.text) == len(data.train.x)
    assert data.spelling.train_x.shape[1] == 32
    for sae in (plain, _scaffold_sae(32)):
        shared = probe_metrics_of(sae, data, ks=(1, 3), n_topic_latents=2)
        alone = probe_metrics(model, sae, hook, tokenizer=tok, ks=(1, 3), n_topic_latents=2,
                              per_class=4, seed=1)  # fmt: skip
        assert shared == alone
    assert "scaffold_topic" not in probe_metrics_of(plain, data, ks=(1,))
    with pytest.raises(ValueError, match="d_in 16 differs"):
        probe_metrics_of(StandardSAE(StandardSAEConfig(d_in=16, d_sae=8)), data)
    with pytest.raises(ValueError, match="k = 99 exceeds d_sae = 48"):
        probe_metrics_of(plain, data, ks=(99,))
    with pytest.raises(ValueError, match="data must be ProbeData"):
        probe_metrics_of(plain, data.train)
    with pytest.raises(ValueError, match="n_topic_latents = 20 exceeds d_sae = 14"):
        # rejected before the model pass: no tokenizer would be needed to get there
        probe_metrics(None, _scaffold_sae(16), hook, n_topic_latents=20)
