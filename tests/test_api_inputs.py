"""The Python API: where classes are found in the prompt, and what bad arguments give (issue: reliability)."""

import numpy as np
import pytest
from conftest import tiny_aligner
from PIL import Image

from elbo_t2ialign import AlignOptions
from elbo_t2ialign.core import calibrate

FAST = {"elbo_timesteps": [1, 501], "collect_timesteps": [20]}


def _rgb(w=24, h=20, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _tokens_at(aligner, prompt, positions):
    ids = aligner.adapter.token_ids(prompt, True)
    return [ids[i] for i in positions]


def test_class_that_is_also_a_template_word_is_found_in_the_class_list():
    aligner = tiny_aligner("sd", **FAST)
    res = aligner.heatmaps(_rgb(), ["photo", "triangle"])
    prompt = res.prompts["collect"]
    assert prompt == "a photo of photo, triangle"
    # tokens: BOS a photo of | photo , triangle EOS -> the class "photo" is token 4, not the template's 2
    assert res.token_positions == {"photo": [4], "triangle": [6]}
    for word in ("a", "of"):
        assert aligner.heatmaps(_rgb(), [word, "cat"]).token_positions[word] == [4]


def test_template_start_counts_the_prefix_tokens():
    aligner = tiny_aligner("sd")
    ids = aligner.adapter.token_ids
    assert calibrate.template_start(ids, "a photo of {}") == 4  # BOS + 3 words
    assert calibrate.template_start(ids, "{} on a table") == 1
    pixart = tiny_aligner("pixart")  # T5 tokenizer: no BOS
    assert calibrate.template_start(pixart.adapter.token_ids, "a photo of {}") == 3


@pytest.mark.parametrize("bad", [0, 0.0, -3, float("nan"), float("inf"), "abc", None, True, 2j])
def test_bad_strength_is_refused_with_its_name(bad):
    with pytest.raises(ValueError, match=r"strength must be a finite number > 0"):
        AlignOptions(strength=bad)
    aligner = tiny_aligner("sd", **FAST)
    with pytest.raises(ValueError, match=r"strength must be a finite number > 0"):
        aligner.heatmaps(_rgb(), ["cat", "dog"], strength=bad)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("batch_size", 2.5, "batch_size must be an integer >= 1"),
        ("seed", 2**70, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
        ("seed", -1, r"seed must be an integer"),
        ("elbo_timesteps", [], "elbo_timesteps must be a non-empty list"),
        ("collect_timesteps", [20, -5], "collect_timesteps must be a non-empty list"),
        ("gaussian_sigma", -1, "gaussian_sigma must be a finite number >= 0"),
        ("collect_prompt", "a photo", r"collect_prompt must be a string with exactly one '\{\}'"),
        ("phrase_tokens", "verbs", "phrase_tokens must be 'nouns' or 'phrase'"),
    ],
)
def test_bad_options_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        AlignOptions(**{field: value})


def test_timesteps_beyond_the_schedule_are_refused_before_any_forward(monkeypatch):
    aligner = tiny_aligner("sd", **FAST)
    monkeypatch.setattr(aligner.adapter, "_forward", lambda *a: pytest.fail("a forward pass ran"))
    with pytest.raises(
        ValueError, match=r"timesteps \[5000\] are outside this model's training range 0..999"
    ):
        aligner.heatmaps(_rgb(), ["cat", "dog"], collect_timesteps=[5000])
    with pytest.raises(ValueError, match=r"seed must be an integer"):
        aligner.heatmaps(_rgb(), ["cat", "dog"], seed=2**70)


def test_per_call_batch_size_is_used(monkeypatch):
    aligner = tiny_aligner("sd", **FAST)
    sizes = []
    forward = aligner.adapter._forward
    monkeypatch.setattr(aligner.adapter, "_forward", lambda x, t, c: sizes.append(len(x)) or forward(x, t, c))
    aligner.heatmaps(_rgb(), ["cat", "dog"], batch_size=1)
    assert sizes == [1] * (2 * 2 + 1)  # 2 classes x 2 ELBO timesteps, then 1 collection timestep
    sizes.clear()
    aligner.heatmaps(_rgb(), ["cat", "dog"])
    assert sizes == [4, 1]  # the default batch (8) holds all four ELBO pairs


def test_image_inputs(tmp_path):
    aligner = tiny_aligner("sd", **FAST)
    img = _rgb()
    expected = aligner.heatmaps(img, ["cat", "dog"]).heatmaps["cat"]
    img.save(tmp_path / "x.png")
    for given in (str(tmp_path / "x.png"), tmp_path / "x.png", np.asarray(img)):
        np.testing.assert_array_equal(aligner.heatmaps(given, ["cat", "dog"]).heatmaps["cat"], expected)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        aligner.heatmaps(str(tmp_path / "missing.png"), ["cat"])
    with pytest.raises(ValueError, match="uint8 of shape"):
        aligner.heatmaps(np.zeros((5, 5, 3), np.float32), ["cat"])
    with pytest.raises(TypeError, match="image must be a PIL image, a file path or a uint8 array"):
        aligner.heatmaps([1, 2], ["cat"])
    for w, h in ((0, 0), (1, 1), (1, 30)):
        with pytest.raises(ValueError, match=f"the image is {w}x{h}; heatmaps need at least 2x2 pixels"):
            aligner.heatmaps(Image.new("RGB", (w, h)), ["cat"])


def test_non_string_class_is_refused():
    aligner = tiny_aligner("sd", **FAST)
    with pytest.raises(TypeError, match="class names must be strings; got None at position 1"):
        aligner.heatmaps(_rgb(), ["cat", None])


def test_phrase_without_its_class_word_uses_the_phrase_nouns():
    """The reference: the class word if it is one of the phrase's words, else the phrase's NOUN tokens."""
    aligner = tiny_aligner("sd", **FAST)
    res = aligner.heatmaps(_rgb(), ["person", "plant"], phrases=["the red car", "a green sofa"])
    prompt = res.prompts["collect"]
    assert prompt == "a photo of the red car, a green sofa"
    # spaCy tags "car" and "sofa" as the nouns: only their tokens, not "the red" / "a green"
    assert _tokens_at(aligner, prompt, res.token_positions["person"]) == aligner.adapter.token_ids(
        "car", False
    )
    assert _tokens_at(aligner, prompt, res.token_positions["plant"]) == aligner.adapter.token_ids(
        "sofa", False
    )
    whole = aligner.heatmaps(
        _rgb(), ["person", "plant"], phrases=["the red car", "a green sofa"], phrase_tokens="phrase"
    )
    assert _tokens_at(aligner, prompt, whole.token_positions["person"]) == aligner.adapter.token_ids(
        "the red car", False
    )


def test_words_of_a_user_prompt():
    aligner = tiny_aligner("sd", **FAST)
    prompt = "a cat on a red sofa with the dog"
    res = aligner.heatmaps(_rgb(), ["red sofa", "dog", "cat"], prompt=prompt)
    assert res.prompts["collect"] == prompt
    for word in ("red sofa", "dog", "cat"):
        assert _tokens_at(aligner, prompt, res.token_positions[word]) == aligner.adapter.token_ids(
            word, False
        )
    assert res.token_positions["cat"] == [2]  # searched from the start of a user prompt, after BOS
    assert set(res.tau) == {"red sofa", "dog", "cat"} and max(res.tau.values()) == pytest.approx(3.0)
    with pytest.raises(
        ValueError, match=r"cannot locate 'bird' in prompt 'a cat on a red sofa with the dog'"
    ):
        aligner.heatmaps(_rgb(), ["cat", "bird"], prompt=prompt)
    with pytest.raises(TypeError, match="words= is now the classes argument"):
        aligner.heatmaps(_rgb(), words=["cat"], prompt=prompt)


def test_evidence_gives_every_setting_of_separate_calls():
    aligner = tiny_aligner("sd", **FAST)
    img, classes = _rgb(), ["cat", "dog", "bird"]
    res = aligner.heatmaps(img, classes)
    for strength, fixed in ((5.0, False), (2.0, True), (1.0, False)):
        single = aligner.heatmaps(img, classes, strength=strength, fixed_temperature=fixed)
        again = res.evidence.maps(strength, fixed)
        for c in classes:
            np.testing.assert_array_equal(again[c], single.heatmaps[c])
    unrefined = aligner.heatmaps(img, classes, refine=False)
    for c in classes:
        np.testing.assert_allclose(
            res.cross[c], unrefined.baseline_heatmaps[c], atol=1e-5
        )  # other layers on SDPA


def test_elbo_losses_can_be_reused(monkeypatch):
    aligner = tiny_aligner("sd", **FAST)
    img, classes = _rgb(), ["cat", "dog"]
    first = aligner.heatmaps(img, classes)
    sizes = []
    forward = aligner.adapter._forward
    monkeypatch.setattr(aligner.adapter, "_forward", lambda x, t, c: sizes.append(len(x)) or forward(x, t, c))
    again = aligner.heatmaps(img, classes, elbo_losses=first.losses)
    assert sizes == [1]  # the collection forward only
    assert again.tau == first.tau
    np.testing.assert_array_equal(again.heatmaps["dog"], first.heatmaps["dog"])
    with pytest.raises(ValueError, match=r"elbo_losses has no value for \['dog'\]"):
        aligner.heatmaps(img, classes, elbo_losses={"cat": 1.0})
