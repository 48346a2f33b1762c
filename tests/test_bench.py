"""The benchmark machinery on tiny models: the reference-style path gives the same maps as the
optimized one, the JSON has its fields, shards split the images, memory stays flat in timesteps."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_aligner

import elbo_t2ialign.core.calibrate
from elbo_t2ialign import Aligner
from elbo_t2ialign.core.adapters import adapter_for
from elbo_t2ialign.core.calibrate import to_image
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.devtools.bench import (
    KeepAllRecorder,
    NetworkTimer,
    ReferenceAligner,
    bench_image,
    build_pipeline,
    image_classes,
    main,
)
from elbo_t2ialign.devtools.bench_profile import (
    PARTS,
    Breakdown,
    crosses_devices,
    flops_per_sample,
    record_forwards,
)

FIELDS = (
    "sec_per_image",
    "forward_samples_per_image",
    "network_sec_per_image",
    "overhead_fraction",
    "peak_mem_mb",
)


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
    assert samples_opt == timer.samples == 20 * 3 + 10  # method.md §3.2, §4.2: 20 x classes + 10 forwards
    assert timer.calls == timer.samples and calls_opt < timer.calls
    np.testing.assert_allclose([a.losses[c] for c in classes], [b.losses[c] for c in classes], rtol=1e-5)
    assert a.tau == pytest.approx(b.tau, rel=1e-3)  # min-max over close losses amplifies rounding
    for c in classes:
        np.testing.assert_allclose(a.heatmaps[c], b.heatmaps[c], atol=1e-3, rtol=0)
        np.testing.assert_allclose(a.baseline_heatmaps[c], b.baseline_heatmaps[c], atol=1e-3, rtol=0)


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
        result["reference"]["sec_per_image"] / result["optimized"]["sec_per_image"]
    )


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
        "sd3": {
            "transformer": 2028.33,
            "vae": 83.82,
            "text_encoder": 123.65,
            "text_encoder_2": 694.66,
            "text_encoder_3": 4762.31,
        },
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
        tensors = list(rec.sums.values()) + [
            m for _, maps, _ in getattr(rec, "kept", []) for m in maps.values()
        ]
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
                ad.predict(
                    ad.schedule.add_noise(z0, noise[lo : lo + 1], t), t, ad.encode_prompt("a photo of cat")
                )
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
        torch.testing.assert_close(
            ad.encode_prompt("a photo of cat")["encoder_hidden_states"], first["encoder_hidden_states"]
        )
    finally:
        ad.prompt_cache_size = old
        ad.clear_prompt_cache()


TOLERANCE = 0.05  # the parts and the network must account for the wall time to within 5%


@pytest.mark.parametrize(("model", "classes"), [("tiny-sd", 2), ("tiny-sd3", 3), ("tiny-sdxl", 1)])
def test_floor_replays_the_same_samples_and_the_breakdown_adds_up(model, classes):
    run = main(
        [
            "--model",
            model,
            "--classes",
            str(classes),
            "--images",
            "2",
            "--floor-batches",
            "3",
            "16",
            "--unsynced",
        ]
    )
    # the second, untimed-network pass ran the same images (on a CPU nothing is synchronised anyway)
    assert 0 < run["sec_per_image_unsynced"] < 3 * run["sec_per_image"]
    n_samples = 20 * classes + 10 if classes > 1 else 10  # method.md §3.5: one class needs no ELBO
    assert run["forward_samples_per_image"] == run["floor_forward_samples_per_image"] == n_samples
    # nothing captured in the floor: the processors a freshly built pipeline has
    pipe, _ = build_pipeline(model, torch.device("cpu"))
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert run["floor_processors"] == sorted({type(p).__name__ for p in denoiser.attn_processors.values()})
    assert not any(name.startswith("Capture") for name in run["floor_processors"])
    by_batch = run["floor_sec_by_batch"]
    assert set(by_batch) == {"3", "16"} and run["floor_sec_per_image"] == min(by_batch.values())
    assert by_batch[str(run["floor_batch"])] == run["floor_sec_per_image"]
    assert run["sec_per_floor"] == pytest.approx(run["sec_per_image"] / run["floor_sec_per_image"])
    flop = run["network_tflop_per_image"] * 1e12
    assert run["floor_tflops"] == pytest.approx(flop / run["floor_sec_per_image"] / 1e12)
    assert run["network_tflops"] == pytest.approx(flop / run["network_sec_per_image"] / 1e12)

    parts = run["breakdown_sec_per_image"]
    assert set(parts) == set(PARTS) | {"unaccounted"} and all(parts[p] >= 0 for p in PARTS)
    accounted = sum(parts[p] for p in PARTS)
    assert abs(run["sec_per_image"] - accounted) <= TOLERANCE * run["sec_per_image"], parts
    # the breakdown's network part and the independent NetworkTimer measure the same calls
    assert parts["network"] == pytest.approx(run["network_sec_per_image"], rel=TOLERANCE)
    assert parts["host_transfers"] == 0.0  # on the CPU nothing crosses to a device
    assert parts["vae_encode"] > 0 and parts["forward_calls"] > 0 and parts["resize"] > 0
    assert (parts["elbo_loop"] > 0) == (classes > 1)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_flops_per_sample_counts_the_attention_products(family):
    """The count with SDPA's math backend minus the count with the fused CPU kernel (which torch's
    counter does not see) is the attention's two matrix products, 2 * 2 * Sq * Sk * inner_dim
    per layer, summed by hand over the layers' shapes; and one sample counts half of two."""
    from torch.utils.flop_counter import FlopCounterMode

    aligner = tiny_aligner(family)
    ad = aligner.adapter
    samples = record_forwards(aligner, bench_image(0, 32), image_classes(0, 2), seed=0)
    x, t, cond = samples
    with torch.no_grad(), FlopCounterMode(display=False) as fused:
        ad.network(x[:1], t[:1], {k: v[:1] for k, v in cond.items()})
    modules = dict(ad.denoiser.named_modules())
    by_hand = 0
    for layer in ad.attention_layers():
        attn, n_img = modules[layer.name], layer.resolution**2
        text = cond["encoder_hidden_states"].shape[1]
        keys = {"self": n_img, "cross": text, "joint": n_img + text}[layer.kind]
        queries = n_img + text if layer.kind == "joint" else n_img
        by_hand += 2 * 2 * queries * keys * attn.inner_dim
    assert flops_per_sample(ad, samples) - fused.get_total_flops() == by_hand
    two = (x[:2], t[:2], {k: v[:2] for k, v in cond.items()})
    assert flops_per_sample(ad, two) == flops_per_sample(ad, samples)  # the first sample only
    with torch.no_grad(), FlopCounterMode(display=False) as pair:
        ad.network(*two)
    assert pair.get_total_flops() == 2 * fused.get_total_flops()


def test_breakdown_charges_each_part_its_own_time_and_changes_nothing(monkeypatch):
    """A 20 ms sleep injected into the schedule's model input lands in `forward_calls` once per
    network call, not in `network`; maps equal those of an uninstrumented run; patches are undone."""
    aligner = tiny_aligner("sd")
    ad = aligner.adapter
    image, classes = bench_image(1, 32), image_classes(1, 2)
    plain = aligner.heatmaps(image, classes, seed=3)
    timer = NetworkTimer(ad, torch.device("cpu"))
    model_input = ad.schedule.model_input
    monkeypatch.setattr(ad.schedule, "model_input", lambda z, t: time.sleep(0.02) or model_input(z, t))
    with Breakdown(aligner, torch.device("cpu")) as bd:
        start = time.perf_counter()
        timed = aligner.heatmaps(image, classes, seed=3)
        wall = time.perf_counter() - start
        x = torch.zeros(1000)
        x.to(torch.float64), x.cpu(), x.tolist()  # dtype change and host-only calls: no transfer
        assert bd.seconds["host_transfers"] == 0.0
        assert x.to("meta").device.type == "meta"  # a copy to another device is one
        assert bd.seconds["host_transfers"] > 0.0
    assert vars(ad).get("predict") is None and "to" not in vars(torch.Tensor)
    assert elbo_t2ialign.core.calibrate.to_image is to_image
    monkeypatch.undo()
    sec = bd.seconds
    assert timer.calls == 7  # 40 ELBO pairs and 10 collection steps at batch 8
    assert sec["forward_calls"] >= 0.02 * timer.calls
    assert sec["network"] == pytest.approx(timer.seconds, rel=TOLERANCE)
    assert sum(sec.values()) - sec["host_transfers"] == pytest.approx(wall, rel=TOLERANCE)
    for c in classes:
        np.testing.assert_array_equal(plain.heatmaps[c], timed.heatmaps[c])
        np.testing.assert_array_equal(plain.baseline_heatmaps[c], timed.baseline_heatmaps[c])


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "expected"),
    [
        ("to", (torch.float64,), {}, False),
        ("to", ("meta",), {}, True),
        ("to", (), {"device": "meta"}, True),
        ("to", ("cpu", torch.float16), {}, False),
        ("to", (torch.zeros(1, device="meta"),), {}, True),
        ("cpu", (), {}, False),
        ("tolist", (), {}, False),
    ],
)
def test_crosses_devices(method, args, kwargs, expected):
    assert crosses_devices(torch.zeros(2), method, args, kwargs) is expected
    assert crosses_devices(torch.zeros(2, device="meta"), "cpu", (), {}) is True


def test_tables_of_a_gpu_log(tmp_path, capsys):
    run = {
        "device_name": "GPU X",
        "model": "sd15",
        "resolution": 512,
        "dtype": "float16",
        "classes": 2,
        "batch_size": 8,
        "sec_per_image": 0.4061,
        "sec_per_image_unsynced": 0.38,
        "peak_mem_mb": 3046.4,
        "overhead_fraction": 0.117,
        "floor_sec_per_image": 0.3,
        "floor_batch": 16,
        "sec_per_floor": 0.4061 / 0.3,
        "network_sec_per_floor": 0.358 / 0.3,
        "network_tflops": 112.14,
        "floor_tflops": 133.8,
        "syncs_per_image": 15,
        "breakdown_sec_per_image": dict.fromkeys(PARTS, 0.001) | {"network": 0.358, "unaccounted": 0.0002},
    }
    log = tmp_path / "bench.jsonl"
    log.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": "sd15-k2", "result": run},
                {
                    "step": "sd15-compare",
                    "result": {"optimized": run, "speedup": 5.381, "max_abs_diff": 2.4e-4},
                },
                {"step": "sd3", "failed": "exit 124 after 125 s"},
                {
                    "step": "sd15-k2-compile",
                    "result": run
                    | {
                        "settings": {
                            "channels_last": True,
                            "compile": "default",
                            "capture_precision": "model",
                        },
                        "max_abs_diff_vs": {"maps": "sd15-k2.npz", "max_abs_diff": 3.25e-3},
                    },
                },
            ]
        )
        + "\n"
    )
    main(["--table", str(log)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (
        "| sd15-k2 | GPU X | sd15 | 512 | float16 | 2 | 8 | 0.406 | 0.380 | 3046 | 0.300 (16) | 1.35 "
        "| 1.19 | 112.1, 133.8 | 0.117 | 15 |  |  |  |"
    )
    assert lines[3].endswith("| 0.117 | 15 | 5.38 (2.4e-04) |  |  |")
    assert lines[4] == "| sd3 | failed: exit 124 after 125 s |"
    assert lines[5].endswith("| 0.117 | 15 |  | channels-last, compile default, capture model | 3.2e-03 |")
    breakdown = lines[-3].split(" | ")
    assert (
        breakdown[0] == "| sd15-k2"
        and breakdown[1:-2] == ["1.0"] * 9
        and breakdown[-2:] == ["358.0", "0.2 |"]
    )
    with pytest.raises(SystemExit, match="no file"):
        main(["--table", str(tmp_path / "missing.jsonl")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_script_stops_at_once_without_cuda():
    script = Path(__file__).parents[1] / "scripts" / "bench_gpu.sh"
    env = dict(os.environ, PYTHON=sys.executable, OUT=tempfile.mkdtemp())
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert os.listdir(env["OUT"]) == []  # stopped before any step or log


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "tiny-sd", "--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err
