"""The embedded default text and tokenization into fixed-length ``input_ids`` datasets.

The default corpus is Python-3.11-documentation prose shipped inside the package
(``resources/python-docs-prose.txt.gz``, PSF License, see ``resources/LICENSE-python-docs.txt``),
one paragraph a line. The last ``EVAL_FRACTION`` of the paragraphs are held out as the
``"eval"`` split so that evaluation never sees training text. Any local text file(s) or any
Hugging Face dataset with a ``text`` column can be used instead.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

CORPUS_FILE = "python-docs-prose.txt.gz"
LICENSE_FILE = "LICENSE-python-docs.txt"
EVAL_FRACTION = 0.1
Split = Literal["train", "eval", "all"]


def corpus_path() -> Path:
    """Path of the embedded corpus file."""
    return Path(str(resources.files("sae_ext") / "resources" / CORPUS_FILE))


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        return [line.strip() for line in f if line.strip()]


def default_paragraphs(split: Split = "train") -> list[str]:
    """Paragraphs of the embedded corpus; ``split`` picks the train (first 90 %) or eval part."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    lines = _read_lines(corpus_path())
    cut = int(len(lines) * (1 - EVAL_FRACTION))
    return {"train": lines[:cut], "eval": lines[cut:], "all": lines}[split]


def text_files_paragraphs(paths: Iterable[str | Path]) -> list[str]:
    """Non-empty lines of local ``.txt`` / ``.txt.gz`` files (or of every such file in a folder)."""
    out: list[str] = []
    for p in map(Path, paths):
        files = sorted([*p.rglob("*.txt"), *p.rglob("*.txt.gz")]) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no text files at {p}")
        for f in files:
            out.extend(_read_lines(f))
    return out


def tokenize_texts(
    texts: Iterable[str],
    tokenizer: Any,
    context_size: int = 128,
    n_tokens: int | None = None,
    prepend_bos: bool = True,
) -> Dataset:
    """Concatenate ``texts`` (EOS-separated) into rows of exactly ``context_size`` token ids.

    Uses SAELens's own ``concat_and_batch_sequences`` so rows look exactly like the ones its
    ``ActivationsStore`` builds from raw text. Stops after ``n_tokens`` tokens if given.
    """
    if context_size < 2:
        raise ValueError(f"context_size must be >= 2, got {context_size}")
    if n_tokens is not None and n_tokens < context_size:
        raise ValueError(f"n_tokens ({n_tokens}) must be at least context_size ({context_size})")

    def token_iter() -> Iterator[torch.Tensor]:
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                yield torch.tensor(ids, dtype=torch.long)

    bos = tokenizer.bos_token_id if prepend_bos else None
    rows: list[list[int]] = []
    max_rows = None if n_tokens is None else n_tokens // context_size
    for row in concat_and_batch_sequences(
        token_iter(),
        context_size=context_size,
        begin_batch_token_id=bos,
        sequence_separator_token_id=tokenizer.eos_token_id,
    ):
        rows.append(row.tolist())
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise ValueError("the texts produced no full row of context_size tokens")
    return Dataset.from_dict({"input_ids": rows})


def default_token_dataset(
    tokenizer: Any,
    context_size: int = 128,
    n_tokens: int | None = None,
    split: Split = "train",
    text_files: Iterable[str | Path] | None = None,
) -> Dataset:
    """The embedded corpus (or ``text_files``) tokenized into fixed-length ``input_ids`` rows."""
    texts = text_files_paragraphs(text_files) if text_files else default_paragraphs(split)
    return tokenize_texts(texts, tokenizer, context_size=context_size, n_tokens=n_tokens)


def hf_token_dataset(
    name_or_path: str,
    tokenizer: Any,
    context_size: int = 128,
    n_tokens: int | None = None,
    split: str = "train",
    text_column: str = "text",
    **load_kwargs: Any,
) -> Dataset:
    """Any Hugging Face dataset (a local path, a packaged builder such as ``"json"`` with
    ``data_files=``, or a cached name) with a text column, streamed and tokenized."""
    from datasets import load_dataset

    ds = load_dataset(name_or_path, split=split, streaming=True, **load_kwargs)

    def texts() -> Iterator[str]:
        for row in ds:
            if text_column not in row:
                raise ValueError(
                    f"the dataset has no {text_column!r} column; its columns are {sorted(row)}"
                )
            yield row[text_column]

    return tokenize_texts(texts(), tokenizer, context_size=context_size, n_tokens=n_tokens)
