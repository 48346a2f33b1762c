"""The benchmark machinery on tiny models: the reference-style path gives the same maps as the
optimized one, the JSON has its fields, shards split the images, memory stays flat in timesteps."""

import numpy as np
import pytest
import torch
from conftest import tiny_aligner

from elbo_t2ialign import Aligner
from elbo_t2ialign.bench import (
    KeepAllRecorder,
    NetworkTimer,
    ReferenceAligner,
    bench_image,
    build_pipeline,
    image_classes,
    main,
)
from elbo_t2ialign.models import adapter_for
from elbo_t2ialign.options import AlignOptions

FIELDS = ("sec_per_image", "forward_samples_per_image", "network_sec_per_image", "overhead_fraction",
          "peak_mem_mb")


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-sd3"])
def test_reference_mode_maps_equal_optimized(model):
    """Parity: one sample per call, explicit softmax everywhere, maps kept vs the batched lean path."""
    pipe, _ = build_pipeline(model, torch.device("cpu"))
    ad = adapter_for(pipe, torch.device("cpu"), torch.float32, 32, 16)
    timer = NetworkTimer(ad, torch.device("cpu"))
    opt, ref = Aligner(ad), ReferenceAligner(ad)
    image, classes = bench_image(0, 32), image_classes(0, 3)
    a = opt.heatmaps(image, classes, seed=5)
    calls_opt, samples_opt = timer.calls, timer.samples
    timer.reset()
    b = ref.heatmaps(image, classes, seed=5)
    assert samples_opt == timer.samples == 20 * 3 + 10  # PROTOCOL: 20 x classes + 10 forwards
    assert timer.calls == timer.samples and calls_opt < timer.calls
    np.testing.assert_allclose([a.elbo[c] for c in classes], [b.elbo[c] for c in classes], rtol=1e-5)
    assert a.tau == pytest.approx(b.tau, rel=1e-3)  # min-max over close losses amplifies rounding
    for c in classes:
        np.testing.assert_allclose(a.heatmaps[c], b.heatmaps[c], atol=1e-3, rtol=0)
        np.testing.assert_allclose(a.raw_heatmaps[c], b.raw_heatmaps[c], atol=1e-3, rtol=0)


def test_compare_prints_both_modes(capsys):
    result = main(["--model", "tiny-sd", "--compare", "--classes", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("{") and '"speedup"' in line
    for mode in ("optimized", "reference"):
        run = result[mode]
        assert all(run[k] >= 0 for k in FIELDS), run
        assert run["forward_samples_per_image"] == 50 and run["peak_mem_mb"] > 0
        assert 0 <= run["overhead_fraction"] < 1 and run["network_sec_per_image"] <= run["sec_per_image"]
    assert result["reference"]["network_calls_per_image"] == 50
    assert result["optimized"]["network_calls_per_image"] < 50
    assert result["max_abs_diff"] <= 1e-3
    assert result["speedup"] == pytest.approx(
        result["reference"]["sec_per_image"] / result["optimized"]["sec_per_image"])


def test_processes_split_the_images():
    result = main(["--model", "tiny-sd", "--images", "3", "--processes", "2", "--classes", "1"])
    one, two = result["throughput"]["1"], result["throughput"]["2"]
    assert one["images_per_sec"] > 0 and two["images_per_sec"] > 0 and result["scaling"] > 0
    assert len(one["sec_per_image"]) == 1 and len(two["sec_per_image"]) == 2


def test_full_size_configs_have_the_published_parameter_counts():
    """Built on the meta device: no memory, no init; millions of parameters per component."""
    published = {
        "sd15": {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06},
        "sdxl": {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66},
        "sd3": {"transformer": 2028.33, "vae": 83.82, "text_encoder": 123.65, "text_encoder_2": 694.66,
                "text_encoder_3": 4762.31},
    }
    for model, sizes in published.items():
        pipe, notes = build_pipeline(model, torch.device("meta"), t5=True)
        for name, millions in sizes.items():
            count = sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
            assert count == pytest.approx(millions, abs=0.01), (model, name)
    _, notes = build_pipeline("sd3", torch.device("meta"))
    assert any("text_encoder_3=None" in n for n in notes)


def test_recorder_memory_is_flat_in_collection_timesteps():
    """Counting stub over the stored tensors: the running sums hold the same bytes for 2 or 12
    collection timesteps, while the reference-style recorder keeps a map per layer and step."""
    aligner = tiny_aligner("sd")
    ad, weights = aligner.adapter, aligner._weights
    z0 = torch.zeros(1, 4, ad.latent_size, ad.latent_size)

    def stored_bytes(rec):
        tensors = list(rec.sums.values()) + [m for _, maps, _ in getattr(rec, "kept", []) for m in maps.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    lean, kept = [], []
    for n in (2, 12):
        opts = AlignOptions(collect_timesteps=list(range(20, 20 * n + 1, 20)), batch_size=4)
        noise = torch.randn(n, 4, ad.latent_size, ad.latent_size)
        rec = aligner._collect(z0, "a photo of cat", noise, opts, weights)
        assert set(rec.samples.values()) == {n}
        lean.append(stored_bytes(rec))
        ref = KeepAllRecorder(ad, weights, keep=True)
        with ref:
            for lo in range(n):
                t = torch.tensor([20 * (lo + 1)])
                ad.predict(ad.schedule.add_noise(z0, noise[lo : lo + 1], t), t, ad.encode_prompt("a photo of cat"))
        kept.append(stored_bytes(ref))
    assert lean[0] == lean[1] > 0
    assert kept[1] == 6 * kept[0]


def test_prompt_cache_is_bounded():
    ad = tiny_aligner("sd").adapter
    ad.clear_prompt_cache()
    old = ad.prompt_cache_size
    try:
        ad.prompt_cache_size = 3
        first = ad.encode_prompt("a photo of cat")
        for word in ("dog", "bird", "car"):
            ad.encode_prompt(f"a photo of {word}")
        assert len(ad._cond_cache) == 3 and "a photo of cat" not in ad._cond_cache
        assert ad.encode_prompt("a photo of car") is ad.encode_prompt("a photo of car")  # a hit
        torch.testing.assert_close(ad.encode_prompt("a photo of cat")["encoder_hidden_states"],
                                   first["encoder_hidden_states"])
    finally:
        ad.prompt_cache_size = old
        ad.clear_prompt_cache()
