"""Calibration arithmetic against hand computations."""

import math

import numpy as np
import pytest
import torch

from elbo_t2ialign.core import calibrate, capture
from elbo_t2ialign.core.capture import LayerInfo
from elbo_t2ialign.devtools.tokenizers import build_clip_tokenizer


def test_tau_for_known_losses():
    taus = calibrate.temperatures([2.0, 1.0, 1.5], strength=3.0)
    np.testing.assert_allclose(taus, [3.0, 1.0, math.sqrt(3.0)], rtol=1e-6)
    assert calibrate.temperatures([5.0, 5.0], 3.0) == [1.0, 1.0]
    assert calibrate.temperatures([2.0, 1.0], 3.0, fixed=True) == [3.0, 3.0]
    assert calibrate.temperatures([2.0, 1.0], 1.0) == [1.0, 1.0]


def _sd15_like_layers():
    """16 cross layers as in SD1.5: 6 down (64, 64, 32, 32, 16, 16), 1 mid (8), 9 up."""
    res = [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    paths = ["down"] * 6 + ["mid"] + ["up"] * 9
    return [LayerInfo(f"l{i}", "cross", i, r, p) for i, (r, p) in enumerate(zip(res, paths, strict=True))]


def test_gaussian_weights_sd15():
    w = capture.gaussian_layer_weights(_sd15_like_layers(), sigma=3.0)
    raw = np.exp(-((np.arange(16) - 6.0) ** 2) / 18.0)
    expected = raw / raw.sum() * 16
    np.testing.assert_allclose([w[f"l{i}"] for i in range(16)], expected, rtol=1e-12)
    assert max(w, key=w.get) == "l6"  # the mid block's layer


def test_gaussian_centre_without_mid_block():
    layers = [LayerInfo(f"l{i}", "joint", i, 64, "stack") for i in range(24)]
    w = capture.gaussian_layer_weights(layers, 3.0)
    assert math.isclose(w["l11"], w["l12"]) and w["l11"] > w["l10"]


def test_stage_weights_sd15_and_wrong_length():
    w = capture.stage_layer_weights(_sd15_like_layers(), [1, 1, 10, 15, 10, 1, 1], "cross")
    assert [w[f"l{i}"] for i in range(16)] == [1, 1, 1, 1, 10, 10, 15, 10, 10, 10, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="7 resolution stages"):
        capture.stage_layer_weights(_sd15_like_layers(), [1, 2, 3], "cross")


def test_self_weights_first_last():
    layers = [LayerInfo(x.name, "self", x.order, x.resolution, x.path) for x in _sd15_like_layers()]
    w1 = capture.self_stage_weights(layers, "first_last")
    w2 = capture.self_stage_weights(layers, "last")
    assert [w1[f"l{i}"] for i in range(16)] == [1, 1] + [0] * 11 + [1, 1, 1]
    assert [w2[f"l{i}"] for i in range(16)] == [0] * 13 + [1, 1, 1]


def test_refinement_equals_direct_matrix_product():
    rng = np.random.default_rng(0)
    s1, s2, a = rng.random((16, 16)), rng.random((16, 16)), rng.random(16)
    got = calibrate.self_attention_refine(torch.tensor(a), torch.tensor(s1), torch.tensor(s2)).numpy()
    np.testing.assert_allclose(got, s2 @ (s1 @ a), rtol=1e-12)


def test_to_image_is_image_sized_and_normalised():
    a = torch.arange(16.0)
    img = calibrate.to_image(a, 4, (10, 7))  # PIL size (W, H)
    assert img.shape == (7, 10) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() == 0.0 and abs(img.max() - 1.0) < 1e-6


TOK = build_clip_tokenizer(["a", "photo", "of", "cat", "dog", "plant"])


def ids(text, special):
    return TOK(text, add_special_tokens=special).input_ids


def test_token_location_single_and_multi_token():
    prompt = "a photo of cat, potted plant, dog"
    toks = ids(prompt, True)
    pos = calibrate.class_token_positions(ids, prompt, ["cat", "potted plant", "dog"])
    assert pos["cat"] == [4]  # BOS a photo of cat
    assert len(pos["potted plant"]) == len(ids("potted plant", False)) > 1
    assert [toks[i] for i in pos["potted plant"]] == ids("potted plant", False)
    assert toks[pos["dog"][0]] == ids("dog", False)[0]
    assert pos["dog"][0] > pos["potted plant"][-1]


def test_missing_class_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot locate 'zebra' in prompt 'a photo of cat'"):
        calibrate.locate_tokens(ids, "a photo of cat", "zebra")


def test_every_listed_word_is_one_token_whatever_the_order():
    words = ["a", "an", "in", "green", "triangle", "orange", "ring", "star", "heart", "red"]
    for order in (words, words[::-1], sorted(words)):
        tok = build_clip_tokenizer(order)
        for w in words:
            assert len(tok(w, add_special_tokens=False).input_ids) == 1, (w, order)
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1  # unlisted words split


def test_a_class_inside_an_earlier_class_gets_its_own_tokens():
    """Left to right: "plant" is the class after "potted plant", not the word inside it (the reference
    searches each class from the start and would give both classes the same token)."""
    prompt = "a photo of potted plant, plant"
    toks = ids(prompt, True)
    pos = calibrate.class_token_positions(ids, prompt, ["potted plant", "plant"], start=4)
    assert pos["plant"][0] > pos["potted plant"][-1]
    assert [toks[i] for i in pos["plant"]] == ids("plant", False)


def test_find_subsequence_equals_a_byte_string_search():
    """Against bytes.find on the same values (tokens 0..2, so that matches are frequent)."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        seq = rng.integers(0, 3, rng.integers(0, 12)).tolist()
        sub = rng.integers(0, 3, rng.integers(0, 4)).tolist()
        start = int(rng.integers(0, 14))
        assert calibrate.find_subsequence(seq, sub, start) == bytes(seq).find(bytes(sub), start), (
            seq,
            sub,
            start,
        )
    assert calibrate.find_subsequence((5, 6, 7), [6, 7]) == 1  # any sequence type
