"""k-sparse probing (SAEBench's ``sparse_probing``) and the scaffold-vs-sparse-latents topic test.

**Pooling.** Each text is tokenized (BOS prepended, truncated to ``context_size``) and run to the
hook; the activation ``x``, the SAE codes ``f = encode(x)`` and — for scaffolded SAEs — the
scaffold ``s`` are averaged over the text's non-special tokens (BOS, EOS, PAD never count), as
SAEBench mean-pools model and SAE activations over its masked tokens.

**k-sparse probing.** For every class, a binary one-vs-rest task: the class's texts against an
equal number drawn evenly from the other classes (seeded), on train and test alike. The top-``k``
latents by ``|mean(positive) − mean(negative)|`` of the pooled train codes feed a logistic probe
(:func:`sae_ext.probes.fit_logistic`, sklearn's C = 1 objective); its test accuracy, averaged over
classes, is the score for ``k``. The dense baseline is the same probe on all of the pooled raw
activation.

**Scaffold vs sparse latents (item 3 of issue #23; Deng et al.'s topic experiment).** Section
classification (the same balanced one-vs-rest dense probes, refitted on the edited train
activations and scored on the edited test activations: what information is left) from

- the activation with the scaffold removed, ``x − s`` (what zeroing ``hook_scaffold`` with the
  error term leaves), and
- the activation with the ``N`` most topic-aligned sparse latents ablated, ``x − Σ_{j∈N} f_j W_dec[j]``
  (their decoded contribution removed, the error term kept), the latents ranked by their largest
  one-vs-rest ``|class-mean difference|`` on the pooled train codes.

Pooling commutes with both edits (they are linear in the per-token quantities), so they are
applied to the pooled vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_ext.labelled_text import LabelledTexts
from sae_ext.metrics.absorption import SpellingSplit
from sae_ext.model_io import (
    _grab,
    input_device,
    resolve_hook_name,
    special_token_ids,
    special_token_mask,
)
from sae_ext.probes import fit_logistic, sae_codes

__all__ = [
    "DEFAULT_CONTEXT_SIZE",
    "DEFAULT_KS",
    "PooledActivations",
    "ProbeData",
    "ScaffoldTopicResult",
    "SparseProbingResult",
    "TextActivations",
    "balanced_task",
    "k_sparse_probing",
    "pool",
    "pooled_activations",
    "probe_data",
    "probe_metrics",
    "probe_metrics_of",
    "scaffold_topic_ablation",
    "text_activations",
    "top_k_mean_diff",
    "topic_aligned_latents",
]

DEFAULT_KS: tuple[int, ...] = (1, 2, 5, 20)
#: Tokens per text at most (SAEBench's sparse-probing context length).
DEFAULT_CONTEXT_SIZE = 128


@dataclass(frozen=True)
class PooledActivations:
    """Mean-pooled ``x [n, d_in]``, codes ``f [n, d_sae]``, scaffold ``s [n, d_in]`` (or None)
    and the labels ``[n]`` of ``n`` texts."""

    x: torch.Tensor
    codes: torch.Tensor
    scaffold: torch.Tensor | None
    labels: torch.Tensor
    classes: tuple[str, ...]


def _check_int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


@dataclass(frozen=True)
class TextActivations:
    """The SAE-independent half of pooling: the activations ``x [N, d_in]`` (float32) of the ``N``
    pooled tokens of ``n`` texts at one hook, each token's text index ``text [N]``, and the texts'
    labels ``[n]``. One model pass serves every SAE of that hook (:func:`pool`)."""

    x: torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]


@torch.no_grad()
def text_activations(
    model: Any,
    hook_name: str,
    data: LabelledTexts,
    *,
    tokenizer: Any = None,
    context_size: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> TextActivations:
    """Run every text of ``data`` to ``hook_name`` and keep its non-special tokens (BOS prepended,
    texts cut to ``context_size`` tokens, default ``min(128, n_ctx)``; ``tokenizer`` defaults to
    ``model.tokenizer``)."""
    if not isinstance(data, LabelledTexts) or len(data) == 0:
        raise ValueError(f"data must be non-empty LabelledTexts, got {type(data).__name__}")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if context_size is None:
        context_size = min(DEFAULT_CONTEXT_SIZE, n_ctx or DEFAULT_CONTEXT_SIZE)
    _check_int("context_size", context_size, 2)
    _check_int("batch_size", batch_size, 1)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("no tokenizer: pass tokenizer= or use a model that has one")
    if n_ctx and context_size > n_ctx:
        raise ValueError(f"context_size {context_size} exceeds the model's n_ctx {n_ctx}")
    hook = resolve_hook_name(model, hook_name)
    special = special_token_ids(model, tok)
    bos = getattr(tok, "bos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (bos if bos is not None else 0)
    rows = []
    for text in data.texts:
        ids = ([bos] if bos is not None else []) + list(
            tok(text, add_special_tokens=False)["input_ids"]
        )
        rows.append(ids[:context_size])
    xs, owner = [], []
    dev = input_device(model)
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=f"texts at {hook_name}", unit="batch", disable=not progress):
        batch = rows[start : start + batch_size]
        width = max(map(len, batch))
        toks = torch.tensor([r + [pad] * (width - len(r)) for r in batch], dtype=torch.long)
        keep = torch.tensor([[i < len(r) for i in range(width)] for r in batch])
        mask = special_token_mask(toks, special)
        if mask is not None:
            keep &= ~mask
        if bool((keep.sum(1) == 0).any()):
            raise ValueError("a text has no non-special token to pool over")
        act = _grab(model, hook, toks.to(dev), None).float().cpu()  # [batch, pos, d_in]
        xs.append(act[keep])
        owner.append((torch.arange(len(batch)) + start).unsqueeze(1).expand_as(keep)[keep])
    return TextActivations(
        x=torch.cat(xs),
        text=torch.cat(owner),
        labels=torch.tensor(data.labels, dtype=torch.long),
        classes=data.classes,
    )


@torch.no_grad()
def pool(sae: Any, acts: TextActivations, *, batch_size: int = 4096) -> PooledActivations:
    """Mean-pool ``x``, ``encode(x)`` and (scaffolded SAEs) ``sae.scaffold(x)`` over each text's
    tokens of ``acts``."""
    if not isinstance(acts, TextActivations):
        raise ValueError(f"acts must be TextActivations, got {type(acts).__name__}")
    if int(sae.cfg.d_in) != acts.x.shape[1]:
        raise ValueError(
            f"the SAE's d_in {int(sae.cfg.d_in)} differs from the activations' width {acts.x.shape[1]}"
        )
    _check_int("batch_size", batch_size, 1)
    n = len(acts.labels)
    count = torch.zeros(n).index_add_(0, acts.text, torch.ones(len(acts.text))).unsqueeze(1)
    has_scaffold = hasattr(sae, "scaffold") and hasattr(sae, "scaffold_subspace")
    p = next(sae.parameters())
    codes = torch.zeros(n, int(sae.cfg.d_sae))
    scaffold = torch.zeros(n, acts.x.shape[1]) if has_scaffold else None
    for x, owner in zip(torch.split(acts.x, batch_size), torch.split(acts.text, batch_size), strict=True):
        codes.index_add_(0, owner, sae_codes(sae, x, batch_size))
        if scaffold is not None:
            scaffold.index_add_(0, owner, sae.scaffold(x.to(p.device, p.dtype)).float().cpu())
    return PooledActivations(
        x=torch.zeros(n, acts.x.shape[1]).index_add_(0, acts.text, acts.x) / count,
        codes=codes / count,
        scaffold=scaffold / count if scaffold is not None else None,
        labels=acts.labels,
        classes=acts.classes,
    )


def pooled_activations(
    model: Any,
    sae: Any,
    hook_name: str,
    data: LabelledTexts,
    *,
    tokenizer: Any = None,
    context_size: int | None = None,
    batch_size: int = 8,
) -> PooledActivations:
    """Pool ``x``, ``encode(x)`` and (scaffolded SAEs) ``sae.scaffold(x)`` over the non-special
    tokens of every text of ``data``: :func:`pool` of :func:`text_activations`."""
    if int(sae.cfg.d_in) <= 0:
        raise ValueError("the SAE has no input width")
    acts = text_activations(
        model, hook_name, data, tokenizer=tokenizer, context_size=context_size, batch_size=batch_size
    )  # fmt: skip
    return pool(sae, acts)


def balanced_task(labels: torch.Tensor, cls: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and 0/1 targets of ``cls`` against an equal number of other-class examples,
    drawn evenly from each other class (SAEBench's balanced one-vs-rest task)."""
    pos = (labels == cls).nonzero().flatten()
    others = [c for c in labels.unique().tolist() if c != cls]
    if pos.numel() == 0 or not others:
        raise ValueError(f"class {cls} needs examples of its own and of another class")
    g = torch.Generator().manual_seed(seed * 1009 + cls)
    per = math.ceil(pos.numel() / len(others))
    neg = torch.cat([
        (labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=g)[:per]]
        for c in others
    ])  # fmt: skip
    neg = neg[torch.randperm(neg.numel(), generator=g)[: pos.numel()]]
    idx = torch.cat([pos, neg])
    y = torch.cat(
        [torch.ones(pos.numel(), dtype=torch.long), torch.zeros(neg.numel(), dtype=torch.long)]
    )
    return idx, y


def top_k_mean_diff(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` columns of ``x`` with the largest ``|mean(x | y=1) − mean(x | y=0)|``."""
    _check_int("k", k, 1)
    if k > x.shape[1]:
        raise ValueError(f"k = {k} exceeds the {x.shape[1]} available columns")
    diff = (x[y == 1].mean(0) - x[y == 0].mean(0)).abs()
    return diff.argsort(descending=True)[:k]


def _check_pooled(train: Any, test: Any) -> None:
    for name, p in (("train", train), ("test", test)):
        if not isinstance(p, PooledActivations):
            raise ValueError(f"{name} must be PooledActivations, got {type(p).__name__}")
    if (
        train.classes != test.classes
        or train.x.shape[1] != test.x.shape[1]
        or train.codes.shape[1] != test.codes.shape[1]
    ):
        raise ValueError("train and test must come from the same SAE, hook and classes")
    for c in range(len(train.classes)):
        for name, p in (("train", train), ("test", test)):
            if int((p.labels == c).sum()) == 0:
                raise ValueError(f"class {train.classes[c]!r} has no {name} example")


def _probe_accuracy(
    xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor
) -> float:
    probe = fit_logistic(xtr, ytr, class_weight=None)
    return float((probe.predict(xte)[:, 0] == yte).float().mean())


def _dense_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                    n_classes: int, seed: int) -> dict[int, float]:  # fmt: skip
    out = {}
    for c in range(n_classes):
        itr, ytr = balanced_task(train_y, c, seed)
        ite, yte = balanced_task(test_y, c, seed)
        out[c] = _probe_accuracy(train_x[itr], ytr, test_x[ite], yte)
    return out


@dataclass(frozen=True)
class SparseProbingResult:
    """Mean test accuracy over classes: the dense probe and the top-k sparse probes."""

    dense_accuracy: float
    sparse_accuracy: dict[int, float]
    per_class_dense: dict[str, float]
    per_class_sparse: dict[int, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def k_sparse_probing(
    train: PooledActivations,
    test: PooledActivations,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    seed: int = 0,
) -> SparseProbingResult:
    """SAEBench's k-sparse probing on pooled activations (see the module doc)."""
    _check_pooled(train, test)
    ks = _check_ks(ks, train.codes.shape[1])
    names = train.classes
    dense = _dense_accuracy(train.x, train.labels, test.x, test.labels, len(names), seed)
    sparse: dict[int, dict[str, float]] = {k: {} for k in ks}
    for c, name in enumerate(names):
        itr, ytr = balanced_task(train.labels, c, seed)
        ite, yte = balanced_task(test.labels, c, seed)
        for k in ks:
            cols = top_k_mean_diff(train.codes[itr], ytr, k)
            xtr, xte = train.codes[itr][:, cols], test.codes[ite][:, cols]
            if float(xtr.abs().sum()) == 0:  # no selected latent ever fires: chance-level probe
                sparse[k][name] = float((yte == 0).float().mean())
            else:
                sparse[k][name] = _probe_accuracy(xtr, ytr, xte, yte)
    return SparseProbingResult(
        dense_accuracy=sum(dense.values()) / len(dense),
        sparse_accuracy={k: sum(v.values()) / len(v) for k, v in sparse.items()},
        per_class_dense={names[c]: a for c, a in dense.items()},
        per_class_sparse=sparse,
    )


@dataclass(frozen=True)
class ScaffoldTopicResult:
    """Mean section-classification accuracy of dense probes on edited activations."""

    baseline_accuracy: float
    scaffold_removed_accuracy: float
    latents_ablated_accuracy: float
    n_latents_ablated: int
    scaffold_rank: int
    ablated_latents: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def topic_aligned_latents(codes: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` latents with the largest one-vs-rest ``|class-mean difference|`` over classes."""
    _check_int("n_latents", n, 1)
    if n > codes.shape[1]:
        raise ValueError(f"n_latents = {n} exceeds d_sae = {codes.shape[1]}")
    diffs = torch.stack([
        (codes[labels == c].mean(0) - codes[labels != c].mean(0)).abs() for c in labels.unique().tolist()
    ])  # fmt: skip
    return diffs.max(0).values.argsort(descending=True)[:n]


def scaffold_topic_ablation(
    sae: Any, train: PooledActivations, test: PooledActivations, n_latents: int, *, seed: int = 0
) -> ScaffoldTopicResult:
    """Section classification from ``x``, from ``x − s`` and from ``x`` minus the decoded
    contribution of the ``n_latents`` most topic-aligned sparse latents (see the module doc)."""
    _check_pooled(train, test)
    if train.scaffold is None or test.scaffold is None or not hasattr(sae, "scaffold_subspace"):
        raise ValueError("scaffold_topic_ablation needs a scaffolded SAE (scaffold_batchtopk, "
                         "scaffold_matryoshka_batchtopk, scaffold_jumprelu) and its pooled scaffold")  # fmt: skip
    _check_int("n_latents", n_latents, 1)
    if n_latents > train.codes.shape[1]:
        raise ValueError(f"n_latents = {n_latents} exceeds d_sae = {train.codes.shape[1]}")
    n = len(train.classes)

    def acc(xtr: torch.Tensor, xte: torch.Tensor) -> float:
        per = _dense_accuracy(xtr, train.labels, xte, test.labels, n, seed)
        return sum(per.values()) / len(per)

    latents = topic_aligned_latents(train.codes, train.labels, n_latents)
    param = next(sae.parameters())

    @torch.no_grad()
    def ablate(p: PooledActivations) -> torch.Tensor:
        # the latents' decoded contribution: decode(f restricted to them) − decode(0), which
        # holds whatever decoder-norm convention the architecture uses (no scaffold is pending)
        kept = torch.zeros_like(p.codes)
        kept[:, latents] = p.codes[:, latents]
        kept = kept.to(param.device, param.dtype)
        contribution = sae.decode(kept) - sae.decode(torch.zeros_like(kept))
        return p.x - contribution.float().cpu()

    return ScaffoldTopicResult(
        baseline_accuracy=acc(train.x, test.x),
        scaffold_removed_accuracy=acc(train.x - train.scaffold, test.x - test.scaffold),
        latents_ablated_accuracy=acc(ablate(train), ablate(test)),
        n_latents_ablated=n_latents,
        scaffold_rank=int(sae.cfg.scaffold_rank),
        ablated_latents=tuple(int(i) for i in latents),
    )


def _check_ks(ks: Sequence[int], d_sae: int) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must hold at least one k")
    for k in ks:
        _check_int("every k", k, 1)
        if k > d_sae:
            raise ValueError(f"k = {k} exceeds d_sae = {d_sae}")
    return ks


@dataclass(frozen=True)
class ProbeData:
    """Everything :func:`probe_metrics` reads from the model at one hook: the Python-docs
    sections' token activations (train, test) and the spelling words' activations. Built once
    (:func:`probe_data`), it scores any number of SAEs of that hook (:func:`probe_metrics_of`)."""

    hook_name: str
    train: TextActivations
    test: TextActivations
    spelling: SpellingSplit
    seed: int


def probe_data(
    model: Any,
    hook_name: str,
    *,
    tokenizer: Any = None,
    per_class: int | None = None,
    absorption_words: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> ProbeData:
    """The model's half of issue #23's metrics at ``hook_name``; ``per_class`` /
    ``absorption_words`` cap the data (quick runs); ``progress`` shows tqdm bars."""
    from sae_ext.labelled_text import python_doc_sections
    from sae_ext.metrics.absorption import spelling_split

    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("no tokenizer: pass tokenizer= or use a model that has one")
    _check_int("seed", seed, 0)
    resolve_hook_name(model, hook_name)
    train, test = (
        text_activations(model, hook_name, python_doc_sections(split, per_class=per_class),
                         tokenizer=tok, batch_size=batch_size, progress=progress)
        for split in ("train", "test")
    )  # fmt: skip
    spelling = spelling_split(
        model, hook_name, tok, seed=seed, batch_size=batch_size, max_words=absorption_words,
        progress=progress,
    )  # fmt: skip
    return ProbeData(hook_name, train, test, spelling, seed)


def _check_sae_for(sae: Any, ks: Sequence[int], n_topic_latents: int | None) -> tuple[int, ...]:
    d_sae = int(sae.cfg.d_sae)
    if n_topic_latents is not None:
        _check_int("n_topic_latents", n_topic_latents, 1)
        if n_topic_latents > d_sae:
            raise ValueError(f"n_topic_latents = {n_topic_latents} exceeds d_sae = {d_sae}")
    return _check_ks(ks, d_sae)


def probe_metrics_of(
    sae: Any,
    data: ProbeData,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    n_topic_latents: int | None = None,
) -> dict[str, Any]:
    """Issue #23's metrics of ``sae`` on ``data`` (see :func:`probe_metrics`)."""
    from sae_ext.metrics.absorption import absorption_of_split

    if not isinstance(data, ProbeData):
        raise ValueError(f"data must be ProbeData, got {type(data).__name__}")
    if int(sae.cfg.d_in) != data.train.x.shape[1]:
        raise ValueError(
            f"the SAE's d_in {int(sae.cfg.d_in)} differs from the width {data.train.x.shape[1]} "
            f"of the activations at {data.hook_name}"
        )
    ks = _check_sae_for(sae, ks, n_topic_latents)
    train, test = pool(sae, data.train), pool(sae, data.test)
    out: dict[str, Any] = {
        "k_sparse_probing": k_sparse_probing(train, test, ks, seed=data.seed).to_dict()
    }
    if train.scaffold is not None:
        n = n_topic_latents or min(16 * int(sae.cfg.scaffold_rank), int(sae.cfg.d_sae))
        out["scaffold_topic"] = scaffold_topic_ablation(sae, train, test, n, seed=data.seed).to_dict()
    out["absorption"] = absorption_of_split(sae, data.spelling).to_dict()
    return out


def probe_metrics(
    model: Any,
    sae: Any,
    hook_name: str,
    *,
    tokenizer: Any = None,
    ks: Sequence[int] = DEFAULT_KS,
    n_topic_latents: int | None = None,
    per_class: int | None = None,
    absorption_words: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """All of issue #23's interpretability metrics of ``sae`` at ``hook_name`` as one dict:
    first-letter absorption, k-sparse probing on the Python-docs sections and, for scaffolded
    SAEs, the scaffold-vs-sparse-latents topic test (``n_topic_latents`` defaults to the
    scaffold rank times 16). ``per_class`` / ``absorption_words`` cap the data (quick runs).
    Several SAEs of one hook share one model pass with :func:`probe_data` and
    :func:`probe_metrics_of`."""
    _check_sae_for(sae, ks, n_topic_latents)
    data = probe_data(
        model, hook_name, tokenizer=tokenizer, per_class=per_class,
        absorption_words=absorption_words, batch_size=batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    return probe_metrics_of(sae, data, ks=ks, n_topic_latents=n_topic_latents)
