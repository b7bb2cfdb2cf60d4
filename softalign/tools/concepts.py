"""Concepts to count in captions: a name and its alternative phrasings (synonyms), and the two term rules.

A concept occurs in a caption when every term of one of its alternatives does (``"plus sign"`` needs both
``plus`` and ``sign``). Terms come from one of two rules, applied alike to captions and to concepts:

  token  lowercase, then runs of ASCII letters and digits (``"Two dogs' ball"`` -> two, dogs, s, ball); no model.
  lemma  spaCy lemmas, lowercased, punctuation dropped (``dogs`` -> dog): a trained pipeline (``en_core_web_sm``)
         when installed, else spaCy's lookup lemmatizer (``pip install spacy spacy-lookups-data``).

Concept specs: ``name`` or ``name=alt|alt two|...`` (the name is always an alternative), or a built-in set:
``cifar10``, ``synthetic`` (every synthetic-scene attribute word) or ``synthetic_<attribute>``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional, Sequence

from softalign.data import synthetic

TOKEN_RE = re.compile(r"[a-z0-9]+")
Normalizer = Callable[[Sequence[str]], list[list[str]]]  # texts -> each text's terms

# Common synonyms and plurals of evaluation class names (our own lists): a plural counts in the token rule.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplanes", "aeroplane", "aeroplanes", "plane", "planes", "jet", "jets", "aircraft", "airliner"),
    "automobile": ("automobiles", "car", "cars", "sedan", "sedans"),
    "bird": ("birds",),
    "cat": ("cats", "kitten", "kittens", "kitty"),
    "deer": ("fawn", "elk", "moose"),
    "dog": ("dogs", "puppy", "puppies", "pup", "pups"),
    "frog": ("frogs", "toad", "toads"),
    "horse": ("horses", "pony", "ponies", "foal"),
    "ship": ("ships", "boat", "boats", "vessel"),
    "truck": ("trucks", "lorry", "lorries"),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The synthetic captions' own words for each class (softalign/data/synthetic.py).
for _name, _words in {**synthetic._SHAPE_WORDS, **synthetic._SIZE_WORDS}.items():
    SYNONYMS.setdefault(_name, tuple(w for w in dict.fromkeys(_words) if w != _name))


class LemmaUnavailable(RuntimeError):
    """The lemma rule needs spaCy and a pipeline or lookup tables; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class Concept:
    """A name and its alternatives, each a tuple of terms (all must occur)."""

    name: str
    alternatives: tuple[tuple[str, ...], ...]

    @property
    def terms(self) -> set[str]:
        return {t for alt in self.alternatives for t in alt}

    def describe(self) -> str:
        return " | ".join(" ".join(alt) for alt in self.alternatives)


def token_terms(texts: Sequence[str]) -> list[list[str]]:
    """The token rule: lowercased ASCII letter/digit runs."""
    return [TOKEN_RE.findall(text.lower()) for text in texts]


def lemma_normalizer(model: str = "en_core_web_sm") -> Normalizer:
    """The lemma rule with spaCy (a trained pipeline `model`, else the lookup lemmatizer); raises
    `LemmaUnavailable` saying what is missing."""
    try:
        import spacy
    except ImportError:
        raise LemmaUnavailable("the lemma rule needs spaCy: pip install spacy spacy-lookups-data") from None
    try:
        nlp = spacy.load(model, disable=["parser", "ner"])
    except OSError:
        try:
            nlp = spacy.blank("en")
            nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
            nlp.initialize()
        except Exception as e:  # noqa: BLE001 - spaCy raises several kinds when its tables are missing
            raise LemmaUnavailable(f"spaCy has neither the pipeline {model!r} nor lookup tables (pip install "
                                   f"spacy-lookups-data): {type(e).__name__}: {e}") from None

    def normalize(texts: Sequence[str]) -> list[list[str]]:
        return [[t.lemma_.lower() for t in doc if not (t.is_punct or t.is_space)]
                for doc in nlp.pipe([t.lower() for t in texts], batch_size=512)]  # lookup tables are lowercase

    return normalize


def normalizer(mode: str, model: str = "en_core_web_sm") -> Normalizer:
    """The term rule named `mode` ('token' or 'lemma')."""
    if mode == "token":
        return token_terms
    if mode == "lemma":
        return lemma_normalizer(model)
    raise ValueError(f"unknown term rule {mode!r}; use 'token' or 'lemma'")


def builtin_names(name: str) -> Optional[list[str]]:
    """The class names of a built-in set, or None when `name` is not one."""
    if name == "cifar10":
        return list(CIFAR10_CLASSES)
    if name == "synthetic":
        return [n for attr in synthetic.ATTRIBUTES for n in synthetic.attribute_classnames(attr)]
    if name.startswith("synthetic_"):
        try:
            return synthetic.attribute_classnames(name[len("synthetic_"):])
        except ValueError:
            return None
    return None


def parse_specs(specs: Iterable[str], synonyms: bool = True) -> list[tuple[str, list[str]]]:
    """``[(name, [alternative phrases])]`` from specs (see the module docstring), in order, without repeats."""
    out: dict[str, list[str]] = {}
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        names = builtin_names(spec)
        if names is not None:
            for n in names:
                out.setdefault(n, [n, *(SYNONYMS.get(n, ()) if synonyms else ())])
            continue
        name, _, alts = spec.partition("=")
        name = name.strip()
        given = [a.strip() for a in alts.split("|") if a.strip()] if alts else list(SYNONYMS.get(name, ()))
        out[name] = [name, *(a for a in given if a != name)] if synonyms or alts else [name]
    return list(out.items())


def build_concepts(specs: Iterable[str], normalize: Normalizer, synonyms: bool = True) -> list[Concept]:
    """Concepts with their alternatives turned into terms by `normalize` (the same rule as the captions)."""
    concepts = []
    for name, phrases in parse_specs(specs, synonyms):
        alts = tuple(dict.fromkeys(tuple(terms) for terms in normalize(phrases) if terms))
        if not alts:
            raise ValueError(f"concept {name!r} has no terms under this rule")
        concepts.append(Concept(name, alts))
    return concepts


def read_concepts_file(path: str) -> list[str]:
    """Specs from a file, one per line (``#`` comments and blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]
