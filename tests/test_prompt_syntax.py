"""Prompt syntax: plain text by default; `prompt_syntax=compel` encodes SD1.x/SDXL prompts through
Compel as the reference does (weights in class names, phrases and captions take effect), checked
against Compel's own embeddings; SD3 keeps plain text, as in the reference."""

import sys

import numpy as np
import pytest
import torch
from compel import Compel
from conftest import guided_conditionings, tiny_aligner, tiny_pipeline
from test_gen_weighting import compel_sdxl

from elbo_t2ialign.core.adapters import adapter_for
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.generation.sampler import ElboSampler
from elbo_t2ialign.generation.weighting import compel_syntax

SYNTAX = ["a photo of cat (dog)", "cat+ dog", "cat- dog", "a photo of (cat)1.3 and (dog)0.8"]


def adapter(family: str, syntax: str = "plain"):
    ad = adapter_for(tiny_pipeline(family), torch.device("cpu"), torch.float32, 32, max_sequence_length=16)
    ad.set_prompt_syntax(syntax)
    return ad


def test_plain_text_is_the_default():
    assert AlignOptions().prompt_syntax == "plain" and adapter("sd").prompt_syntax == "plain"
    with pytest.raises(ValueError, match="prompt_syntax must be 'plain' or 'compel', got 'a1111'"):
        AlignOptions(prompt_syntax="a1111")
    with pytest.raises(ValueError, match="prompt_syntax must be one of"):
        adapter("sd").set_prompt_syntax("a1111")


@pytest.mark.parametrize("prompt", SYNTAX)
def test_compel_syntax_equals_compel_sd(prompt):
    pipe = tiny_pipeline("sd")
    ours = adapter("sd", "compel").encode_prompt(prompt)["encoder_hidden_states"]
    theirs = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)(prompt)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    plain = adapter("sd").encode_prompt(prompt)["encoder_hidden_states"]
    assert (ours - plain).abs().max() > 0.1  # the syntax acts as weights, not as text


@pytest.mark.parametrize("prompt", SYNTAX)
def test_compel_syntax_equals_compel_sdxl(prompt):
    ours = adapter("sdxl", "compel").encode_prompt(prompt)
    embeds, pooled = compel_sdxl(tiny_pipeline("sdxl"))(prompt)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)
    # Compel pools the prompt as written, so only the per-token embeddings differ from plain text
    plain = adapter("sdxl").encode_prompt(prompt)
    assert torch.equal(plain["text_embeds"], ours["text_embeds"])
    assert (ours["encoder_hidden_states"] - plain["encoder_hidden_states"]).abs().max() > 0.1


def test_sd3_keeps_plain_text_as_the_reference_does():
    ours, plain = adapter("sd3", "compel").encode_prompt(SYNTAX[0]), adapter("sd3").encode_prompt(SYNTAX[0])
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


def test_token_positions_are_found_in_the_pieces_compel_encodes():
    ad = adapter("sd", "compel")
    tokenizer = ad.pipe.tokenizer
    assert ad.token_ids("a photo of (cat)1.2 dog-") == tokenizer("a photo of cat dog").input_ids
    assert adapter("sd").token_ids("a photo of (cat)1.2 dog-") != tokenizer("a photo of cat dog").input_ids
    image = np.full((32, 32, 3), 90, np.uint8)
    got = tiny_aligner("sd", prompt_syntax="compel").heatmaps(
        image, ["cat", "dog"], prompt="a photo of (cat)1.3 dog"
    )
    assert got.token_positions == {"cat": [4], "dog": [5]}  # <bos> a photo of cat dog
    plain = tiny_aligner("sd").heatmaps(image, ["cat", "dog"], prompt="a photo of (cat)1.3 dog")
    assert plain.token_positions == {"cat": [5], "dog": [10]}  # "(", ")", "1", ".", "3" are text tokens


def test_compel_blends_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="blends and conjunctions are not supported"):
        adapter("sd", "compel").encode_prompt('("cat", "dog").blend(1, 1)')


def test_missing_compel_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "compel", None)
    with pytest.raises(ValueError, match=r"needs the 'compel' package: pip install compel"):
        adapter("sd", "compel")


PROMPT, PHRASES = "a photo of a cat and a dog", ["a cat", "a dog"]


@pytest.mark.parametrize("strength", [1.2, 0.8])
def test_generation_through_compel_equals_the_embedding_weights_on_sd(strength, monkeypatch):
    """SD1.x: Compel's rules are what the plain path applies, so both give the same images."""
    plain = ElboSampler(adapter("sd"), steps=3, strength=strength).sample(PROMPT, PHRASES, seed=5)
    syntax = ElboSampler(adapter("sd"), steps=3, strength=strength, prompt_syntax="compel")
    seen = guided_conditionings(syntax, monkeypatch)
    result = syntax.sample(PROMPT, PHRASES, seed=5)
    assert result.weights == plain.weights and not result.plain
    # the syntax string carries the float32 weights (0.800000011920929): 1e-8 in the weight, ~1e-4 after 3 steps
    torch.testing.assert_close(result.latent, plain.latent, rtol=0, atol=2e-4)
    compel = Compel(tokenizer=tiny_pipeline("sd").tokenizer, text_encoder=tiny_pipeline("sd").text_encoder)
    for cond, weights in zip(seen, result.weights, strict=True):
        text = compel_syntax(PROMPT, PHRASES, weights, float32_numbers=True)
        assert text.count(")1.0") + text.count(")1.2000000476837158") + text.count(")0.800000011920929") == 2
        torch.testing.assert_close(cond["encoder_hidden_states"][:1], compel(text), rtol=0, atol=0)


def test_generation_through_compel_pools_the_syntax_string_on_sdxl(monkeypatch):
    """SDXL: the reference's pooled text is that of "(a cat)1.2 and ...", at every step (weights 1 too)."""
    sampler = ElboSampler(adapter("sdxl"), steps=2, strength=1.2, prompt_syntax="compel")
    seen = guided_conditionings(sampler, monkeypatch)
    result = sampler.sample(PROMPT, ["a cat"], seed=5)  # one phrase: weight 1, still the syntax string
    assert result.weights == [[1.0], [1.0]] and not result.plain
    _, pooled = compel_sdxl(tiny_pipeline("sdxl"))("a photo of (a cat)1.0 and a dog")
    for cond in seen:
        torch.testing.assert_close(cond["text_embeds"][:1], pooled, rtol=0, atol=0)
    assert not torch.equal(pooled, adapter("sdxl").encode_prompt(PROMPT)["text_embeds"])


def test_generation_through_compel_gives_sd3_the_syntax_string_as_text(monkeypatch):
    """The reference passes "(a cat)1.2000000476837158 and ..." to SD3's encode_prompt as plain text
    (and lets it truncate at 77 CLIP tokens); prompt_syntax=compel does the same."""
    sampler = ElboSampler(adapter("sd3"), steps=2, strength=1.2, prompt_syntax="compel")
    seen = guided_conditionings(sampler, monkeypatch)
    phrases = ["a photo", "a cat", "a dog", "a red sofa"]  # long enough for the string to pass 77 tokens
    prompt = "a photo of a cat and a dog on a red sofa"
    result = sampler.sample(prompt, phrases, seed=5)
    pipe = tiny_pipeline("sd3")
    lengths = []
    for cond, weights in zip(seen, result.weights, strict=True):
        text = compel_syntax(prompt, phrases, weights, float32_numbers=True)
        lengths.append(len(pipe.tokenizer(text).input_ids))
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=text,
            prompt_2=text,
            prompt_3=text,
            do_classifier_free_guidance=False,
            max_sequence_length=16,
        )
        torch.testing.assert_close(cond["encoder_hidden_states"][:1], embeds, rtol=0, atol=0)
        torch.testing.assert_close(cond["pooled_projections"][:1], pooled, rtol=0, atol=0)
    assert max(lengths) > 77  # truncated by the pipeline, as in the reference
