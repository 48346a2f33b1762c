"""`Evidence.word_maps`: the maps of any word of the collection prompt(s) from the kept text
attention, with no collection forward; ELBO losses only for new words, only on request."""

import numpy as np
import pytest

from elbo_t2ialign.testbed import train, world

pytestmark = pytest.mark.skipif(
    not (train.DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="no committed testbed model"
)
FAST = {"elbo_timesteps": [101, 501, 901], "collect_timesteps": [20, 100, 200]}
SHAPES = {"self_weights_1": [0, 1, 0], "self_weights_2": [0, 1, 0]}


@pytest.fixture(scope="module")
def setup():
    from elbo_t2ialign import Aligner

    aligner = Aligner.from_pretrained(str(train.DEFAULT_MODEL_DIR), device="cpu", **SHAPES, **FAST)
    scene = next(s for s in (world.generate(i, "val") for i in range(50)) if len(s.objects) == 3)
    classes = [o.cls for o in scene.objects]
    prompt = f"a photo of a {classes[0]} and a {classes[1]} and a {classes[2]}"
    return aligner, scene.image, classes, prompt


def _samples(aligner):
    """Samples sent through the denoiser (a forward hook on it)."""
    seen = []
    handle = aligner.adapter.denoiser.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    return seen, handle


def _same(got, want):
    assert list(got.heatmaps) == list(want.heatmaps)
    for kind in ("heatmaps", "baseline_heatmaps", "cross"):
        for w in want.heatmaps:
            np.testing.assert_allclose(getattr(got, kind)[w], getattr(want, kind)[w], atol=1e-5)
    assert got.tau == pytest.approx(want.tau, rel=1e-4)  # ELBO batches of other composition
    assert got.token_positions == want.token_positions


def test_word_maps_equal_a_heatmaps_call_that_named_the_words(setup):
    aligner, image, classes, prompt = setup
    seen, handle = _samples(aligner)
    try:
        first = aligner.heatmaps(image, classes[:2], prompt=prompt)
        pass_samples = sum(seen)
        assert pass_samples == 2 * 3 + 3  # ELBO: 2 classes x 3 timesteps; collection: 3 timesteps
        ev = first.evidence

        # one word: no ELBO needed, no forward at all
        seen.clear()
        one = ev.word_maps([classes[2]])
        assert seen == [] and one.loss_source == {classes[2]: "none"}
        # a phrase and a template word too
        phrase = ev.word_maps([f"a {classes[1]}"])
        template = ev.word_maps(["photo"])
        assert seen == []

        # calibrated across words of which one is new: refused unless asked, then one ELBO pass for it
        words = [classes[0], classes[1], "photo"]
        with pytest.raises(ValueError, match=r"\['photo'\] have no ELBO loss.*compute_elbo=True"):
            ev.word_maps(words)
        assert seen == []
        several = ev.word_maps(words, compute_elbo=True)
        assert sum(seen) == 3  # the new word's 3 timesteps, nothing for the others
        assert several.loss_source == {classes[0]: "stored", classes[1]: "stored", "photo": "computed"}
        seen.clear()
        ev.word_maps(words)  # the new loss is kept
        assert seen == []
    finally:
        handle.remove()

    _same(one, aligner.heatmaps(image, [classes[2]], prompt=prompt))
    _same(phrase, aligner.heatmaps(image, [f"a {classes[1]}"], prompt=prompt))
    _same(template, aligner.heatmaps(image, ["photo"], prompt=prompt))
    named = aligner.heatmaps(image, words, prompt=prompt)
    _same(several, named)
    assert several.losses == pytest.approx(named.losses, rel=1e-5)


def test_word_maps_of_split_prompts_and_unknown_words(setup):
    aligner, image, classes, _ = setup
    long = "a photo of a photo of a photo of a photo of a photo of {}"
    res = aligner.heatmaps(image, classes, collect_prompt=long, strength=1.0)
    ev = res.evidence
    assert len(ev.collect_prompts) == 2
    again = ev.word_maps(list(reversed(classes)))  # each class found in its own prompt
    for c in classes:
        np.testing.assert_allclose(again.baseline_heatmaps[c], res.baseline_heatmaps[c], atol=1e-6)
    assert again.prompt_of == res.prompt_of
    with pytest.raises(ValueError, match=r"'heart' is not a word of the collection prompts"):
        ev.word_maps(["heart"] if "heart" not in classes else ["cat"])
