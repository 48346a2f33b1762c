"""The current diffusers families (FLUX.2, Chroma, Qwen-Image, Z-Image) on their tiny models: the
public entry points give finite maps in [0, 1] that differ between words, the text the denoiser
attends to is the pipeline's own (template, dropped prefix, stacked layers), and a class word's
positions are the columns that hold its token, found here from the tokenizer and the template written
out by hand."""

import numpy as np
import pytest
import torch
from conftest import family_param, needs, tiny_aligner, tiny_pipeline
from PIL import Image

from elbo_t2ialign import explain
from elbo_t2ialign.devtools.fixtures import fixture_config, random_samples, write_dataset
from elbo_t2ialign.devtools.tiny import TEST_TEXT_LENGTHS

NEW = [family_param(name) for name in ("flux2", "chroma", "qwenimage", "zimage")]
PROMPT = "a photo of cat, dog"
FAST = dict(elbo_timesteps=[101, 501], collect_timesteps=[100])


def _image(seed=0, size=32):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8))


def _check_maps(maps: dict[str, np.ndarray], shape):
    for m in maps.values():
        assert m.shape == shape and np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    first, second = maps.values()
    assert np.abs(first - second).max() > 1e-3, "the two words' maps are the same"


@pytest.mark.parametrize("family", NEW)
def test_from_pipeline_maps(family):
    res = tiny_aligner(family, **FAST).heatmaps(_image(), ["cat", "dog"])
    for maps in (res.heatmaps, res.baseline_heatmaps):
        _check_maps(maps, (32, 32))
    assert res.losses["cat"] != res.losses["dog"]


@pytest.mark.parametrize("family", NEW)
def test_explain_command_on_the_tiny_model(family, tmp_path):
    path = tmp_path / "scene.png"
    _image(1).save(path)
    length = TEST_TEXT_LENGTHS.get(family, 16)
    conf = explain.compose(
        [
            "elbo=default",  # the command's default elbo=shapes is tuned to the testbed's UNet
            f"model.id=tiny:{family}",
            "model.resolution=32",
            f"model.max_sequence_length={length}",
            "elbo.elbo_timesteps=[101,501]",
            "elbo.collect_timesteps=[100]",
            f"output_dir={tmp_path / 'out'}",
            "dpi=30",
        ]
    )
    info = explain.run(conf, str(path), ["cat", "dog"])
    maps = {w: np.load(f"{info['folder']}/{info['files'][w]['elbo']}.npy") for w in ("cat", "dog")}
    _check_maps(maps, (32, 32))


@pytest.mark.parametrize("family", NEW)
def test_segment_run_on_the_tiny_model(family, tmp_path):
    from elbo_t2ialign.segmentation import run

    classes = ["cat", "dog"]
    data = write_dataset(tmp_path / "data", classes, random_samples(classes, 3, convention="voc"))
    conf = fixture_config(data, tmp_path / "run", "voc")
    conf["model"] = {
        "name": f"tiny_{family}",
        "id": f"tiny:{family}",
        "resolution": 32,
        "max_sequence_length": TEST_TEXT_LENGTHS.get(family, 16),
    }
    conf["elbo"] |= FAST
    out = run(conf)
    both = 0
    for folder in sorted((out / "maps").iterdir()):
        maps = {p.name: np.asarray(Image.open(p), dtype=np.float32) / 255 for p in folder.glob("elbo_*.png")}
        assert maps, f"no maps in {folder}"
        if len(maps) == 2:  # an image with both classes: the two maps differ
            _check_maps(maps, next(iter(maps.values())).shape)
            both += 1
    assert both, "no image of the fixture has both classes"


# ------------------------------------------------------------------ text positions


def _hand_template(family: str, prompt: str) -> tuple[str, int]:
    """The string the pipeline tokenizes, written out here, and the number of leading tokens it drops."""
    if family == "qwenimage":
        system = (
            "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
            "relationships of the objects and background:"
        )
        text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        return text, 34
    turn = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if family == "flux2":  # FLUX.2 [klein]: Qwen3's template with enable_thinking=False
        return turn + "<think>\n\n</think>\n\n", 0
    return turn, 0  # Z-Image: enable_thinking=True adds nothing


@pytest.mark.parametrize("family", [family_param(name) for name in ("flux2", "qwenimage", "zimage")])
def test_class_words_point_at_their_token_columns(family):
    aligner = tiny_aligner(family, **FAST)
    res = aligner.heatmaps(_image(), ["cat", "dog"])
    tok = tiny_pipeline(family).tokenizer
    text, dropped = _hand_template(family, res.prompts["collect"])
    enc = tok(text, return_offsets_mapping=True)
    start = text.index(res.prompts["collect"])
    for word in ("cat", "dog"):
        char = start + res.prompts["collect"].index(word)  # the word's first character
        token = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= char < b or (a == char))
        assert tok.convert_ids_to_tokens(enc["input_ids"][token]).lstrip("Ġ") == word
        assert res.token_positions[word] == [token - dropped]


@needs("flux2", "qwenimage", "zimage")
def test_text_columns_are_the_encoder_states_the_pipeline_keeps():
    """Column p of the denoiser's text input is the text encoder's state of template token p (+ the
    dropped prefix): Qwen-Image the last layer from token 34 on, Z-Image the second-to-last layer,
    FLUX.2 [klein] layers 9, 18 and 27 side by side."""
    checks = {
        "qwenimage": (lambda states: states[-1], 34, "encoder_hidden_states"),
        "zimage": (lambda states: states[-2], 0, "encoder_hidden_states"),
        "flux2": (
            lambda states: torch.cat([states[9], states[18], states[27]], dim=-1),
            0,
            "encoder_hidden_states",
        ),
    }
    for family, (pick, dropped, key) in checks.items():
        ad = tiny_aligner(family).adapter
        pipe = tiny_pipeline(family)
        text, _ = _hand_template(family, PROMPT)
        ids = torch.tensor([pipe.tokenizer(text).input_ids])
        with torch.no_grad():
            states = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
        expected = pick(states)[0, dropped:]
        got = ad.encode_prompt(PROMPT)[key][0]
        n = len(ad.token_ids(PROMPT))
        assert n == ids.shape[1] - dropped
        # FLUX.2 pads to max_sequence_length with the encoder's mask; the prompt's own rows match
        torch.testing.assert_close(got[:n], expected[:n], rtol=1e-5, atol=1e-5)
        if family != "flux2":  # padded here to batch prompts, with zeros (masked or cut off)
            assert not got[n:].any()


@needs("qwenimage")
def test_qwenimage_padding_to_a_fixed_length_leaves_the_output_unchanged():
    """The pipeline gives one prompt its own length and no mask; the adapter pads to
    max_sequence_length with a key mask: the same velocity."""
    ad = tiny_aligner("qwenimage").adapter
    pipe = tiny_pipeline("qwenimage")
    embeds, mask = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    assert mask is None and embeds.shape[1] < ad.max_sequence_length
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *ad.latent_shape, generator=g)
    t = torch.tensor([0.4])
    b, c, h, w = x.shape
    tokens = pipe._pack_latents(x, b, c, h, w)
    with torch.no_grad():
        own = pipe.transformer(
            hidden_states=tokens,
            timestep=t,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None,
            img_shapes=[[(1, h // 2, w // 2)]],
            return_dict=False,
        )[0]
        ours = ad.network(x, t, ad.encode_prompt(PROMPT))
    own = own.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)


@needs("zimage")
def test_zimage_output_is_the_negated_velocity_at_one_minus_sigma():
    """Z-Image's network takes 1 - sigma and the pipeline steps with minus its output."""
    ad = tiny_aligner("zimage").adapter
    pipe = tiny_pipeline("zimage")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, *ad.latent_shape, generator=g)
    t = torch.tensor([600])
    sigma = ad.schedule.sigma(t)
    caption = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)[0]
    with torch.no_grad():
        out = pipe.transformer([z[0][:, None]], 1 - sigma, caption, return_dict=False)[0][0][:, 0]
        pred = ad.predict(z, t, ad.encode_prompt(PROMPT))
    torch.testing.assert_close(pred[0], -out, rtol=1e-5, atol=1e-6)
    # the shift: sigma of training index t is 3 s / (1 + 2 s) with s = (t + 1) / 1000
    s = (600 + 1) / 1000
    assert sigma.item() == pytest.approx(3 * s / (1 + 2 * s), rel=1e-6)


@needs("flux2")
def test_flux2_latents_are_patchified_and_batch_normalised():
    ad = tiny_aligner("flux2").adapter
    pipe = tiny_pipeline("flux2")
    image = _image(2)
    z = ad.encode_image(image)
    x = ad.preprocess_image(image)
    with torch.no_grad():
        raw = pipe.vae.encode(x).latent_dist.mode()
    # patchify by hand: channel c*4 + 2*dy + dx at (i, j) is raw channel c at (2i + dy, 2j + dx)
    c, h, w = raw.shape[1:]
    hand = torch.empty(1, 4 * c, h // 2, w // 2)
    for ch in range(c):
        for dy in range(2):
            for dx in range(2):
                hand[0, ch * 4 + 2 * dy + dx] = raw[0, ch, dy::2, dx::2]
    bn = pipe.vae.bn
    hand = (hand - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(z, hand, rtol=1e-5, atol=1e-6)
    assert tuple(z.shape[1:]) == ad.latent_shape


# ------------------------------------------------------------------ releases


def _old_diffusers(monkeypatch, installed="0.33.1"):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: installed if name == "diffusers" else real(name)
    )


@pytest.mark.parametrize(
    "pipeline, family, since",
    [
        ("QwenImagePipeline", "Qwen-Image", "0.37.0"),
        ("Flux2Pipeline", "FLUX.2", "0.36.0"),
        ("Flux2KleinPipeline", r"FLUX.2 \[klein\]", "0.37.0"),
        ("ZImagePipeline", "Z-Image", "0.36.0"),
        ("ChromaPipeline", "Chroma", "0.34.0"),
    ],
)
def test_loading_on_an_older_diffusers_names_the_release(tmp_path, monkeypatch, pipeline, family, since):
    import json

    from elbo_t2ialign.core.adapters import load_pipeline
    from elbo_t2ialign.core.adapters.chat import ReleaseError

    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"})
    )
    _old_diffusers(monkeypatch)
    with pytest.raises(
        ReleaseError, match=rf"^{family} needs diffusers >= {since} \(installed: 0.33.1\); pip install"
    ):
        load_pipeline(str(tmp_path), torch.device("cpu"), torch.float32)


@needs("zimage")
def test_adapter_on_an_older_diffusers_is_one_line(monkeypatch):
    from elbo_t2ialign import Aligner

    pipe = tiny_pipeline("zimage")
    _old_diffusers(monkeypatch, "0.35.2")
    with pytest.raises(ValueError, match=r"^Z-Image needs diffusers >= 0.36.0 \(installed: 0.35.2\)"):
        Aligner.from_pipeline(pipe, device="cpu", resolution=32)


GEN_PROMPT, PHRASES = "a red cat and a blue dog", ["a red cat", "a blue dog"]


@pytest.mark.parametrize("family", NEW)
def test_generation_with_elbo_phrase_weights(family):
    """Two ELBO-weighted steps above and below weight 1 (strength 3 and 0.5): an image, weights from the
    distances, each phrase's positions the tokens of its words in the templated prompt."""
    from elbo_t2ialign.generation.sampler import ElboSampler
    from elbo_t2ialign.generation.weighting import phrase_weights, token_positions

    ad = tiny_aligner(family).adapter
    positions = token_positions(ad, GEN_PROMPT, PHRASES)
    ids = ad.token_ids(GEN_PROMPT)
    for phrase, pos in zip(PHRASES, positions, strict=True):
        words = [ad.attention_tokenizer.decode([ids[p]]).strip() for p in pos]
        assert words == phrase.split(), (phrase, pos, words)
    for strength in (3.0, 0.5):
        result = ElboSampler(ad, steps=2, strength=strength).sample(GEN_PROMPT, PHRASES, seed=1)
        assert result.image.size == (32, 32) and not result.plain
        assert result.weights[0] == phrase_weights(result.distances[0], strength)
        assert sorted(result.weights[0]) == sorted([1.0, strength])


@pytest.mark.parametrize("family", NEW)
def test_masked_prompt_hides_the_phrase_from_the_encoder_and_keeps_its_padding(family):
    """A phrase weighted below 1 is also encoded with its tokens masked from the text encoder: the mask
    the encoder receives is the pipeline's own (padding included) with the phrase's encoder positions
    (block position + the prefix Qwen-Image drops) set to 0."""
    from elbo_t2ialign.generation.weighting import token_positions

    ad = tiny_aligner(family).adapter
    encoder = tiny_pipeline(family).text_encoder
    seen = []
    handle = encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True
    )
    try:
        ad._encode_prompt(GEN_PROMPT)
        own = seen[-1]
        positions = token_positions(ad, GEN_PROMPT, PHRASES)[1]
        hooks_before = len(seen)
        masked = ad.encode_prompt_masked(GEN_PROMPT, positions)
    finally:
        handle.remove()
    shift = 34 if family == "qwenimage" else 0
    # the masking hook runs after the recording hook, so rebuild what it passes from the rule
    expected = own.clone()
    expected[:, [p + shift for p in positions]] = 0
    assert len(seen) == hooks_before + 1 and (own != 0).sum() > len(positions)
    plain = ad.encode_prompt(GEN_PROMPT)["encoder_hidden_states"]
    changed = (masked["encoder_hidden_states"] - plain).abs().amax(dim=-1)[0]
    assert changed.max() > 0, "masking the phrase changed nothing"
    # the masked conditioning is the encoder run with exactly that mask
    with torch.no_grad():
        handle = encoder.register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "attention_mask": expected.to(own.dtype)}), with_kwargs=True
        )
        try:
            by_hand = ad._encode_prompt(GEN_PROMPT)["encoder_hidden_states"]
        finally:
            handle.remove()
    torch.testing.assert_close(masked["encoder_hidden_states"], by_hand)


@needs("zimage")
def test_zimage_image_pad_tokens_are_keys_but_not_maps(monkeypatch):
    """At 24 px the 6x6 image tokens are padded to 64 with Z-Image's learned pad token: the capture is
    still the model's own attention (the pad keys are their own block) and the maps stay 6x6."""
    from test_own_attention import own_attention_differences

    from elbo_t2ialign import Aligner

    aligner = Aligner.from_pipeline(
        tiny_pipeline("zimage"), device="cpu", resolution=24, max_sequence_length=32, **FAST
    )
    assert [layer.resolution for layer in aligner.layers] == [6, 6]
    worst = own_attention_differences(aligner, monkeypatch)
    assert worst["probs"] < 1e-5 and worst["P@V"] < 1e-4
    res = aligner.heatmaps(_image(3, 24), ["cat", "dog"])
    _check_maps(res.heatmaps, (24, 24))


@pytest.mark.parametrize("family", [family_param(name) for name in ("flux2", "qwenimage")])
def test_vae_decode_inverts_the_latent_normalisation(family):
    """The generated latent is decoded the pipeline's way: decoding encode_image's latent gives the
    VAE's decoding of its raw latent mode."""
    ad = tiny_aligner(family).adapter
    vae = tiny_pipeline(family).vae
    image = _image(4)
    x = ad.preprocess_image(image)
    with torch.no_grad():
        if family == "qwenimage":
            raw = vae.decode(vae.encode(x[:, :, None]).latent_dist.mode(), return_dict=False)[0][:, :, 0]
        else:
            raw = vae.decode(vae.encode(x).latent_dist.mode(), return_dict=False)[0]
    torch.testing.assert_close(ad.vae_decode(ad.encode_image(image)), raw, rtol=1e-4, atol=1e-5)


def test_an_unsupported_denoiser_is_refused_naming_the_supported_families():
    from types import SimpleNamespace

    from elbo_t2ialign.core.adapters import adapter_for

    class Lonely(torch.nn.Module):
        pass

    pipe = SimpleNamespace(unet=None, transformer=Lonely(), components={})
    with pytest.raises(ValueError) as err:
        adapter_for(pipe, torch.device("cpu"), torch.float32)
    message = str(err.value)
    assert message.startswith("unsupported pipeline SimpleNamespace: denoiser Lonely is not one of")
    for name in ("UNet2DConditionModel", "Flux2Transformer2DModel", "ChromaTransformer2DModel"):
        assert name in message
    for name in ("QwenImageTransformer2DModel", "ZImageTransformer2DModel", "FluxTransformer2DModel"):
        assert name in message


@needs("flux2")
def test_flux2_dev_text_is_the_system_turn_and_three_mistral_layers(monkeypatch):
    """FLUX.2 [dev]: positions in [system message; user turn] (no generation prompt), the text columns
    Mistral-3's hidden states 10, 20 and 30 side by side, the guidance embedding at the pipeline's 4.0,
    and the capture the model's own attention."""
    from test_own_attention import own_attention_differences

    from elbo_t2ialign import Aligner
    from elbo_t2ialign.devtools.tiny import tiny_flux2_dev

    pipe = tiny_flux2_dev()
    aligner = Aligner.from_pipeline(pipe, device="cpu", resolution=32, max_sequence_length=160, **FAST)
    ad = aligner.adapter
    assert not ad.klein and ad.default_guidance == 1.0
    system = pipe.system_message
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n"
    ids = pipe.tokenizer(text).input_ids
    assert ad.token_ids(PROMPT) == ids
    res = aligner.heatmaps(_image(), ["cat", "dog"])
    enc = pipe.tokenizer(text, return_offsets_mapping=True)
    for word in ("cat", "dog"):
        char = text.index(PROMPT) + PROMPT.index(word)
        token = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= char < b)
        assert res.token_positions[word] == [token]
    _check_maps(res.heatmaps, (32, 32))
    with torch.no_grad():
        states = pipe.text_encoder(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([states[10], states[20], states[30]], dim=-1)[0]
    got = ad.encode_prompt(PROMPT)["encoder_hidden_states"][0]
    torch.testing.assert_close(got[: len(ids)], expected, rtol=1e-5, atol=1e-5)
    seen = []
    monkeypatch.setattr(
        type(pipe.transformer.time_guidance_embed),
        "forward",
        (lambda original: lambda self, t, g: seen.append(g) or original(self, t, g))(
            type(pipe.transformer.time_guidance_embed).forward
        ),
    )
    own_attention_differences(aligner, monkeypatch)
    assert seen and all(g is not None and torch.allclose(g, torch.full_like(g, 4000.0)) for g in seen)
