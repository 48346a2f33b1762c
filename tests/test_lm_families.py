"""Sana, Lumina-Image 2.0 and CogView4 (language-model text encoders, instruction templates):
the text columns are the ids the pipeline itself feeds, the schedules are the scheduler's own,
Sana's linear self-attention map is its ReLU kernel, and explain gives maps per word."""

import numpy as np
import pytest
import torch
from conftest import family_param, needs, tiny_aligner, tiny_pipeline
from PIL import Image

# skipped, with the release they need, where the installed diffusers predates them
LM_FAMILIES = [family_param(name) for name in ("sana", "lumina2", "cogview4", "hunyuanimage")]


def _encoder_inputs(ad, prompt):
    """The ids the pipeline's own `encode_prompt` gives the text encoder (a forward pre-hook on it)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input_ids"]).clone())

    handle = ad.pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if ad.family == "cogview4":  # the pipeline pads to a multiple of 16 of the batch's longest prompt
            ad.pipe._get_glm_embeds(prompt, max_sequence_length=ad.text_length, device=ad.device)
        elif ad.family == "sana":
            ad.pipe.encode_prompt(
                prompt,
                do_classifier_free_guidance=False,
                device=ad.device,
                max_sequence_length=ad.max_sequence_length,
                complex_human_instruction=ad.instruction,
            )
        elif ad.family == "hunyuanimage":  # its window is the pipeline's tokenizer_max_length
            saved, ad.pipe.tokenizer_max_length = ad.pipe.tokenizer_max_length, ad.max_sequence_length
            try:
                ad.pipe.encode_prompt(prompt, device=ad.device)
            finally:
                ad.pipe.tokenizer_max_length = saved
        else:
            ad.pipe.encode_prompt(
                prompt,
                do_classifier_free_guidance=False,
                device=ad.device,
                max_sequence_length=ad.max_sequence_length,
            )
    finally:
        handle.remove()
    return seen[0][0].tolist()


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_text_columns_are_the_ids_the_pipeline_feeds(family):
    ad = tiny_aligner(family).adapter
    tok = ad.pipe.tokenizer
    prompt = "a photo of cat, dog"
    fed = _encoder_inputs(ad, prompt)
    if family == "sana":  # the pipeline keeps BOS and the last max_sequence_length - 1 positions
        n = ad.max_sequence_length
        fed = [fed[0], *fed[len(fed) - n + 1 :]]
    if family == "hunyuanimage":  # the pipeline keeps the hidden states from its start index on
        fed = fed[ad.pipe.prompt_template_encode_start_idx :]
    ids = ad.token_ids(prompt)
    if family == "cogview4":  # the pipeline pads on the left, the adapter on the right (cogview4.py)
        assert [i for i in fed if i != tok.pad_token_id] == ids and len(ids) < len(fed)
        # a prompt that fills its 16 columns: the pipeline adds no padding, the embeddings are its own
        full = "a photo of red " + ", ".join(["cat", "dog", "bird", "car", "plant"]) + " on"
        assert len(ad.token_ids(full)) == 16
        own = ad.pipe._get_glm_embeds(full, max_sequence_length=16, device=ad.device)
        torch.testing.assert_close(ad.encode_prompt(full)["encoder_hidden_states"], own.to(ad.dtype))
    else:
        assert fed[: len(ids)] == ids and set(fed[len(ids) :]) <= {tok.pad_token_id}
    # the class words sit where the tokenizer puts " cat" and " dog", after the template
    positions = (
        tiny_aligner(family)
        .heatmaps(_image(), ["cat", "dog"], elbo_timesteps=[1, 501], collect_timesteps=[20])
        .token_positions
    )
    space = "Ġ" if family == "hunyuanimage" else "▁"  # Qwen's byte-level BPE, Gemma/GLM stand-ins
    for word in ("cat", "dog"):
        (pos,) = positions[word]
        assert tok.convert_ids_to_tokens(ids[pos]) == space + word
    assert positions["cat"][0] > positions["dog"][0] - 3  # "cat" "," "dog"


def _image(seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_explain_maps_are_finite_in_unit_range_and_differ_between_words(family):
    res = tiny_aligner(family).heatmaps(
        _image(1), ["cat", "dog"], elbo_timesteps=[1, 501], collect_timesteps=[20], strength=2.0
    )
    for maps in (res.heatmaps, res.baseline_heatmaps, res.cross):
        for m in maps.values():
            assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
        assert np.abs(maps["cat"] - maps["dog"]).max() > 1e-3
    assert all(np.isfinite(v) for v in res.losses.values())


def _scheduler_pairs(ad, steps=10):
    """(sigma, network timestep) pairs of the pipeline's own sampling schedule, from its scheduler."""
    import copy

    sch = copy.deepcopy(ad.pipe.scheduler)
    if ad.family == "sana":  # 9 steps: DPM's flow levels j * 999 / 9000 lie on the 1/1000 grid
        sch.set_timesteps(9)
        return sch.sigmas[:-1].double(), sch.timesteps.double() * ad.pipe.transformer.config.timestep_scale
    if ad.family == "hunyuanimage":
        sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        return sch.sigmas[:-1].double(), sch.timesteps.double()
    if ad.family == "lumina2":
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
        return sch.sigmas[:-1].double(), 1 - sch.timesteps.double() / sch.config.num_train_timesteps
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

    c = sch.config
    ts = np.linspace(c.num_train_timesteps, 1.0, steps).astype(np.int64).astype(np.float32)
    mu = calculate_shift(ad.grid**2, c.base_image_seq_len, c.base_shift, c.max_shift)
    sch.set_timesteps(steps, timesteps=ts, sigmas=ts / c.num_train_timesteps, mu=mu)
    return sch.sigmas[:-1].double(), sch.timesteps.double()


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_schedule_is_the_pipelines_own(family):
    ad = tiny_aligner(family).adapter
    sigmas, model_t = _scheduler_pairs(ad)
    # each pipeline step's noise level is a level of the adapter's table (a training index), and there
    # the network is given the pipeline's timestep
    sched = ad.schedule
    index = (sched.sigmas.double()[None] - sigmas[:, None]).abs().argmin(1)
    torch.testing.assert_close(sched.sigma(index).double(), sigmas, atol=1e-5, rtol=0)
    torch.testing.assert_close(sched.model_timestep(index).double(), model_t, atol=1e-3, rtol=0)


def test_lumina2_prediction_is_negated_velocity():
    ad = tiny_aligner("lumina2").adapter
    z = torch.randn(1, 4, 16, 16)
    t = torch.tensor([300])
    cond = ad.encode_prompt("a photo of cat")
    raw = ad.network(ad.schedule.model_input(z, t), ad.schedule.model_timestep(t), cond)
    torch.testing.assert_close(ad.predict(z, t, cond), -raw.float())


def test_sana_linear_self_attention_map_is_its_relu_kernel():
    """The recorded self map of a linear-attention layer is relu(q) . relu(k) normalised per query row,
    computed here from the module's own projections, and times the values gives the processor's
    output before its out-projection."""
    aligner = tiny_aligner("sana")
    ad = aligner.adapter
    modules = dict(ad.denoiser.named_modules())
    linear = ad.linear_attention_layers()
    assert linear == [layer.name for layer in aligner.layers if layer.kind == "self"] and linear
    inputs, outputs, hooks = {}, {}, []
    for name in linear:
        attn = modules[name]
        hooks.append(attn.register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, a[0].clone())))
        hooks.append(
            attn.to_out[0].register_forward_pre_hook(lambda m, a, n=name: outputs.setdefault(n, a[0].clone()))
        )
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([20, 400])
    cond = {k: torch.cat([v, v]) for k, v in ad.encode_prompt("a photo of cat, dog").items()}
    try:
        ad.predict(z, t, cond)  # diffusers' own processors
    finally:
        for h in hooks:
            h.remove()
    rec = ad.recorder({"self1": dict.fromkeys(linear, 1.0)}, per_layer=True, chunk_mb=0.01)
    with rec:
        ad.predict(z, t, cond)
    for name in linear:
        attn, x = modules[name], inputs[name].double()
        heads = attn.heads

        def project(lin, x=x, heads=heads):
            bias = None if lin.bias is None else lin.bias.double()
            return torch.nn.functional.linear(x, lin.weight.double(), bias).unflatten(-1, (heads, -1))

        q, k, v = torch.relu(project(attn.to_q)), torch.relu(project(attn.to_k)), project(attn.to_v)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k)
        probs = scores / (scores.sum(-1, keepdim=True) + 1e-15)  # (B, H, N, N)
        torch.testing.assert_close(
            rec.layer_sums[name]["self"].double(), probs.mean(1).sum(0), atol=1e-5, rtol=0
        )
        out = torch.einsum("bhnm,bmhd->bnhd", probs, v).flatten(2)
        torch.testing.assert_close(out, outputs[name].double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_generate_runs_with_elbo_phrase_weights(family, tmp_path):
    """`generate` on the tiny model: the pipeline takes prompt embeddings, so the ELBO phrase weights
    act on them; both images are written and the phrases are located in the fed text."""
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.cli import config_dir, to_container
    from elbo_t2ialign.generation.runner import run
    from elbo_t2ialign.generation.weighting import token_positions

    overrides = [f"model.id=tiny:{family}", f"model.name=tiny_{family}", "model.max_sequence_length=16"]
    overrides += ["prompts=demo", "steps=2", "num_prompts=1", "progress=false", f"output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        run(to_container(compose("generate", overrides=overrides)))
    assert Image.open(tmp_path / "images/elbo/00000_4307.png").size == (32, 32)
    ad = tiny_aligner(family).adapter
    ids = ad.token_ids("a cat and a dog")
    (cat, dog) = token_positions(ad, "a cat and a dog", ["a cat", "a dog"])
    space = "Ġ" if family == "hunyuanimage" else "▁"
    assert [ad.attention_tokenizer.convert_ids_to_tokens(ids[p]) for p in cat][-1] == space + "cat"
    assert [ad.attention_tokenizer.convert_ids_to_tokens(ids[p]) for p in dog] == [space + "a", space + "dog"]


@pytest.mark.parametrize("family", [*LM_FAMILIES, "auraflow"])
def test_explain_and_segment_take_the_tiny_model_by_id(family, tmp_path):
    """`model.id=tiny:<family>` in the explain and segment configs: finite maps in [0, 1] per word."""
    from elbo_t2ialign import explain
    from elbo_t2ialign.devtools.fixtures import fixture_config, random_samples, write_dataset
    from elbo_t2ialign.segmentation import run

    image = tmp_path / "img.png"
    _image(2).save(image)
    model = [f"model.id=tiny:{family}", "model.resolution=32", "model.max_sequence_length=16"]
    fast = ["elbo=default", "elbo.elbo_timesteps=[1,501]", "elbo.collect_timesteps=[20]", "device=cpu"]
    argv = [str(image), "cat", "dog", *model, *fast, f"output_dir={tmp_path / 'explain'}"]
    assert explain.main(argv) == 0
    maps = sorted((tmp_path / "explain").rglob("*.png"))
    assert maps

    classes = ["cat", "dog"]
    data = write_dataset(tmp_path / "data", classes, random_samples(classes, 1, convention="voc"))
    cfg = fixture_config(data, tmp_path / "seg", "voc", num_images=1)
    cfg["model"] = {
        "name": f"tiny_{family}",
        "id": f"tiny:{family}",
        "resolution": 32,
        "max_sequence_length": 16,
    }
    cfg["elbo"] = {"strength": 3.0, "elbo_timesteps": [1, 501], "collect_timesteps": [20]}
    out = run(cfg)
    stored = sorted((out / "maps").rglob("elbo_*.png"))
    assert stored
    for path in stored:
        m = np.asarray(Image.open(path)) / 255.0
        assert np.isfinite(m).all() and 0 <= m.min() and m.max() <= 1


@needs("hunyuanimage")
def test_hunyuanimage_glyph_columns_come_first():
    """Quoted text is also read by the ByT5 glyph encoder, whose valid tokens the transformer puts
    before the Qwen tokens: the prompt's words move right by that many columns."""
    ad = tiny_aligner("hunyuanimage").adapter
    prompt = 'a cat with "hi"'
    cond = ad.encode_prompt(prompt)
    n_glyph = int(cond["encoder_attention_mask_2"].sum())
    ids = ad.token_ids(prompt)
    assert n_glyph > 0 and ids[:n_glyph] == [-1] * n_glyph
    plain = ad.token_ids("a cat with hi")
    assert ids[n_glyph : n_glyph + 3] == plain[:3]  # "a", " cat", " with" after the glyph columns


@pytest.mark.parametrize(
    ("family", "since"),
    [
        ("sana", "0.32.0"),
        ("lumina2", "0.33.0"),
        pytest.param("hunyuanimage", "0.36.0", marks=needs("hunyuanimage")),
    ],
)
def test_an_older_diffusers_is_refused_in_one_line_naming_the_release(family, since, monkeypatch):
    import importlib.metadata

    from elbo_t2ialign.core.adapters import adapter_for

    pipe = tiny_pipeline(family)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.31.0")
    with pytest.raises(ImportError, match=rf"needs diffusers >= {since} \(installed: 0.31.0\)") as err:
        adapter_for(pipe, torch.device("cpu"), torch.float32, 32, 16)
    assert "\n" not in str(err.value)


def test_auraflow_columns_follow_the_register_tokens_and_the_schedule_is_the_pipelines():
    """AuraFlow's transformer prepends its learned register tokens to the text: a word's column is its
    T5 position plus their count; the network gets sigma = t / 1000 of the scheduler's shifted steps."""
    aligner = tiny_aligner("auraflow")
    ad = aligner.adapter
    registers = ad.pipe.transformer.register_tokens.shape[1]
    prompt = "a photo of cat, dog"
    t5 = ad.pipe.tokenizer(prompt).input_ids
    assert ad.token_ids(prompt) == [-1] * registers + t5
    assert ad.text_length == registers + ad.max_sequence_length
    res = aligner.heatmaps(_image(3), ["cat", "dog"], elbo_timesteps=[1, 501], collect_timesteps=[20])
    assert res.token_positions["cat"] == [
        registers + t5.index(ad.pipe.tokenizer.convert_tokens_to_ids("cat"))
    ]
    import copy

    sch = copy.deepcopy(ad.pipe.scheduler)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))  # levels on the 1/1000 grid of training indices
    sigmas = sch.sigmas[:-1].double()
    index = (ad.schedule.sigmas.double()[None] - sigmas[:, None]).abs().argmin(1)
    torch.testing.assert_close(ad.schedule.sigma(index).double(), sigmas, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ad.schedule.model_timestep(index).double(), sch.timesteps.double() / 1000, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_masked_phrase_encode_hides_the_phrase_token_from_the_text_encoder(family):
    """A phrase weight below 1 encodes the prompt with the phrase's tokens masked in the text encoder:
    the mask the encoder gets is 0 exactly where its input holds the phrase's token (templates and
    dropped prefixes accounted for), and the padding mask the pipeline passes is kept."""
    ad = tiny_aligner(family).adapter
    prompt = "a photo of cat, dog"
    tok = ad.attention_tokenizer
    (pos,) = [
        p
        for p, i in enumerate(ad.token_ids(prompt))
        if i == tok.convert_tokens_to_ids(("Ġ" if family == "hunyuanimage" else "▁") + "cat")
    ]
    seen = []
    encoder = ad.pipe.text_encoder
    forward = encoder.forward

    def recording(*args, **kwargs):  # what the encoder runs with, after the masking hooks
        ids = args[0] if args else kwargs["input_ids"]
        seen.append((ids[0].tolist(), kwargs.get("attention_mask")))
        return forward(*args, **kwargs)

    encoder.forward = recording
    try:
        ad.encode_prompt_masked(prompt, [pos])
    finally:
        del encoder.forward
    ids, mask = seen[-1]
    cat = tok.convert_tokens_to_ids(("Ġ" if family == "hunyuanimage" else "▁") + "cat")
    hidden = [i for i, m in enumerate(mask[0].tolist()) if m == 0 and ids[i] != tok.pad_token_id]
    assert [ids[i] for i in hidden] == [cat]
