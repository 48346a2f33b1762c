"""The public API end to end on tiny models of every family."""

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_aligner
from PIL import Image

from elbo_t2ialign.core import calibrate


def _rgb(w=40, h=30, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("family", FAMILIES)
def test_heatmaps_every_family(family):
    aligner = tiny_aligner(family, elbo_timesteps=[1, 501], collect_timesteps=[20, 120])
    res = aligner.heatmaps(_rgb(), ["cat", "dog", "bird"])
    assert list(res.heatmaps) == ["cat", "dog", "bird"]
    for maps in (res.heatmaps, res.baseline_heatmaps):
        for m in maps.values():
            assert m.shape == (30, 40) and np.isfinite(m).all()
            assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    losses = [res.losses[c] for c in ("cat", "dog", "bird")]
    np.testing.assert_allclose(
        [res.tau[c] for c in ("cat", "dog", "bird")], calibrate.temperatures(losses, 3.0), rtol=1e-9
    )
    best = min(res.losses, key=res.losses.get)
    np.testing.assert_allclose(res.heatmaps[best], res.baseline_heatmaps[best], atol=1e-6)  # tau = 1


def test_calibrated_map_is_refined_power_of_the_cross_map():
    """heatmap = minmax(resize(S2 @ S1 @ minmax(cross)^tau)), recomputed here from the recorder."""
    aligner = tiny_aligner("sd", elbo_timesteps=[1, 501], collect_timesteps=[20, 120])
    img = _rgb(16, 16)
    res = aligner.heatmaps(img, ["cat", "dog"], seed=3)
    ad, opts = aligner.adapter, aligner.options
    z0 = ad.encode_image(img)
    collect_noise, _ = aligner._draw_noise(z0, opts, 3)
    rec = aligner._collect(z0, res.prompts["collect"], collect_noise, opts, aligner._weights)
    cross, s1, s2 = rec.mean("cross"), rec.mean("self1"), rec.mean("self2")
    for name in ("cat", "dog"):
        a = cross[:, res.token_positions[name]].mean(1)
        a = ((a - a.min()) / (a.max() - a.min() + 1e-10)) ** res.tau[name]
        r = (s2 @ (s1 @ a)).reshape(1, 1, 16, 16)
        r = torch.nn.functional.interpolate(r, size=(16, 16), mode="bilinear")[0, 0]
        r = (r - r.min()) / (r.max() - r.min() + 1e-10)
        np.testing.assert_allclose(res.heatmaps[name], r.numpy(), atol=1e-5)


def test_noise_order_matches_reference_convention():
    aligner = tiny_aligner("sd")
    z0 = torch.zeros(1, 4, 16, 16)
    collect, elbo = aligner._draw_noise(z0, aligner.options, 7)
    g = torch.Generator("cpu").manual_seed(7)
    assert torch.equal(collect, torch.randn((10, 4, 16, 16), generator=g))
    assert torch.equal(elbo, torch.randn((20, 4, 16, 16), generator=g))


def test_same_seed_same_maps_and_single_class():
    aligner = tiny_aligner("sd", elbo_timesteps=[1], collect_timesteps=[20])
    a = aligner.heatmaps(_rgb(), ["cat"], seed=1)
    b = aligner.heatmaps(_rgb(), ["cat"], seed=1)
    np.testing.assert_array_equal(a.heatmaps["cat"], b.heatmaps["cat"])
    assert a.tau == {"cat": 1.0} and a.losses == {"cat": None}


def test_phrases_locate_the_class_word_inside_the_phrase():
    aligner = tiny_aligner("sd", elbo_timesteps=[1], collect_timesteps=[20])
    res = aligner.heatmaps(_rgb(), ["cat", "dog"], phrases=["red cat", "blue dog"])
    assert res.prompts["collect"] == "a photo of red cat, blue dog"
    tok = aligner.adapter.token_ids
    prompt_ids = tok(res.prompts["collect"], True)
    assert [prompt_ids[i] for i in res.token_positions["cat"]] == tok("cat", False)
    assert [prompt_ids[i] for i in res.token_positions["dog"]] == tok("dog", False)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_image_modes_accepted(mode):
    aligner = tiny_aligner("sd", elbo_timesteps=[1], collect_timesteps=[20])
    if mode == "I;16":
        img = Image.fromarray((np.random.RandomState(0).rand(20, 26) * 65535).astype(np.uint16))
        assert img.mode == "I;16"
    else:
        img = _rgb(26, 20).convert(mode)
    res = aligner.heatmaps(img, ["cat", "dog"])
    assert res.heatmaps["dog"].shape == (20, 26) and np.isfinite(res.heatmaps["dog"]).all()


def test_bad_class_lists_are_clear_errors():
    aligner = tiny_aligner("sd")
    with pytest.raises(ValueError, match="class list is empty"):
        aligner.heatmaps(_rgb(), [])
    with pytest.raises(TypeError, match="list of names"):
        aligner.heatmaps(_rgb(), "cat")
    too_many = [f"class{i}" for i in range(20)]  # each spelled out in characters: far over 77 tokens
    with pytest.raises(
        ValueError, match=r"tokens but the text encoder takes at most 77.*prompt_overflow=split"
    ):
        aligner.heatmaps(_rgb(), too_many, prompt_overflow="refuse")
    with pytest.raises(ValueError, match=r"this class alone does not fit"):
        aligner.heatmaps(_rgb(), ["x" * 80, "cat"])  # split (the default) cannot split one class


def test_unknown_option_is_named():
    aligner = tiny_aligner("sd")
    with pytest.raises(TypeError, match="strenght"):
        aligner.heatmaps(_rgb(), ["cat"], strenght=2)


def test_offline_hub_id_error_names_the_model(monkeypatch):
    from elbo_t2ialign import Aligner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'no-such-org/no-such-model'.*local folder"):
        Aligner.from_pretrained("no-such-org/no-such-model", device="cpu")


def test_loads_saved_folder_like_a_hub_model(tmp_path, monkeypatch):
    from conftest import tiny_pipeline

    from elbo_t2ialign import Aligner
    from elbo_t2ialign.core import adapters

    prepared = []
    original = adapters.prepare_pipeline
    monkeypatch.setattr(adapters, "prepare_pipeline", lambda *a: prepared.append(a[1:]) or original(*a))
    tiny_pipeline("sd").save_pretrained(tmp_path / "tiny")
    aligner = Aligner.from_pretrained(
        str(tmp_path / "tiny"), device="cpu", elbo_timesteps=[1], collect_timesteps=[20]
    )
    assert prepared == [(torch.device("cpu"), torch.float32)]  # once, by adapter_for
    modules = [m for m in aligner.adapter.pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert not any(m.training or any(p.requires_grad for p in m.parameters()) for m in modules)
    assert (
        adapters.load_pipeline(str(tmp_path / "tiny"), torch.device("cpu"), torch.float16).vae.dtype
        == torch.float32
    )
    assert len(prepared) == 2  # load_pipeline alone still prepares (VAE in float32)
    assert aligner.adapter.resolution == 32  # the VAE's sample size
    res = aligner.heatmaps(_rgb(), ["cat", "dog"])
    ref = tiny_aligner("sd", elbo_timesteps=[1], collect_timesteps=[20]).heatmaps(_rgb(), ["cat", "dog"])
    # same weights, re-loaded: equal up to kernel choices of the loaded text encoder (sdpa vs eager)
    np.testing.assert_allclose(
        [res.losses["cat"], res.losses["dog"]], [ref.losses["cat"], ref.losses["dog"]], rtol=1e-4
    )
    np.testing.assert_allclose(res.heatmaps["cat"], ref.heatmaps["cat"], atol=2e-3)


def test_bad_prompt_fails_before_any_forward(monkeypatch):
    aligner = tiny_aligner("sd")
    calls = []
    monkeypatch.setattr(aligner.adapter, "_forward", lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="tokens but the text encoder takes at most 77"):
        aligner.heatmaps(_rgb(), [f"class{i}" for i in range(20)], prompt_overflow="refuse")
    assert calls == []  # the long collection prompt is checked before the ELBO forwards
