"""Noun phrases of a prompt (method.md §7): spaCy noun chunks whose root is a NOUN and whose root word
is not a non-entity word ("group", "side", "top", ...). The stop-list lives in configs/phrases/.

The defaults are the reference's: the root word as written (lower-cased) is looked up in the stop-list,
and every such chunk is kept, repeats included ("a red car next to another car" gives both).
`match="lemma"` also drops plural forms of listed words ("sides"); `dedupe=True` keeps one phrase per
root lemma (configs/phrases/dedupe.yaml)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from elbo_t2ialign.core.nlp import PhraseError, load_spacy

__all__ = ["PhraseError", "PhraseExtractor", "load_spacy", "load_stopwords"]


def load_stopwords(path: str | Path) -> list[str]:
    """The `stopwords` list of a YAML file such as configs/phrases/default.yaml."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data.get("stopwords"), list):
        raise PhraseError(f"{path}: expected a 'stopwords' list")
    return [str(w) for w in data["stopwords"]]


class PhraseExtractor:
    """prompt -> its entity noun phrases, in order of appearance."""

    def __init__(self, nlp: Any, stopwords: Iterable[str], match: str = "word", dedupe: bool = False):
        if match not in ("word", "lemma"):
            raise PhraseError(f"phrases.match must be 'word' or 'lemma', got {match!r}")
        self.nlp = nlp
        self.stopwords = {w.strip().lower() for w in stopwords}
        self.match, self.dedupe = match, bool(dedupe)

    @classmethod
    def from_config(
        cls,
        spacy_model: str = "en_core_web_sm",
        stopwords: Iterable[str] = (),
        match: str = "word",
        dedupe: bool = False,
    ) -> PhraseExtractor:
        return cls(load_spacy(spacy_model), stopwords, match, dedupe)

    def __call__(self, prompt: str) -> list[str]:
        phrases, roots = [], set()
        for chunk in self.nlp(prompt).noun_chunks:
            root = chunk.root
            lemma, word = root.lemma_.lower(), root.text.lower()
            listed = word in self.stopwords or (self.match == "lemma" and lemma in self.stopwords)
            if root.pos_ != "NOUN" or listed or (self.dedupe and lemma in roots):
                continue
            roots.add(lemma)
            phrases.append(chunk.text)
        return phrases
