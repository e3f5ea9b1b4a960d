"""First-letter feature absorption (sae_ext.metrics.absorption) on hand-built SAEs.

The synthetic words: word activations ``e_letter + 0.05·noise``; a set of 'a' words also carry
their own token direction ``t_w``. The *absorbing* SAE has one latent per letter and one latent
per absorbed word whose decoder is ``unit(e_a + t_w)``; the 'a' latent is inhibited by every
``t_w`` — the absorbed words light their token latent instead of the letter latent, which is
feature absorption by construction. The *control* SAE has the same latents but the token
latents decode to ``t_w`` only and do not inhibit the 'a' latent: no absorption.
"""

from __future__ import annotations

import re

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformers import PreTrainedTokenizerFast

from sae_ext.metrics.absorption import (
    LETTERS,
    AbsorptionSettings,
    SpellingPrompts,
    _unit_alignment,
    absorption_from_activations,
    alphabetic_vocabulary,
    first_letter_absorption,
    spelling_activations,
    spelling_prompts,
)
from sae_ext.saes.sasa import SASASAE, SASASAEConfig
from sae_ext.testing import tiny_hooked_transformer, tiny_word_tokenizer

N_LETTERS = 4  # letters a..d
WORDS_PER_LETTER = 20
N_ABSORBED = 8  # the first 8 'a' words are absorbed
D_IN = 32  # 4 letter dims, 8 token dims, 20 noise dims


def _words(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations [80, 32], letters [80] and the absorbed-word mask [80]."""
    g = torch.Generator().manual_seed(seed)
    n = N_LETTERS * WORDS_PER_LETTER
    letters = torch.arange(n) // WORDS_PER_LETTER
    x = torch.zeros(n, D_IN)
    x[torch.arange(n), letters] = 1.0
    x[:, 12:] = 0.05 * torch.randn(n, D_IN - 12, generator=g)
    absorbed = torch.zeros(n, dtype=torch.bool)
    absorbed[:N_ABSORBED] = True
    x[torch.arange(N_ABSORBED), N_LETTERS + torch.arange(N_ABSORBED)] = 1.0
    return x, letters, absorbed


def _sae(absorbing: bool) -> StandardSAE:
    """Latents 0..3: letters; latents 4..11: the absorbed words' token latents."""
    d_sae = N_LETTERS + N_ABSORBED
    w_enc = torch.zeros(D_IN, d_sae)
    w_dec = torch.zeros(d_sae, D_IN)
    for c in range(N_LETTERS):
        w_enc[c, c] = 1.5  # fires at 1.5 - 0.5 = 1 on its letter's words
        w_dec[c, c] = 1.0
    for i in range(N_ABSORBED):
        t = N_LETTERS + i
        w_enc[t, t] = 1.5
        if absorbing:
            w_enc[t, 0] = -2.0  # the token feature switches the 'a' latent off
            w_dec[t, 0] = w_dec[t, t] = 2**-0.5  # ... and its latent writes the 'a' direction
        else:
            w_dec[t, t] = 1.0
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    return sae


def _split() -> tuple[torch.Tensor, torch.Tensor]:
    """Every 4th word is a test word (so each letter, and 2 absorbed words, are in test)."""
    idx = torch.arange(N_LETTERS * WORDS_PER_LETTER)
    return idx[idx % 4 != 0], idx[idx % 4 == 0]


def _run(sae: torch.nn.Module, **kw):
    x, letters, _ = _words()
    tr, te = _split()
    return absorption_from_activations(sae, x[tr], letters[tr], x[te], letters[te], **kw)


def test_absorbing_latents_are_detected_as_full_absorption() -> None:
    x, letters, absorbed = _words()
    _, te = _split()
    res = _run(_sae(absorbing=True))
    a = res.letters[0]
    assert a.letter == "a" and a.main_units == (0,)  # the letter latent, no split
    # every absorbed test word is a probe true positive and fully absorbed; the rest are not
    n_absorbed_test = int(absorbed[te].sum())
    assert n_absorbed_test == 2
    assert a.n_probe_true_positives == int((letters[te] == 0).sum())
    assert a.n_full_absorption == n_absorbed_test
    assert a.full_absorption_rate == pytest.approx(n_absorbed_test / a.n_probe_true_positives)
    assert a.mean_absorption_fraction == pytest.approx(n_absorbed_test / a.n_probe_true_positives)
    for other in res.letters[1:]:
        assert other.main_units == (LETTERS.index(other.letter),)
        assert other.n_full_absorption == 0 and other.sum_absorption_fraction == 0.0
    assert res.n_letters_evaluated == N_LETTERS and res.group_rank == 1
    assert res.mean_full_absorption_rate == pytest.approx(a.full_absorption_rate / N_LETTERS)


def test_control_sae_without_absorption_scores_zero() -> None:
    res = _run(_sae(absorbing=False))
    assert res.letters[0].main_units == (0,)
    assert res.mean_full_absorption_rate == 0.0
    assert res.mean_absorption_fraction == 0.0


def test_partial_absorption_fraction() -> None:
    """The 'a' latent only half-inhibited: it still carries part of the projection, so the
    absorbed words are not full absorption and their fraction lies strictly in (0, 1)."""
    sae = _sae(absorbing=True)
    with torch.no_grad():
        sae.W_enc[N_LETTERS:, 0] = -0.75  # 'a' latent fires at 1.5 - 0.75 - 0.5 = 0.25
    a = _run(sae).letters[0]
    assert a.n_full_absorption == 0
    per_word = a.sum_absorption_fraction / 2
    assert 0.0 < per_word < 1.0


def _sasa(absorbing: bool) -> SASASAE:
    """The same dictionary as groups of rank 2 (second row: an unused noise direction), one
    active group per token."""
    n_groups = N_LETTERS + N_ABSORBED
    sae = SASASAE(SASASAEConfig(d_in=D_IN, d_sae=2 * n_groups, group_rank=2, n_active_groups=1))
    base = _sae(absorbing)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[:, 0::2] = base.W_enc
        sae.W_dec[0::2] = base.W_dec
        sae.W_dec[1::2, 12 + torch.arange(n_groups)] = torch.eye(n_groups)  # unit rows
    return sae


def test_sasa_counts_absorption_per_group() -> None:
    res = _run(_sasa(absorbing=True))
    assert res.group_rank == 2
    a = res.letters[0]
    assert a.main_units == (0,)  # group 0 = the 'a' group
    assert a.n_full_absorption == 2
    control = _run(_sasa(absorbing=False))
    assert control.mean_full_absorption_rate == 0.0


def test_group_alignment_is_the_projection_norm_onto_the_block_span() -> None:
    rows = torch.zeros(4, 3)
    rows[0, 0] = rows[1, 1] = 1.0  # group 0 spans e0, e1
    rows[2, 2] = 1.0
    rows[3, 2] = -1.0  # group 1 spans e2 only (rank-deficient block)
    p = torch.tensor([0.6, 0.0, 0.8])
    align = _unit_alignment(rows, p, 2)
    assert align.tolist() == pytest.approx([0.6, 0.8])
    assert _unit_alignment(rows, p, 1).tolist() == pytest.approx([0.6, 0.0, 0.8, -0.8])


def test_model_pipeline_reads_the_word_position_and_matches_the_activation_metric() -> None:
    """tiny HookedTransformer whose embedding rows are the synthetic word activations: at
    ``hook_embed`` the word position carries exactly ``x``; the end-to-end metric equals the
    activation-level one on the same split."""
    x, letters, _ = _words()
    model = tiny_hooked_transformer(d_model=D_IN, d_vocab=97)
    n = x.shape[0]
    with torch.no_grad():
        model.W_E[1 : n + 1] = x
    prefix = [90, 91, 92]
    tokens = torch.tensor([[*prefix, i + 1, 93, 94] for i in range(n)])
    prompts = SpellingPrompts(
        tokens,
        torch.full((n,), 3),
        tuple(f"{LETTERS[c]}w{i}" for i, c in enumerate(letters.tolist())),
        letters,
    )
    acts = spelling_activations(model, "hook_embed", prompts, batch_size=7)
    assert torch.equal(acts, x)
    sae = _sae(absorbing=True)
    res = first_letter_absorption(model, sae, "hook_embed", prompts, test_fraction=0.25, seed=3)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    te, tr = perm[:20], perm[20:]
    ref = absorption_from_activations(sae, x[tr], letters[tr], x[te], letters[te])
    assert res == ref


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    return tiny_word_tokenizer([*words, "x1", "can't"], unk_token="<bos>")


def test_spelling_prompts_splice_the_word_token_after_solved_examples() -> None:
    words = ["apple", "ant", "bee", "bird", "cat", "cow", "dog", "duck"]
    tok = _word_tokenizer(words)
    vocab = alphabetic_vocabulary(tok)
    got = {w for w, _ in vocab}
    assert set(words) <= got and "letter:" not in got and "x1" not in got and "<bos>" not in got
    assert "A" in got  # single letters are alphabetic words too (as in SAEBench)
    vocab = [(w, i) for w, i in vocab if w in words]
    p = spelling_prompts(tok, vocab, n_icl=2, seed=1)
    assert p.tokens.shape[0] == len(words)
    for row, pos, (w, tid), letter in zip(p.tokens, p.positions, vocab, p.letters, strict=True):
        assert int(row[pos]) == tid and LETTERS[int(letter)] == w[0]
        assert int(row[0]) == tok.bos_token_id
        text = tok.decode(row[: pos + 1].tolist(), skip_special_tokens=True)
        assert text.split()[-1] == w
        solved = re.findall(r"(\w+) has the first letter: ([A-Z])", text)
        assert len(solved) == 2  # two solved examples, other words, correct answers
        assert all(ex != w and ans == ex[0].upper() for ex, ans in solved)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_x": torch.zeros(5, 7)}, "train activations"),
        ({"test_letters": torch.full((20,), 26)}, "test letters"),
        ({"train_x": torch.full((60, D_IN), float("nan"))}, "NaN"),
        ({"settings": AbsorptionSettings(max_k=2).__class__}, "settings"),
    ],
)
def test_bad_inputs_raise_before_work(kwargs: dict, match: str) -> None:
    x, letters, _ = _words()
    tr, te = _split()
    args = {
        "train_x": x[tr],
        "train_letters": letters[tr],
        "test_x": x[te],
        "test_letters": letters[te],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        absorption_from_activations(_sae(True), **args)


def test_bad_settings_and_prompt_arguments() -> None:
    with pytest.raises(ValueError, match="max_k"):
        AbsorptionSettings(max_k=0)
    with pytest.raises(ValueError, match="projection_share"):
        AbsorptionSettings(projection_share=1.5)
    tok = _word_tokenizer(["apple", "bee", "cat"])
    with pytest.raises(ValueError, match="template"):
        spelling_prompts(tok, template="no placeholder")
    with pytest.raises(ValueError, match="n_icl"):
        spelling_prompts(tok, [("apple", 1), ("bee", 2)], n_icl=2)
    with pytest.raises(ValueError, match="alphabetic"):
        spelling_prompts(tok, [("1x", 1)], n_icl=0)
    with pytest.raises(ValueError, match="tokenizer"):
        alphabetic_vocabulary(object())
    model = tiny_hooked_transformer(d_model=D_IN)
    prompts = SpellingPrompts(
        torch.tensor([[1, 2], [3, 4]]), torch.tensor([1, 1]), ("ab", "cd"), torch.tensor([0, 2])
    )
    with pytest.raises(ValueError, match="unknown hook"):
        spelling_activations(model, "blocks.0.hook_nope", prompts)
    with pytest.raises(ValueError, match="test_fraction"):
        first_letter_absorption(model, _sae(True), "hook_embed", prompts, test_fraction=1.0)
    with pytest.raises(ValueError, match="positions"):
        SpellingPrompts(torch.tensor([[1, 2]]), torch.tensor([2]), ("ab",), torch.tensor([0]))


def test_too_few_words_for_tokenizer_prompts_fail_before_work() -> None:
    from sae_ext.metrics.absorption import first_letter_absorption, min_absorption_words
    from sae_ext.testing import tiny_bridge

    bridge = tiny_bridge()
    assert min_absorption_words() == 53  # both splits (80 / 20 %) need more than 10 words
    assert min_absorption_words(0.5, n_icl=2) == 6
    for bad in (0.0, 1.0, 1):
        with pytest.raises(ValueError, match="test_fraction"):
            min_absorption_words(bad)
    with pytest.raises(ValueError, match="max_words 20 is too few"):
        first_letter_absorption(bridge, None, "blocks.0.hook_resid_post", bridge.tokenizer, max_words=20)
