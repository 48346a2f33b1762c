"""Phrase weights from distances and Compel-convention weighted embeddings (method.md §7)."""

import pytest
import torch
from compel import Compel, ReturnedEmbeddingsType
from conftest import tiny_pipeline

from elbo_t2ialign.core.adapters import adapter_for
from elbo_t2ialign.generation.weighting import (
    compel_syntax,
    phrase_weights,
    token_positions,
    weight_conditioning,
)

PROMPT = "a photo of a cat and a dog"
PHRASES = ["a cat", "a dog"]


def compel_sdxl(pipe) -> Compel:
    """Compel's SDXL set-up as the reference builds it (its CompelForSDXL wrapper exists from 2.2 on)."""
    return Compel(
        tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=[False, True],
    )


def adapter(family: str):
    return adapter_for(tiny_pipeline(family), torch.device("cpu"), torch.float32, 32, max_sequence_length=16)


def test_weights_for_known_distances():
    # n = (d - 0.1) / 0.2 = [1, 0, 0.5]; 1.2 ** 0.5 = 1.0954, 3 ** 0.5 = 1.7321
    assert phrase_weights([0.3, 0.1, 0.2], 1.2) == [1.2, 1.0, 1.1]
    assert phrase_weights(torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64), 3.0) == [3.0, 1.0, 1.73]
    assert phrase_weights([5.0, 1.0, 2.0, 3.0], 2.0) == [2.0, 1.0, 1.19, 1.41]  # 2**0.25, 2**0.5


def test_fewer_than_two_phrases_or_equal_distances_give_ones():
    assert phrase_weights([], 1.2) == []
    assert phrase_weights([0.7], 3.0) == [1.0]
    assert phrase_weights([0.2, 0.2, 0.2], 3.0) == [1.0, 1.0, 1.0]


def test_compel_syntax():
    assert compel_syntax(PROMPT, PHRASES, [1.2, 1.0]) == "a photo of (a cat)1.2 and (a dog)1"
    assert compel_syntax(PROMPT, PHRASES, [1.2, 1.0], float32_numbers=True) == (
        "a photo of (a cat)1.2000000476837158 and (a dog)1.0"  # as the reference writes its float32 weights
    )
    with pytest.raises(ValueError, match="a bird"):
        compel_syntax(PROMPT, ["a bird"], [1.1])


def test_a_repeated_phrase_is_weighted_where_it_occurs():
    """The reference finds every phrase from the start of the prompt, so a repeated one garbles its
    string ("(a cat)1.1t)1.2 and (a dog)1.0 and a cat"); here each occurrence gets its own weight."""
    prompt, phrases = "a cat and a dog and a cat", ["a cat", "a dog", "a cat"]
    assert compel_syntax(prompt, phrases, [1.1, 1.0, 1.2]) == "(a cat)1.1 and (a dog)1 and (a cat)1.2"
    # <bos> a cat and a dog and a cat
    assert token_positions(adapter("sd"), prompt, phrases) == [[1, 2], [4, 5], [7, 8]]


def masked_conds(ad, positions) -> dict:
    return {k: ad.encode_prompt_masked(PROMPT, pos) for k, pos in enumerate(positions)}


def test_weighted_embeddings_equal_compel_sd():
    ad, pipe = adapter("sd"), tiny_pipeline("sd")
    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    full, empty = ad.encode_prompt(PROMPT), ad.encode_prompt("")
    positions = token_positions(ad, PROMPT, PHRASES)
    assert positions == [[4, 5], [7, 8]]  # <bos> a photo of | a cat | and | a dog
    for weights in ([1.2, 1.1], [1.0, 1.35], [2.0, 1.0]):
        ours = weight_conditioning(full, empty, positions, weights)["encoder_hidden_states"]
        theirs = compel(compel_syntax(PROMPT, PHRASES, weights))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        changed = (ours != full["encoder_hidden_states"]).any(dim=-1)[0]  # (77,)
        expected = [p for pos, w in zip(positions, weights, strict=True) if w != 1 for p in pos]
        assert changed.nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("weights", [[0.8, 1.0], [0.5, 1.2], [0.9, 0.7], [1.0, 0.01]])
def test_weights_below_one_equal_compel_sd(weights):
    """Strength < 1 gives weights in [strength, 1]: Compel blends towards the prompt with the phrase masked."""
    ad, pipe = adapter("sd"), tiny_pipeline("sd")
    full, empty = ad.encode_prompt(PROMPT), ad.encode_prompt("")
    positions = token_positions(ad, PROMPT, PHRASES)
    ours = weight_conditioning(full, empty, positions, weights, masked_conds(ad, positions))
    theirs = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)(
        compel_syntax(PROMPT, PHRASES, weights)
    )
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs, rtol=0, atol=1e-6)
    # the blend moves every position after the masked phrase, not only the phrase's own tokens
    changed = (ours["encoder_hidden_states"] != full["encoder_hidden_states"]).any(dim=-1)[0]
    assert changed[positions[0][0] :].all() if weights[0] < 1 else changed[positions[1][0] :].all()
    with pytest.raises(ValueError, match="weighted below 1 and need their masked conditioning"):
        weight_conditioning(full, empty, positions, weights)


def test_weighted_embeddings_equal_compel_sdxl():
    ad, pipe = adapter("sdxl"), tiny_pipeline("sdxl")
    full = ad.encode_prompt(PROMPT)
    positions = token_positions(ad, PROMPT, PHRASES)
    for weights in ([1.3, 1.0], [0.8, 1.1], [0.6, 0.9]):
        ours = weight_conditioning(
            full, ad.encode_prompt(""), positions, weights, masked_conds(ad, positions)
        )
        theirs, _ = compel_sdxl(pipe)(compel_syntax(PROMPT, PHRASES, weights))
        torch.testing.assert_close(ours["encoder_hidden_states"], theirs, rtol=0, atol=1e-6)
    # pooled text and time ids stay those of the plain prompt (Compel pools its syntax string instead)
    assert torch.equal(ours["text_embeds"], full["text_embeds"]) and torch.equal(
        ours["time_ids"], full["time_ids"]
    )


def test_sd3_weights_clip_and_t5_tokens():
    ad = adapter("sd3")
    full, empty = ad.encode_prompt(PROMPT), ad.encode_prompt("")
    positions = token_positions(ad, PROMPT, PHRASES)
    # CLIP block: <bos> first; T5 block from 77, no <bos>: a photo of a cat ... -> 77 + 3, 77 + 4
    assert positions == [[4, 5, 80, 81], [7, 8, 83, 84]]
    out = weight_conditioning(full, empty, positions, [1.5, 1.0])
    e, f, o = (c["encoder_hidden_states"][0] for c in (empty, full, out))  # (77 + 16, D)
    rows = torch.tensor([4, 5, 80, 81])
    torch.testing.assert_close(o[rows], e[rows] + 1.5 * (f[rows] - e[rows]))
    others = torch.ones(o.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(o[others], f[others])
    assert torch.equal(out["pooled_projections"], full["pooled_projections"])
    assert weight_conditioning(full, empty, positions, [1.0, 1.0]) is full


def test_sd3_weights_below_one_blend_with_the_masked_prompt():
    ad = adapter("sd3")
    full, empty = ad.encode_prompt(PROMPT), ad.encode_prompt("")
    positions = token_positions(ad, PROMPT, PHRASES)  # [[4, 5, 80, 81], [7, 8, 83, 84]]
    masked = ad.encode_prompt_masked(PROMPT, positions[0])["encoder_hidden_states"][0]
    f, e = full["encoder_hidden_states"][0], empty["encoder_hidden_states"][0]
    # CLIP is causal: tokens before the phrase cannot see it; T5 is not: every T5 row moves
    assert torch.equal(masked[:4], f[:4]) and not torch.allclose(masked[6:77], f[6:77])
    assert (masked[77:] != f[77:]).any(dim=-1).all()
    out = weight_conditioning(
        full, empty, positions, [0.5, 1.0], {0: {"encoder_hidden_states": masked[None]}}
    )
    rows = torch.tensor(positions[0])

    def scaled(x):  # weight 0.5 about the empty prompt at the phrase's rows
        y = x.clone()
        y[rows] = e[rows] + 0.5 * (x[rows] - e[rows])
        return y

    # w = 0.5: blend weight tan(pi / 4) = 1 against 1, i.e. the mean of the two
    torch.testing.assert_close(out["encoder_hidden_states"][0], (scaled(f) + scaled(masked)) / 2)
    assert torch.equal(out["pooled_projections"], full["pooled_projections"])


def test_phrase_missing_from_the_prompt_is_an_error():
    with pytest.raises(ValueError, match="cannot locate phrase 'a bird'"):
        token_positions(adapter("sd"), PROMPT, ["a bird"])


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_families_without_text_blocks_are_a_clear_error(family):
    with pytest.raises(
        ValueError, match=f"prompt weighting supports the unet and mmdit families, not '{family}'"
    ):
        token_positions(adapter(family), PROMPT, PHRASES)
