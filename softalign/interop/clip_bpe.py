"""CLIP's own BPE as an HF ``tokenizer.json``, built from CLIP's merges file (``bpe_simple_vocab_16e6.txt.gz``,
shipped inside open_clip and OpenAI's CLIP), so a softalign ``Tokenizer`` gives the ids ``open_clip.tokenize`` gives.

The construction follows open_clip's ``SimpleTokenizer.__init__``: 256 byte symbols, the same with ``</w>``, then
the first 48,894 merges joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 ids.
Text goes through NFC, ftfy's control-character removal and quote uncurling, common HTML entities (&amp; &lt; &gt;
&quot; &#39;), whitespace collapse, strip and lowercasing; then CLIP's regex split, a byte-level mapping, and BPE
with the ``</w>`` word suffix.

Known differences from open_clip, which HF normalizers cannot express: most of its ftfy / ``html.unescape``
clean-up -- mojibake repair (``cafÃ©`` -> ``café``), other HTML entities (``&eacute;``, numeric ones), entities
nested deeper than ``&amp;amp;...``, ligature and full-width folding (``ﬁ``, ``ǅ``, ``Ａ``), C1 controls (``\x85``)
-- and Python's context-aware lowercasing of a word-final Greek sigma (``ΣΑΣ`` -> ``σας``; HF lowercases per
character). A literal ``<start_of_text>``/``<end_of_text>`` in a caption becomes that special id in open_clip but
stays plain text here. Ordinary captions tokenize identically; tests/test_convert.py checks a varied set.

    python -m softalign.interop.clip_bpe --output=clip_tokenizer.json    # merges from the installed open_clip
    python -m softalign.interop.clip_bpe --merges=bpe_simple_vocab_16e6.txt.gz --output=clip_tokenizer.json
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from softalign.data.tokenizer import EOT, SOT

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # open_clip: merges[1:49152-256-2+1] (line 0 is a version header)
# CLIP's word split (open_clip.tokenizer.SimpleTokenizer.pat without its special-token alternatives).
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def default_merges_path() -> str:
    """The merges file inside the installed open_clip package (found without importing it, so without torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip is not installed; pass the path of CLIP's {MERGES_FILE}")
    path = os.path.join(list(spec.submodule_search_locations)[0], MERGES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass the path of CLIP's {MERGES_FILE}")
    return path


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's bytes_to_unicode() values, in its order (printable bytes first, the rest from U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _normalizer() -> normalizers.Normalizer:
    replace = normalizers.Replace
    return normalizers.Sequence([
        normalizers.NFC(),
        replace(Regex(r"[\x00-\x08\x0b\x0e-\x1f\x7f\x{206a}-\x{206f}\x{feff}\x{fff9}-\x{fffc}]"), ""),  # ftfy
        replace(Regex("[\u02bc\u2018-\u201b]"), "'"),   # ftfy's uncurl_quotes
        replace(Regex("[\u201c-\u201f]"), '"'),
        replace(Regex("&(amp;)+"), "&"),                # html.unescape, applied twice by open_clip
        replace("&lt;", "<"), replace("&gt;", ">"), replace("&quot;", '"'),
        replace(Regex("&#0*39;|&#[xX]0*27;|&apos;"), "'"),
        replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
        normalizers.Lowercase(),
    ])


def build_clip_tokenizer(merges_path: str | None = None) -> tokenizers.Tokenizer:
    """An HF tokenizer equivalent to open_clip's SimpleTokenizer (see the module docstring for the differences)."""
    path = merges_path or default_merges_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not CLIP's merges file (expected {NUM_MERGES} pairs after a header line)")
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    hf = tokenizers.Tokenizer(models.BPE({token: i for i, token in enumerate(vocab)}, merges,
                                         end_of_word_suffix="</w>", fuse_unk=False))
    hf.normalizer = _normalizer()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT, EOT)])
    return hf


def main(argv: Sequence[str] | None = None) -> None:
    """Writes CLIP's tokenizer.json and prints its special ids."""
    parser = argparse.ArgumentParser(prog="python -m softalign.interop.clip_bpe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merges", default=None, help=f"CLIP's {MERGES_FILE} (default: the one in open_clip)")
    parser.add_argument("--output", required=True, help="where to write tokenizer.json")
    args = parser.parse_args(argv)
    hf = build_clip_tokenizer(args.merges)
    hf.save(args.output)
    print(f"wrote CLIP's BPE ({hf.get_vocab_size()} ids, sot={hf.token_to_id(SOT)}, eot={hf.token_to_id(EOT)}) "
          f"to {args.output}")


if __name__ == "__main__":
    main()
