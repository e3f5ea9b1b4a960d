"""Build ``sae_ext/resources/python-docs-sections.tsv.gz``: Python-docs prose labelled by section.

Reproducible from Debian's ``python3.11-doc`` package (PSF License; the notice ships in
``sae_ext/resources/LICENSE-python-docs.txt``)::

    cd /tmp && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/build_labelled_docs.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources

Each reST source under ``tutorial/``, ``library/``, ``reference/``, ``howto/`` and ``faq/`` is cut
into blank-line-separated paragraphs; headings, directives and their indented bodies, literal
blocks (after ``::``), tables, lists, comments and short fragments are dropped; inline markup is
reduced to its text. At most ``--per-class`` paragraphs per section are kept (a seeded sample)
and a seeded ``--test-fraction`` of each section is marked ``test`` (held out for probe
evaluation). Output lines: ``split<TAB>label<TAB>source file<TAB>paragraph``.
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
from pathlib import Path

SECTIONS = ("tutorial", "library", "reference", "howto", "faq")
MIN_WORDS = 25
MAX_WORDS = 220

_ROLE = re.compile(r":[\w:.-]+:`(?:~|!)?([^`<]*?)(?:\s*<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_LITERAL = re.compile(r"``([^`]+)``")
_REF = re.compile(r"`([^`]+)`_{1,2}")
_EMPH = re.compile(r"\*\*?([^*]+)\*\*?")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def _clean(text: str) -> str:
    """Inline reST markup reduced to its visible text, whitespace collapsed."""
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = text.replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(par: str) -> bool:
    words = par.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return False
    if not par[0].isalpha() or par.rstrip()[-1] not in ".:)?!":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in par)
    return letters / len(par) > 0.85 and ">>>" not in par


def paragraphs(path: Path) -> list[str]:
    """Prose paragraphs of one reST file (unindented, non-directive, non-list blocks)."""
    out: list[str] = []
    block: list[str] = []
    skip_indented = False  # inside a directive body or a literal block
    lines = path.read_text(encoding="utf-8").splitlines()

    def flush() -> None:
        if block:
            raw = " ".join(block)
            if not raw.rstrip().endswith("::"):
                par = _clean(raw)
                if par and _is_prose(par):
                    out.append(par)
            block.clear()

    for i, line in enumerate(lines):
        stripped = line.strip()
        indented = line[:1].isspace()
        if skip_indented and (not stripped or indented):
            continue
        skip_indented = False
        if not stripped:
            flush()
            continue
        if indented:  # an indented block outside a directive: a quote, list body, definition
            flush()
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _UNDERLINE.match(line) or _UNDERLINE.match(nxt):  # a heading or its over/underline
            flush()
            continue
        if stripped.startswith(".."):  # directive, comment, target, substitution
            flush()
            skip_indented = True
            continue
        if re.match(r"^([-*+|]|\d+\.|#\.|\+[-=]|=+\s)", stripped):  # lists, line blocks, tables
            flush()
            skip_indented = True
            continue
        block.append(stripped)
        if stripped.endswith("::"):
            flush()
            skip_indented = True
    flush()
    return out


def build(
    sources: Path, per_class: int, test_fraction: float, seed: int
) -> list[tuple[str, str, str, str]]:
    """Rows ``(split, label, source, paragraph)``, grouped by section, train before test."""
    rows: list[tuple[str, str, str, str]] = []
    for label in SECTIONS:
        pars = [
            (str(f.relative_to(sources)), p)
            for f in sorted((sources / label).rglob("*.rst.txt"))
            for p in paragraphs(f)
        ]
        pars = list(dict.fromkeys(pars))  # drop exact duplicates, keep order
        rng = random.Random(f"{seed}-{label}")
        if len(pars) > per_class:
            pars = rng.sample(pars, per_class)
        rng.shuffle(pars)
        n_test = max(1, round(len(pars) * test_fraction))
        rows += [("train", label, s, p) for s, p in pars[n_test:]]
        rows += [("test", label, s, p) for s, p in pars[:n_test]]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "sources", type=Path, help="usr/share/doc/python3.11/html/_sources of python3.11-doc"
    )
    ap.add_argument(
        "--out", type=Path, default=Path("sae_ext/resources/python-docs-sections.tsv.gz")
    )
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = build(args.sources, args.per_class, args.test_fraction, args.seed)
    with gzip.GzipFile(args.out, "wb", mtime=0) as raw:  # mtime=0: byte-reproducible output
        raw.write("".join("\t".join(r) + "\n" for r in rows).encode("utf-8"))
    for label in SECTIONS:
        n = {s: sum(r[0] == s and r[1] == label for r in rows) for s in ("train", "test")}
        print(f"{label:10s} train {n['train']:4d}  test {n['test']:4d}")


if __name__ == "__main__":
    main()
