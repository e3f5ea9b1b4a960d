"""Feature absorption on the first-letter task (Chanin et al.; SAEBench's ``absorption`` eval).

The pipeline follows SAEBench's definitions (re-implemented, no code copied):

1. **Prompts.** Single-token alphabetic words of a tokenizer's vocabulary (an optional leading
   space allowed), each in an in-context spelling prompt ``"<examples> {word} has the first
   letter:"`` with ``n_icl`` solved examples before it. The activation is read at the word's
   token. Words are split into train / test (``test_fraction``, seeded).
2. **Ground-truth probe.** One-vs-rest logistic probes "first letter = L" on the train
   activations (:func:`sae_ext.probes.fit_logistic`); letters whose probe's test F1 is below
   ``min_probe_f1`` are not evaluated.
3. **Main latents (k-sparse probing).** An L1 logistic probe on the SAE codes of the train words
   ranks latents per letter (largest signed weight); for ``k = 1..max_k`` a logistic probe on the
   top-``k`` latents is scored by test F1, and ``k`` grows while F1 improves by more than
   ``f1_jump`` — those ``k`` latents are the letter's main latents (``k - 1`` is the number of
   split features).
4. **Absorption** on the test words the probe calls positive (probe true positives), with ``p̂``
   the unit probe direction, ``cos_j = cos(p̂, W_dec[j])`` and a latent's probe projection
   ``a_j · cos_j``:

   - *absorption fraction*: 0 if the main latents' projection already reaches ``x·p̂`` or the
     top ``max_absorbers`` (3) other latents with ``cos ≥ 0.1`` and positive projection explain
     less than ``0.4`` of it; 1 if the main latents' projection is ``≤ 0``; otherwise
     ``A / (A + M)`` with ``M`` the main projection and ``A = min(absorbers', x·p̂ − M)``.
   - *full absorption*: no main latent fires, the top-projecting latent has ``cos ≥ 0.025``,
     ``x·p̂ ≥ 0`` and that latent carries at least ``0.4`` of ``x·p̂``.

   Per letter, ``mean_absorption_fraction = Σ fraction / #true positives`` and
   ``full_absorption_rate = #full / #true positives``; the reported scores average letters.

**Groups (SASA).** For an SAE whose :class:`~sae_ext.evaluation_spec.EvaluationSpec` names a
``group_rank`` r (``sasa``, ``sasa_batchtopk``), the unit is the group of r consecutive latents:
its probe projection is the sum of its latents' (the probe component of its decoded vector, the
rows being unit norm), it fires when any of its codes is non-zero, its alignment with the probe
is ``‖P_k p̂‖`` — the norm of the probe direction's projection onto the span of its decoder block
(a subspace has no sign; for r = 1 it would be ``|cos|``) — and the k-sparse ranking uses the
norm of the group's L1-probe weights (codes are signed). Main latents, absorbers and the counts
are then groups.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_ext.evaluation_spec import evaluation_spec
from sae_ext.model_io import _grab, input_device, resolve_hook_name
from sae_ext.probes import binary_f1, fit_logistic, sae_codes

__all__ = [
    "LETTERS",
    "AbsorptionResult",
    "AbsorptionSettings",
    "LetterAbsorption",
    "SpellingPrompts",
    "SpellingSplit",
    "absorption_from_activations",
    "absorption_of_split",
    "alphabetic_vocabulary",
    "first_letter_absorption",
    "spelling_activations",
    "spelling_prompts",
    "spelling_split",
]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: Solved in-context examples before each spelling prompt (SAEBench uses 10).
N_ICL = 10
#: A latent "fires" when its code's magnitude exceeds this (SAEBench's EPS).
_EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionSettings:
    """SAEBench's absorption thresholds and k-sparse settings (its defaults)."""

    max_k: int = 10
    f1_jump: float = 0.03
    min_probe_f1: float = 0.6
    full_absorption_cos: float = 0.025
    fraction_absorber_cos: float = 0.1
    projection_share: float = 0.4
    max_absorbers: int = 3
    l1: float = 0.01
    l1_steps: int = 300

    def __post_init__(self) -> None:
        for name in ("max_k", "max_absorbers", "l1_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("f1_jump", "min_probe_f1", "full_absorption_cos", "fraction_absorber_cos",
                     "projection_share", "l1"):  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


def alphabetic_vocabulary(
    tokenizer: Any, *, allow_leading_space: bool = True
) -> list[tuple[str, int]]:
    """``(word, token id)`` for every vocabulary token that decodes to ASCII letters only
    (optionally after one leading space), special tokens excluded; sorted by id."""
    if not hasattr(tokenizer, "get_vocab") or not hasattr(tokenizer, "decode"):
        raise ValueError(
            f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}"
        )
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for tid in sorted(set(tokenizer.get_vocab().values())):
        if tid in special:
            continue
        word = tokenizer.decode([tid])
        core = word[1:] if allow_leading_space and word.startswith(" ") else word
        if core and core.isascii() and core.isalpha():
            out.append((word, tid))
    return out


@dataclass(frozen=True)
class SpellingPrompts:
    """Token rows (right-padded with ``pad_id``), the word's position in each row, the words
    and their first-letter classes (indices into :data:`LETTERS`)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    words: tuple[str, ...]
    letters: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.words)
        if self.tokens.ndim != 2 or self.tokens.shape[0] != n or n == 0:
            raise ValueError(
                f"tokens must be [n_words = {n} >= 1, L]; got shape {tuple(self.tokens.shape)}"
            )
        if self.positions.shape != (n,) or self.letters.shape != (n,):
            raise ValueError("positions and letters must be [n_words] tensors")
        if bool((self.positions < 0).any()) or bool((self.positions >= self.tokens.shape[1]).any()):
            raise ValueError(f"positions must lie in [0, {self.tokens.shape[1]})")
        if bool((self.letters < 0).any()) or bool((self.letters >= len(LETTERS)).any()):
            raise ValueError("letters must be indices into LETTERS (0..25)")

    def subset(self, idx: Sequence[int]) -> SpellingPrompts:
        """The prompts at ``idx``."""
        t = torch.as_tensor(list(idx), dtype=torch.long)
        return SpellingPrompts(
            self.tokens[t],
            self.positions[t],
            tuple(self.words[i] for i in t.tolist()),
            self.letters[t],
        )


def spelling_prompts(
    tokenizer: Any,
    vocabulary: Sequence[tuple[str, int]] | None = None,
    *,
    template: str = "{word} has the first letter:",
    n_icl: int = N_ICL,
    seed: int = 0,
) -> SpellingPrompts:
    """In-context spelling prompts for every ``(word, token id)`` of ``vocabulary`` (default:
    :func:`alphabetic_vocabulary`). Each prompt is BOS (if the tokenizer has one), ``n_icl``
    solved examples ``template + " L"`` drawn from the other words, newline-separated, then the
    template with the word's own token id spliced in (so it stays one token)."""
    if not isinstance(template, str) or template.count("{word}") != 1:
        raise ValueError(f"template must contain '{{word}}' exactly once, got {template!r}")
    if isinstance(n_icl, bool) or not isinstance(n_icl, int) or n_icl < 0:
        raise ValueError(f"n_icl must be an integer >= 0, got {n_icl!r}")
    vocab = alphabetic_vocabulary(tokenizer) if vocabulary is None else list(vocabulary)
    bad = [w for w, _ in vocab if not (w.strip() and w.strip()[0].lower() in LETTERS)]
    if not vocab or bad:
        raise ValueError(
            f"vocabulary must be non-empty (word, id) pairs of alphabetic words; bad: {bad[:5]}"
        )
    if n_icl >= len(vocab):
        raise ValueError(
            f"n_icl = {n_icl} needs more than {n_icl} words; the vocabulary has {len(vocab)}"
        )

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    head, tail = template.split("{word}")
    head_ids, tail_ids = ids(head), ids(tail)
    bos = getattr(tokenizer, "bos_token_id", None)
    rng = random.Random(seed)
    rows, positions = [], []
    for i, (_, tid) in enumerate(vocab):
        others = rng.sample(range(len(vocab) - 1), n_icl)
        examples = [vocab[j + (j >= i)][0] for j in others]
        icl = "".join(template.format(word=w) + f" {w.strip()[0].upper()}\n" for w in examples)
        row = ([bos] if bos is not None else []) + ids(icl) + head_ids
        positions.append(len(row))
        rows.append(row + [tid] + tail_ids)
    width = max(map(len, rows))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (bos if bos is not None else 0)
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    letters = torch.tensor(
        [LETTERS.index(w.strip()[0].lower()) for w, _ in vocab], dtype=torch.long
    )
    return SpellingPrompts(tokens, torch.tensor(positions), tuple(w for w, _ in vocab), letters)


@torch.no_grad()
def spelling_activations(
    model: Any, hook_name: str, prompts: SpellingPrompts, *, batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """Activations ``[n_words, d]`` (float32, CPU) at ``hook_name`` on each prompt's word token."""
    if not isinstance(prompts, SpellingPrompts):
        raise ValueError(f"prompts must be SpellingPrompts, got {type(prompts).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    hook = resolve_hook_name(model, hook_name)
    d_vocab = getattr(model.cfg, "d_vocab", None)
    if d_vocab and int(prompts.tokens.max()) >= d_vocab:
        raise ValueError(
            f"prompt token ids reach {int(prompts.tokens.max())} but the model's d_vocab is {d_vocab}"
        )
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and prompts.tokens.shape[1] > n_ctx:
        raise ValueError(
            f"prompts have {prompts.tokens.shape[1]} tokens but the model's n_ctx is {n_ctx}"
        )
    out = []
    dev = input_device(model)
    starts = range(0, len(prompts.words), batch_size)
    for start in tqdm(starts, desc=f"spelling words at {hook_name}", unit="batch", disable=not progress):
        toks = prompts.tokens[start : start + batch_size]
        # the model is causal: right padding never reaches the word position
        width = int(prompts.positions[start : start + batch_size].max()) + 1
        act = _grab(model, hook, toks[:, :width].to(dev), None)
        pos = prompts.positions[start : start + batch_size].to(act.device)
        out.append(act[torch.arange(act.shape[0], device=act.device), pos].float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LetterAbsorption:
    """One letter: probe quality, its main latents (groups for SASA) and absorption counts."""

    letter: str
    probe_f1: float
    main_units: tuple[int, ...]
    main_units_cos: tuple[float, ...]
    k_sparse_f1: tuple[float, ...]
    n_probe_true_positives: int
    n_full_absorption: int
    sum_absorption_fraction: float

    @property
    def num_split_features(self) -> int:
        return max(len(self.main_units) - 1, 0)

    def _per_true_positive(self, total: float) -> float:
        """``total`` over the probe's true positives (NaN when it has none)."""
        return total / self.n_probe_true_positives if self.n_probe_true_positives else math.nan

    @property
    def full_absorption_rate(self) -> float:
        return self._per_true_positive(self.n_full_absorption)

    @property
    def mean_absorption_fraction(self) -> float:
        return self._per_true_positive(self.sum_absorption_fraction)


@dataclass(frozen=True)
class AbsorptionResult:
    """Scores averaged over the evaluated letters (probe F1 ≥ ``min_probe_f1`` and ≥ 1 probe
    true positive) and the per-letter details; ``group_rank`` is 1 for latent-level SAEs."""

    mean_absorption_fraction: float
    mean_full_absorption_rate: float
    mean_num_split_features: float
    n_letters_evaluated: int
    group_rank: int
    letters: tuple[LetterAbsorption, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# the metric on activations
# --------------------------------------------------------------------------------------------


def _decoder_rows(sae: Any) -> torch.Tensor:
    """The ``(d_sae, d_in)`` rows ``decode`` multiplies codes with (SASA: its unit directions)."""
    rows = sae.decoder_directions() if hasattr(sae, "decoder_directions") else sae.W_dec
    return rows.detach().float().cpu()


def _unit_alignment(rows: torch.Tensor, direction: torch.Tensor, r: int) -> torch.Tensor:
    """Per unit: signed cosine (r = 1) or the norm of ``direction``'s projection onto the span
    of the group's decoder block (r > 1). ``direction`` is unit norm."""
    if r == 1:
        return torch.nn.functional.cosine_similarity(rows, direction.unsqueeze(0), dim=-1)
    blocks = rows.double().unflatten(0, (-1, r))  # (K, r, d)
    _, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    keep = s > s[:, :1] * 1e-6
    coef = (vh @ direction.double()) * keep
    return coef.norm(dim=-1).float()


def _k_sparse_main_units(
    unit_scores: torch.Tensor,
    codes_train: torch.Tensor,
    y_train: torch.Tensor,
    codes_test: torch.Tensor,
    y_test: torch.Tensor,
    r: int,
    s: AbsorptionSettings,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Grow k while the k-sparse probe's test F1 jumps by more than ``f1_jump``."""
    order = unit_scores.argsort(descending=True)
    best, chosen, f1s = -math.inf, (), []
    for k in range(1, min(s.max_k, order.numel()) + 1):
        units = order[:k]
        cols = (units.unsqueeze(1) * r + torch.arange(r)).reshape(-1)
        xtr, xte = codes_train[:, cols], codes_test[:, cols]
        if float(xtr.abs().sum()) == 0:  # the selected latents never fire: F1 is 0
            f1 = 0.0
        else:
            probe = fit_logistic(xtr, y_train, max_iter=100)
            f1 = binary_f1(probe.predict(xte)[:, 0], y_test)
        f1s.append(f1)
        if f1 > best + s.f1_jump:
            best, chosen = f1, tuple(int(u) for u in units)
        else:
            break
    return chosen, tuple(f1s)


def _absorption_on_word(
    x_proj: float, unit_proj: torch.Tensor, unit_active: torch.Tensor, align: torch.Tensor,
    main: list[int], s: AbsorptionSettings,
) -> tuple[float, bool]:  # fmt: skip
    """SAEBench's absorption fraction and full-absorption flag for one word."""
    main_proj = float(unit_proj[main].sum()) if main else 0.0
    others = torch.ones_like(unit_proj, dtype=torch.bool)
    others[main] = False
    cand = unit_proj[others & (align >= s.fraction_absorber_cos) & (unit_proj > 0)]
    absorbers = (
        float(cand.topk(min(s.max_absorbers, cand.numel())).values.sum()) if cand.numel() else 0.0
    )
    share = absorbers / x_proj if x_proj != 0 else 0.0
    if main_proj >= x_proj or share < s.projection_share:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        a = min(absorbers, x_proj - main_proj)
        fraction = min(max(a / (a + main_proj), 0.0), 1.0)
    top = int(unit_proj.argmax())
    full = (
        not bool(unit_active[main].any())
        and float(align[top]) >= s.full_absorption_cos
        and x_proj > 0
        and float(unit_proj[top]) / x_proj >= s.projection_share
    )  # fmt: skip
    return fraction, full


def _check_split(name: str, x: Any, letters: Any, d_in: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != d_in or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} activations must be [n >= 2, d_in = {d_in}]; got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} activations hold NaN or Inf")
    if (
        not isinstance(letters, torch.Tensor)
        or letters.shape != (x.shape[0],)
        or letters.is_floating_point()
    ):
        raise ValueError(
            f"{name} letters must be an integer [{x.shape[0]}] tensor of LETTERS indices"
        )
    if bool((letters < 0).any()) or bool((letters >= len(LETTERS)).any()):
        raise ValueError(f"{name} letters must lie in 0..25 (indices into LETTERS)")


def absorption_from_activations(
    sae: Any,
    train_x: torch.Tensor,
    train_letters: torch.Tensor,
    test_x: torch.Tensor,
    test_letters: torch.Tensor,
    settings: AbsorptionSettings | None = None,
) -> AbsorptionResult:
    """The absorption metric on word activations already read at the hook (see the module doc).

    Letters need positive and negative train words; letters absent from either split are
    skipped. ``group_rank`` comes from the SAE's ``evaluation_spec()`` (SASA groups) or is 1.
    """
    s = settings or AbsorptionSettings()
    if not isinstance(s, AbsorptionSettings):
        raise ValueError(f"settings must be AbsorptionSettings, got {type(s).__name__}")
    d_in = int(sae.cfg.d_in)
    _check_split("train", train_x, train_letters, d_in)
    _check_split("test", test_x, test_letters, d_in)
    present = [
        c for c in range(len(LETTERS))
        if 0 < int((train_letters == c).sum()) < train_letters.numel() and int((test_letters == c).sum()) > 0
    ]  # fmt: skip
    if not present:
        raise ValueError("no letter has positive and negative train words and test words")
    r = evaluation_spec(sae).group_rank or 1

    train_x, test_x = train_x.float().cpu(), test_x.float().cpu()
    onehot_tr = torch.stack([(train_letters == c).long() for c in present], 1)
    probe = fit_logistic(train_x, onehot_tr)
    probe_logits = probe.logits(test_x)

    codes_tr, codes_te = sae_codes(sae, train_x), sae_codes(sae, test_x)
    l1_probe = fit_logistic(codes_tr, onehot_tr, l1=s.l1, max_iter=s.l1_steps)
    rows = _decoder_rows(sae)
    active_te = (codes_te.abs() > _EPS).unflatten(-1, (-1, r)).any(-1)

    letters = []
    for j, c in enumerate(present):
        y_te = (test_letters == c).long()
        probe_f1 = binary_f1((probe_logits[:, j] > 0).long(), y_te)
        w = l1_probe.weight[j]
        scores = w if r == 1 else w.unflatten(0, (-1, r)).norm(dim=-1)
        main, f1s = _k_sparse_main_units(scores, codes_tr, onehot_tr[:, j], codes_te, y_te, r, s)
        p_hat = probe.weight[j] / probe.weight[j].norm().clamp_min(1e-12)
        cos = torch.nn.functional.cosine_similarity(rows, p_hat.unsqueeze(0), dim=-1)
        align = _unit_alignment(rows, p_hat, r)
        tp = ((test_letters == c) & (probe_logits[:, j] > 0)).nonzero().flatten().tolist()
        n_full, frac_sum = 0, 0.0
        if probe_f1 >= s.min_probe_f1:
            for i in tp:
                unit_proj = (codes_te[i] * cos).unflatten(0, (-1, r)).sum(-1)
                frac, full = _absorption_on_word(
                    float(test_x[i] @ p_hat), unit_proj, active_te[i], align, list(main), s
                )
                frac_sum += frac
                n_full += int(full)
        letters.append(
            LetterAbsorption(
                letter=LETTERS[c], probe_f1=probe_f1, main_units=main,
                main_units_cos=tuple(float(align[u]) for u in main), k_sparse_f1=f1s,
                n_probe_true_positives=len(tp), n_full_absorption=n_full, sum_absorption_fraction=frac_sum,
            )
        )  # fmt: skip
    scored = [
        la for la in letters if la.probe_f1 >= s.min_probe_f1 and la.n_probe_true_positives > 0
    ]

    def mean(vals: list[float]) -> float:
        return sum(vals) / len(vals) if vals else math.nan

    return AbsorptionResult(
        mean_absorption_fraction=mean([la.mean_absorption_fraction for la in scored]),
        mean_full_absorption_rate=mean([la.full_absorption_rate for la in scored]),
        mean_num_split_features=mean([float(la.num_split_features) for la in scored]),
        n_letters_evaluated=len(scored),
        group_rank=r,
        letters=tuple(letters),
    )


def min_absorption_words(test_fraction: float = 0.2, n_icl: int = N_ICL) -> int:
    """The fewest words (``max_words``) whose train and test splits each hold more than ``n_icl``
    words, as prompts built from a tokenizer need (each split's examples come from that split)."""
    if not (isinstance(test_fraction, float) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if isinstance(n_icl, bool) or not isinstance(n_icl, int) or n_icl < 0:
        raise ValueError(f"n_icl must be an integer >= 0, got {n_icl!r}")
    n = 2
    while min(round(n * test_fraction), n - round(n * test_fraction)) <= n_icl:
        n += 1
    return n


@dataclass(frozen=True)
class SpellingSplit:
    """The SAE-independent half of the absorption metric: word activations at one hook and each
    word's first letter (index into :data:`LETTERS`), train and test."""

    train_x: torch.Tensor
    train_letters: torch.Tensor
    test_x: torch.Tensor
    test_letters: torch.Tensor


def spelling_split(
    model: Any,
    hook_name: str,
    prompts: SpellingPrompts | Any,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 32,
    max_words: int | None = None,
    progress: bool = False,
) -> SpellingSplit:
    """Split the words of ``prompts`` into train / test and read their activations at ``hook_name``.

    ``prompts`` is :class:`SpellingPrompts` or a tokenizer (then :func:`spelling_prompts` on its
    alphabetic vocabulary, each split's in-context examples drawn from that split). The words
    are split ``1 - test_fraction`` / ``test_fraction`` (seeded); ``max_words`` keeps a seeded
    sample of that many words first (quick runs).
    """
    if not (isinstance(test_fraction, float) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if max_words is not None and (
        isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 4
    ):
        raise ValueError(f"max_words must be None or an integer >= 4, got {max_words!r}")
    if max_words is not None and not isinstance(prompts, SpellingPrompts) and max_words < (
        least := min_absorption_words(test_fraction)
    ):
        raise ValueError(
            f"max_words {max_words} is too few to build prompts from a tokenizer: each split needs more "
            f"than {N_ICL} words, so max_words must be >= {least} (test_fraction {test_fraction})"
        )
    resolve_hook_name(model, hook_name)
    vocab = None if isinstance(prompts, SpellingPrompts) else alphabetic_vocabulary(prompts)
    n = len(prompts.words) if vocab is None else len(vocab)
    if max_words is not None and max_words < n:
        keep = sorted(random.Random(seed).sample(range(n), max_words))
        if vocab is None:
            prompts = prompts.subset(keep)
        else:
            vocab = [vocab[i] for i in keep]
        n = max_words
    n_test = round(n * test_fraction)
    if n_test < 2 or n - n_test < 2:
        raise ValueError(
            f"{n} words with test_fraction {test_fraction} leave fewer than 2 words in a split"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    te, tr = perm[:n_test], perm[n_test:]
    if vocab is None:
        p_tr, p_te = prompts.subset(tr), prompts.subset(te)
    else:  # each split's in-context examples come from that split only (as SAEBench)
        p_tr = spelling_prompts(prompts, [vocab[i] for i in tr], seed=seed)
        p_te = spelling_prompts(prompts, [vocab[i] for i in te], seed=seed)
    return SpellingSplit(
        train_x=spelling_activations(model, hook_name, p_tr, batch_size=batch_size, progress=progress),
        train_letters=p_tr.letters,
        test_x=spelling_activations(model, hook_name, p_te, batch_size=batch_size, progress=progress),
        test_letters=p_te.letters,
    )


def absorption_of_split(
    sae: Any, split: SpellingSplit, settings: AbsorptionSettings | None = None
) -> AbsorptionResult:
    """:func:`absorption_from_activations` on a :class:`SpellingSplit`."""
    if not isinstance(split, SpellingSplit):
        raise ValueError(f"split must be SpellingSplit, got {type(split).__name__}")
    return absorption_from_activations(
        sae, split.train_x, split.train_letters, split.test_x, split.test_letters, settings
    )


def first_letter_absorption(
    model: Any,
    sae: Any,
    hook_name: str,
    prompts: SpellingPrompts | Any,
    *,
    settings: AbsorptionSettings | None = None,
    **split_options: Any,
) -> AbsorptionResult:
    """Absorption of ``sae`` at ``hook_name`` of ``model`` on the first-letter task:
    :func:`absorption_of_split` of :func:`spelling_split` (``split_options``: its keyword
    arguments ``test_fraction``, ``seed``, ``batch_size``, ``max_words``, ``progress``)."""
    if settings is not None and not isinstance(settings, AbsorptionSettings):
        raise ValueError(f"settings must be AbsorptionSettings, got {type(settings).__name__}")
    return absorption_of_split(sae, spelling_split(model, hook_name, prompts, **split_options), settings)
