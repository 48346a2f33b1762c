"""The testbed model: offline tokenizer, a deterministic tiny training run, the committed pipeline."""

from pathlib import Path

import numpy as np
import pytest
import torch

from elbo_t2ialign.testbed import train, world

TINY = dict(
    threads=1,
    train_images=16,
    vae_channels=(16, 16),
    vae_steps=2,
    vae_batch=4,
    unet_channels=(16, 32),
    unet_heads=(1, 2),
    norm_groups=8,
    text_hidden=16,
    text_heads=1,
    text_layers=1,
    steps=3,
    batch=4,
    warmup=1,
    checkpoint_every=2,
)


def load(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False
    )


def test_tokenizer_holds_every_caption_word_as_one_token():
    tok = train.build_tokenizer()
    for word in world.VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = "a photo of " + ", ".join(world.CLASSES)  # a collection prompt with all 8 classes
    assert len(tok(longest).input_ids) <= train.MAX_TEXT_LENGTH


def test_caption_mixture_covers_the_method_prompt_forms():
    cfg = train.TrainConfig()
    objects = world.generate(5, "train").objects
    rng = np.random.default_rng(0)
    captions = [train.sample_caption(objects, rng, cfg) for _ in range(300)]
    assert "" in captions
    classes = [o.cls for o in objects]
    assert len(classes) >= 2
    assert any(c.startswith("a photo of ") and "," in c for c in captions)  # the method's class list
    assert any(c.count(" and ") == len(classes) - 1 and all(f"a {k}" in c for k in classes) for c in captions)
    assert all(w in world.VOCABULARY for c in captions for w in c.replace(",", " ").split())


def test_tiny_training_is_deterministic_and_saves_a_standard_pipeline(tmp_path):
    cfg = train.TrainConfig(**TINY)
    info = train.train(cfg, tmp_path / "a", tmp_path / "wa", progress=False)
    train.train(train.TrainConfig(**TINY), tmp_path / "b", tmp_path / "wb", progress=False)
    assert info["parameters"]["unet"] > 0
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor != 0.18215
    # the text encoder stays at its (seeded) random initialisation
    torch.manual_seed(cfg.seed)
    fresh = train.build_text_encoder(cfg, train.build_tokenizer())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in a.text_encoder.state_dict().items())
    # self-attention keys equal queries, both still at their (scaled) initialisation; the rest trained
    fresh_vae = train.build_vae(cfg)  # noqa: F841  (the trainer builds the VAE before the UNet)
    fresh_unet = train.build_unet(cfg)
    tied = 0
    for name, module in a.unet.named_modules():
        if name.endswith("attn1"):
            init = dict(fresh_unet.named_modules())[name].to_q.weight * cfg.self_attention_similarity
            assert torch.equal(module.to_q.weight, module.to_k.weight)
            assert torch.allclose(module.to_q.weight, init)
            assert not torch.allclose(module.to_v.weight, dict(fresh_unet.named_modules())[name].to_v.weight)
            tied += 1
    assert tied == 7  # TINY: 2 down, 1 mid, 4 up transformer blocks
    # a rerun resumes from the finished checkpoint and writes the same pipeline
    train.train(train.TrainConfig(**TINY), tmp_path / "c", tmp_path / "wa", progress=False)
    c = load(tmp_path / "c")
    assert all(torch.equal(v, c.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())
    # the final checkpoint exported as a pipeline equals the trained one, VAE scale included
    d = load(train.export_checkpoint(tmp_path / "wa" / "checkpoint.pt", tmp_path / "d"))
    assert all(torch.equal(v, d.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())
    assert d.vae.config.scaling_factor == a.vae.config.scaling_factor


COMMITTED = train.DEFAULT_MODEL_DIR


@pytest.mark.skipif(not (COMMITTED / "model_index.json").is_file(), reason="no committed testbed model")
def test_committed_model_loads_as_a_plain_diffusers_pipeline_and_runs():
    size = sum(f.stat().st_size for f in Path(COMMITTED).rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    pipe = load(COMMITTED)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.prediction_type == "epsilon"
    s = world.generate(0, "val")
    x = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            [s.caption], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        cond = pipe.text_encoder(ids)[0]
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([400])
        a = pipe.scheduler.alphas_cumprod[t].sqrt()
        pred = pipe.unet(a * z + (1 - a**2).sqrt() * eps, t, encoder_hidden_states=cond).sample
        rec = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    assert pred.shape == z.shape and z.shape[-1] == 32
    assert torch.isfinite(pred).all()
    assert ((pred - eps) ** 2).mean() < 0.5  # a trained denoiser, not a random one (about 1.0)
    assert ((rec - x) ** 2).mean() < 0.1  # the VAE reconstructs


@pytest.mark.parametrize("trained", [False, True], ids=["committed", "fresh-training"])
def test_saved_model_holds_the_files_transformers_4_reads(tmp_path, trained):
    """transformers 4.x reads the tokenizer from vocab.json/merges.txt and the text encoder's weights
    under "text_model." (5.x saves neither that way): without them the floor environment loads a
    random text encoder. The two files must tokenize as tokenizer.json does."""
    import shutil

    from safetensors import safe_open
    from transformers import CLIPTokenizer

    folder = COMMITTED
    if trained:
        folder = tmp_path / "model"
        train.train(
            train.TrainConfig(**{**TINY, "steps": 1, "vae_steps": 1}), folder, tmp_path / "w", progress=False
        )
    with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    files_only = tmp_path / "files_only"
    files_only.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / "tokenizer" / name, files_only / name)
    full, from_files = (
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        CLIPTokenizer.from_pretrained(files_only),
    )
    captions = [world.generate(i, "val").caption for i in range(20)] + [
        "a photo of cross, triangle",
        "Zebra!",
    ]
    assert [full(c).input_ids for c in captions] == [from_files(c).input_ids for c in captions]
