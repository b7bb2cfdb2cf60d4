"""Tests for the caption Tokenizer: special ids, padding/truncation, loading foreign tokenizer.json, CLI."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from softalign.data import tokenizer as tokmod
from softalign.data.synthetic import caption_corpus
from softalign.data.tokenizer import Tokenizer

L = 24


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(caption_corpus(2000, seed=5), vocab_size=512, context_length=L)


def test_special_ids_and_layout(tok):
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    assert 259 <= tok.vocab_size <= 512 and tok.context_length == L
    text = "a large red circle in the top left"
    n = int(tok.token_lengths([text])[0])
    row = tok.encode(text)
    assert row.dtype == np.int32 and row.shape == (L,)
    assert row[0] == tok.sot_id and row[n + 1] == tok.eot_id
    assert np.all(row[n + 2:] == tok.pad_id) and np.sum(row == tok.eot_id) == 1
    empty = tok.encode("")
    assert list(empty[:2]) == [tok.sot_id, tok.eot_id] and np.all(empty[2:] == tok.pad_id)


def test_round_trip_normalises_case_and_space(tok):
    texts = caption_corpus(200, seed=9)
    fits = [t for t, n in zip(texts, tok.token_lengths(texts)) if n + 2 <= L]
    assert len(fits) > 150
    for text in fits:
        assert tok.decode(tok.encode(text)) == " ".join(text.lower().split())
    assert tok.decode(tok.encode("  A   BIG\tBlue  Ring ")) == "a big blue ring"


def test_truncation_keeps_eot_last(tok):
    huge = "a small green triangle at the bottom " * 2800   # ~100 kB
    assert len(huge) > 100_000
    rows = tok.encode_batch([huge, "a cross"])
    assert rows.shape == (2, L)
    assert rows[0, 0] == tok.sot_id and rows[0, -1] == tok.eot_id
    assert np.sum(rows[0] == tok.eot_id) == 1 and not np.any(rows[0] == tok.pad_id)
    assert tok.decode(rows[0]).startswith("a small green triangle")


def test_literal_special_token_text_is_not_a_special(tok):
    row = tok.encode("a red <|endoftext|> ring")
    assert np.sum(row == tok.eot_id) == 1
    assert "<|endoftext|>" in tok.decode(row)


def test_save_and_reload(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    again = Tokenizer.from_file(str(path), context_length=L)
    texts = caption_corpus(50, seed=1)
    assert np.array_equal(again.encode_batch(texts), tok.encode_batch(texts))
    assert (again.pad_id, again.sot_id, again.eot_id) == (0, 1, 2)


def _clip_like(tmp_path) -> str:
    """A tokenizer.json shaped like CLIP's: <|startoftext|>/<|endoftext|>, no pad, a post-processor."""
    vocab = {"!": 0, "a": 1, "red": 2, "circle": 3, "[UNK]": 4, "<|startoftext|>": 5, "<|endoftext|>": 6}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 5), ("<|endoftext|>", 6)])
    hf.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    path = str(tmp_path / "clip_like.json")
    hf.save(path)
    return path


def test_foreign_tokenizer_without_pad(tmp_path):
    tok = Tokenizer.from_file(_clip_like(tmp_path), context_length=6)
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (5, 6, 0)
    rows = tok.encode_batch(["a red circle", "a red circle a red circle"])
    assert rows[0].tolist() == [5, 1, 2, 3, 6, 0]     # specials added once, by us
    assert rows[1].tolist() == [5, 1, 2, 3, 1, 6]


def test_missing_specials_raise(tmp_path):
    hf = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    path = str(tmp_path / "bare.json")
    hf.save(path)
    with pytest.raises(ValueError, match="start/end"):
        Tokenizer.from_file(path, context_length=8)


def test_cli_text_file(tmp_path):
    captions = tmp_path / "caps.txt"
    captions.write_text("\n".join(caption_corpus(300, seed=2)) + "\n\n")
    out = tmp_path / "tok.json"
    proc = subprocess.run([sys.executable, "-m", "softalign.data.tokenizer", f"--captions={captions}",
                           "--vocab_size=400", f"--output={out}"], capture_output=True, text=True,
                          check=True, timeout=60)
    assert "300 captions" in proc.stdout and proc.stdout.count("\n") == 1
    assert Tokenizer.from_file(str(out), context_length=L).vocab_size <= 400


def test_cli_csv_and_errors(tmp_path):
    path = tmp_path / "caps.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "caption"])
        writer.writeheader()
        for i, cap in enumerate(caption_corpus(100, seed=3)):
            writer.writerow({"url": f"img{i}.png", "caption": cap})
    out = tmp_path / "tok.json"
    summary = tokmod.main([f"--captions={path}", "--vocab_size=300", f"--output={out}"])
    assert "100 captions" in summary and out.exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("url,text\nx,y\n")
    with pytest.raises(ValueError, match="caption"):
        tokmod.main([f"--captions={bad}", f"--output={out}"])
