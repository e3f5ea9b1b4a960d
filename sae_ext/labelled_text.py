"""Labelled text that ships offline: Python-docs paragraphs labelled by section of origin.

``resources/python-docs-sections.tsv.gz`` (PSF License, see ``resources/LICENSE-python-docs.txt``;
rebuilt by ``scripts/build_labelled_docs.py`` from Debian's ``python3.11-doc``) holds a few hundred
prose paragraphs from each of five sections — tutorial, library reference, language reference,
how-to, FAQ — with a fixed train/test split: probes are fitted on ``train`` and scored on
``test`` only (SAEBench's sparse-probing discipline).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

LABELLED_FILE = "python-docs-sections.tsv.gz"
#: The section labels, in the order class indices use.
SECTIONS: tuple[str, ...] = ("tutorial", "library", "reference", "howto", "faq")
LabelledSplit = Literal["train", "test"]


@dataclass(frozen=True)
class LabelledTexts:
    """Paragraphs with integer labels indexing ``classes``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.classes)]
        if bad:
            raise ValueError(
                f"labels must index classes (0..{len(self.classes) - 1}); got {bad[:5]}"
            )

    def __len__(self) -> int:
        return len(self.texts)


def labelled_path() -> Path:
    """Path of the embedded labelled corpus."""
    return Path(str(resources.files("sae_ext") / "resources" / LABELLED_FILE))


def python_doc_sections(
    split: LabelledSplit, *, per_class: int | None = None, path: str | Path | None = None
) -> LabelledTexts:
    """The ``split`` paragraphs of the labelled corpus (labels index :data:`SECTIONS`).

    ``per_class`` keeps the first ``per_class`` paragraphs of each section (the file's order is
    already a seeded shuffle), e.g. for quick runs.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if per_class is not None and (
        isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1
    ):
        raise ValueError(f"per_class must be None or an integer >= 1, got {per_class!r}")
    src = Path(path) if path is not None else labelled_path()
    texts: list[str] = []
    labels: list[int] = []
    counts = dict.fromkeys(SECTIONS, 0)
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4 or parts[0] not in ("train", "test") or parts[1] not in counts:
                raise ValueError(
                    f"{src}:{n}: expected 'split<TAB>section<TAB>source<TAB>text' rows"
                )
            row_split, label, _, text = parts
            if row_split != split or (per_class is not None and counts[label] >= per_class):
                continue
            counts[label] += 1
            texts.append(text)
            labels.append(SECTIONS.index(label))
    return LabelledTexts(tuple(texts), tuple(labels), SECTIONS)
