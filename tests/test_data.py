import gzip
import json

import pytest
from transformers import PreTrainedTokenizerFast

from sae_ext import data


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built in-process (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def test_embedded_corpus_ships_with_license_and_splits_are_disjoint() -> None:
    path = data.corpus_path()
    assert path.is_file()
    assert (path.parent / data.LICENSE_FILE).read_text().count("PYTHON SOFTWARE FOUNDATION LICENSE") == 1
    train, held_out = data.default_paragraphs("train"), data.default_paragraphs("eval")
    assert len(train) > 10_000 and len(held_out) > 1_000
    assert not set(train[-50:]) & set(held_out[:50])
    assert len(train) + len(held_out) == len(data.default_paragraphs("all"))
    with pytest.raises(ValueError, match="split"):
        data.default_paragraphs("test")  # type: ignore[arg-type]


def test_tokenize_texts_gives_fixed_length_rows_with_bos_and_eos_separators() -> None:
    tok = _char_tokenizer()
    texts = [" ".join(f"w{i}" for i in range(n)) for n in (5, 7, 30)]
    ds = data.tokenize_texts(texts, tok, context_size=8)
    rows = ds["input_ids"]
    assert all(len(r) == 8 for r in rows)
    assert all(r[0] == tok.bos_token_id for r in rows)
    assert tok.eos_token_id in rows[0]  # sequences are EOS-separated
    limited = data.tokenize_texts(texts, tok, context_size=8, n_tokens=16)
    assert len(limited) == 2
    with pytest.raises(ValueError, match="context_size"):
        data.tokenize_texts(texts, tok, context_size=1)
    with pytest.raises(ValueError, match="n_tokens"):
        data.tokenize_texts(texts, tok, context_size=8, n_tokens=4)


def test_local_text_files_replace_the_default(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("w1 w2 w3\n\nw4 w5\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("w6 w7 w8 w9\n")
    assert data.text_files_paragraphs([tmp_path]) == ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    ds = data.default_token_dataset(_char_tokenizer(), context_size=4, text_files=[tmp_path])
    assert len(ds) >= 2
    with pytest.raises(FileNotFoundError):
        data.text_files_paragraphs([tmp_path / "missing.txt"])


def test_hf_token_dataset_streams_a_local_dataset(tmp_path) -> None:
    """``hf_token_dataset`` on a local JSON-lines file through the packaged ``json`` builder
    (offline): the rows equal tokenizing the same texts directly."""
    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(9)) for i in range(6)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    tok = _char_tokenizer()
    ds = data.hf_token_dataset("json", tok, context_size=8, n_tokens=32, text_column="body",
                               data_files=str(path))  # fmt: skip
    assert ds["input_ids"] == data.tokenize_texts(texts, tok, context_size=8, n_tokens=32)["input_ids"]
    assert len(ds) == 4
    with pytest.raises(ValueError, match=r"no 'text' column; its columns are \['body', 'id'\]"):
        data.hf_token_dataset("json", tok, context_size=8, data_files=str(path))
