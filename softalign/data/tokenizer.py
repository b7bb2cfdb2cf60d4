"""Caption tokenizer: a thin wrapper over HF `tokenizers` that emits fixed-length CLIP-style id rows.

Rows are ``[sot] + tokens + [eot]`` padded with ``pad_id``; over-long captions are cut so the last position
holds ``eot`` (the text tower pools there). Works with any tokenizer.json (e.g. CLIP's own, whose specials are
``<|startoftext|>``/``<|endoftext|>`` and which has no pad: pad id 0) or with a byte-level BPE trained here.
CLIP's tokenizer.json, matching ``open_clip.tokenize``: ``python -m softalign.interop.clip_bpe --output=FILE``.

CLI: ``python -m softalign.data.tokenizer --captions=FILE --vocab_size=N --output=tokenizer.json``
(FILE: one caption per line, or a CSV/TSV -- also a .txt whose first line is a header -- with a 'caption' column),
or ``--source=arrayrecord --path=DIR`` to sample captions from any registered data source; with neither it trains
on synthetic captions.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
_SOT_NAMES = (SOT, "<s>", "[CLS]", "<bos>", "<|begin_of_text|>")
_EOT_NAMES = (EOT, "</s>", "[SEP]", "<eos>", "<|end_of_text|>")
_PAD_NAMES = (PAD, "<pad>", "[PAD]")


def _find_token(hf: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = hf.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


class Tokenizer:
    """Fixed-context-length caption tokenizer with explicit start/end/pad ids."""

    def __init__(self, hf: tokenizers.Tokenizer, context_length: int, *, sot_token: str | None = None,
                 eot_token: str | None = None, pad_token: str | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        hf.no_padding()
        hf.no_truncation()
        hf.encode_special_tokens = True   # a literal "<|endoftext|>" inside a caption is just text
        self._hf = hf
        self._context_length = int(context_length)
        sot = _find_token(hf, (sot_token,) if sot_token else _SOT_NAMES)
        eot = _find_token(hf, (eot_token,) if eot_token else _EOT_NAMES)
        if sot is None or eot is None:
            raise ValueError(f"tokenizer lacks start/end tokens (looked for {sot_token or _SOT_NAMES} "
                             f"and {eot_token or _EOT_NAMES}); pass sot_token=/eot_token=")
        pad = _find_token(hf, (pad_token,) if pad_token else _PAD_NAMES)
        self._sot, self._eot, self._pad = sot, eot, 0 if pad is None else pad

    @classmethod
    def from_file(cls, path: str, context_length: int, **special_tokens: str) -> Tokenizer:
        """Loads any tokenizer.json; `special_tokens` may name sot_token/eot_token/pad_token."""
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), context_length, **special_tokens)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, context_length: int,
                  min_frequency: int = 2) -> Tokenizer:
        """Trains a lowercasing byte-level BPE with <|pad|>=0, <|startoftext|>, <|endoftext|>."""
        if vocab_size < 256 + 3:
            raise ValueError(f"byte-level BPE needs vocab_size >= 259, got {vocab_size}")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.normalizer = normalizers.Sequence([
            normalizers.NFKC(), normalizers.Lowercase(),
            normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Strip()])
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[PAD, SOT, EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, context_length)

    def save(self, path: str) -> None:
        """Writes tokenizer.json (loadable by `from_file` and by HF `tokenizers`)."""
        self._hf.save(os.fspath(path))

    @property
    def sot_id(self) -> int:
        return self._sot

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def context_length(self) -> int:
        return self._context_length

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Untruncated token counts (without sot/eot), for statistics."""
        encodings = self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return np.array([len(e.ids) for e in encodings], np.int64)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """int32 (n, context_length): [sot] + tokens + [eot] + pad; eot stays last when truncated."""
        texts = [str(t) for t in texts]
        encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        length = self._context_length
        out = np.full((len(texts), length), self._pad, np.int32)
        out[:, 0] = self._sot
        for row, enc in enumerate(encodings):
            ids = enc.ids[: length - 2]
            out[row, 1:1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self._eot
        return out

    def encode(self, text: str) -> np.ndarray:
        """int32 (context_length,) for one caption."""
        return self.encode_batch([text])[0]

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """Text of one id row: the ids between sot and the first eot (padding ignored)."""
        ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
        if ids and ids[0] == self._sot:
            ids = ids[1:]
        if self._eot in ids:
            ids = ids[: ids.index(self._eot)]
        return self._hf.decode(ids, skip_special_tokens=False).strip()

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, context_length={self._context_length}, "
                f"sot_id={self._sot}, eot_id={self._eot}, pad_id={self._pad})")


def synthetic_tokenizer(context_length: int, vocab_size: int = 1024, num_captions: int = 20_000,
                        seed: int = 0) -> Tokenizer:
    """Byte-level BPE fitted to synthetic captions (the default when no tokenizer.json is given)."""
    from softalign.data.synthetic import caption_corpus  # local import: keeps this module light
    return Tokenizer.train_bpe(caption_corpus(num_captions, seed=seed), vocab_size, context_length)


def corpus_tokenizer(captions: Iterable[str], context_length: int, vocab_size: int = 1024,
                     min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE fitted to a dataset's own captions (e.g. ``sources.sample_captions(data_config, n)``);
    blank captions are ignored."""
    texts = [c for c in (str(c) for c in captions) if c.strip()]
    if not texts:
        raise ValueError("corpus_tokenizer: no non-empty captions to train on")
    return Tokenizer.train_bpe(texts, vocab_size, context_length, min_frequency)


def _has_caption_header(path: str) -> str | None:
    """',' or '\t' when the file's first line is a CSV/TSV header with a 'caption' column, else None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip().lower()
    for delimiter in (",", "\t"):
        if "caption" in [c.strip() for c in first.split(delimiter)]:
            return delimiter
    return None


def read_captions(path: str) -> list[str]:
    """Captions from a text file (one per line) or a CSV/TSV with a 'caption' column (any extension when the
    first line is such a header, e.g. Flickr8k's captions.txt)."""
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    if not path.lower().endswith((".csv", ".tsv")):
        delimiter = _has_caption_header(path)
    if delimiter is not None:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if "caption" not in (reader.fieldnames or ()):
                raise ValueError(f"{path}: no 'caption' column (columns: {reader.fieldnames})")
            captions = [row["caption"] or "" for row in reader]
    else:
        with open(path, encoding="utf-8") as f:
            captions = [line.rstrip("\n") for line in f]
    return [c for c in captions if c.strip()]


def main(argv: Sequence[str] | None = None) -> str:
    """Trains a BPE tokenizer from the command line and returns the printed summary."""
    parser = argparse.ArgumentParser(prog="python -m softalign.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", default=None, help="caption file (.txt lines or .csv/.tsv)")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--output", required=True, help="where to write tokenizer.json")
    parser.add_argument("--context_length", type=int, default=77, help="only for the summary")
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--num_synthetic", type=int, default=20_000,
                        help="synthetic captions to train on when --captions is not given")
    parser.add_argument("--source", default=None,
                        help="sample captions from this data source instead (arrayrecord, webdataset, folder, tfds)")
    parser.add_argument("--path", default="", help="the source's data.path")
    parser.add_argument("--name", default="", help="the source's data.name (tfds)")
    parser.add_argument("--split", default="train", help="the source's split to sample")
    parser.add_argument("--num_captions", type=int, default=100_000, help="captions to sample from --source")
    args = parser.parse_args(argv)
    if args.source:
        from softalign.data.sources import sample_captions
        data_config = {"source": args.source, "path": args.path, "name": args.name, "train_split": args.split}
        captions = sample_captions(data_config, args.num_captions)
        origin = f"{args.source}:{args.path or args.name}"
    elif args.captions:
        captions, origin = read_captions(args.captions), args.captions
    else:
        from softalign.data.synthetic import caption_corpus
        captions, origin = caption_corpus(args.num_synthetic), "synthetic"
    if not captions:
        parser.error(f"no captions found in {origin}")
    tok = Tokenizer.train_bpe(captions, args.vocab_size, args.context_length, args.min_frequency)
    tok.save(args.output)
    lengths = tok.token_lengths(captions) + 2
    summary = (f"trained byte-level BPE on {len(captions)} captions ({origin}): vocab_size={tok.vocab_size} "
               f"sot={tok.sot_id} eot={tok.eot_id} pad={tok.pad_id}; tokens/caption mean={lengths.mean():.1f} "
               f"max={lengths.max()}; {np.mean(lengths > args.context_length):.1%} truncated at "
               f"context_length={args.context_length}; saved {args.output}")
    print(summary)
    return summary


if __name__ == "__main__":
    main()
