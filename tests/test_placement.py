"""Placements (issue 29): offloaded, device-mapped and low-precision pipelines give the single-device
maps, are never moved with `.to()`, and a memory plan that cannot fit is refused before loading.

Everything runs on the CPU: the CPU is the execution device, so offloading moves nothing and the
maps must equal the `device` maps exactly (measured: max |difference| 0.0). Placements that need
GPUs are checked as far as the CPU allows (the diffusers calls made, nothing moved)."""

import gc
import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_pipeline
from PIL import Image

from elbo_t2ialign import Aligner
from elbo_t2ialign.core import memory
from elbo_t2ialign.core import placement as placing
from elbo_t2ialign.core.placement import Placement, PlacementError
from elbo_t2ialign.devtools.tiny import tiny_sd
from elbo_t2ialign.testbed import train

TESTBED = train.DEFAULT_MODEL_DIR
FAST = dict(elbo_timesteps=[101, 501, 901], collect_timesteps=[20, 100])  # a test, not a measurement
CLASSES = ["cat", "dog"]
TOLERANCE = 1e-6  # offloading on the CPU moves nothing: measured 0.0 for every placement here
needs_testbed = pytest.mark.skipif(not (TESTBED / "model_index.json").is_file(), reason="no testbed model")
disk_release = pytest.mark.skipif(
    placing._older(placing.diffusers_version(), placing.NEEDS["disk"][0]),
    reason=f"group offloading to a folder needs diffusers >= {placing.NEEDS['disk'][0]}",
)


def image(size=64):
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def maps(aligner) -> dict[str, np.ndarray]:
    result = aligner.heatmaps(image(), CLASSES, seed=0)
    return {
        **{f"elbo/{k}": v for k, v in result.heatmaps.items()},
        **{f"cross/{k}": v for k, v in result.cross.items()},
    }


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def never_moved(pipe, monkeypatch):
    """Make any `.to()` on the pipeline an error."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"pipe.to{args} called on a placed pipeline")

    monkeypatch.setattr(pipe, "to", refuse)


@pytest.fixture(scope="module")
def tiny_reference():
    return maps(Aligner.from_pipeline(tiny_sd(), device="cpu", **FAST))


@pytest.mark.parametrize(
    "how",
    [
        # the issue's reproduction: diffusers' pipeline-level method (from diffusers 0.36)
        pytest.param(
            "pipeline-group-leaf",
            marks=pytest.mark.skipif(
                placing._older(placing.diffusers_version(), "0.36.0"),
                reason="DiffusionPipeline.enable_group_offload needs diffusers >= 0.36.0",
            ),
        ),
        "group-leaf",
        "group-block",
        "model-offload",
    ],
)
def test_user_offloaded_pipeline_is_taken_as_it_is(how, tiny_reference, monkeypatch, capfd):
    from diffusers.hooks import apply_group_offloading

    pipe = tiny_sd()
    cpu = torch.device("cpu")
    if how == "pipeline-group-leaf":
        pipe.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    elif how.startswith("group"):
        for module in placing.modules(pipe).values():  # per component, as at the floor release
            level = {"offload_type": "leaf_level"} if how == "group-leaf" else {"num_blocks_per_group": 1}
            apply_group_offloading(module, onload_device=cpu, **level)
    else:
        pipe.enable_model_cpu_offload(device="cpu")
    assert placing.is_placed(pipe)
    never_moved(pipe, monkeypatch)
    own = dict(pipe.unet.attn_processors)
    aligner = Aligner.from_pipeline(pipe, **FAST)
    assert aligner.adapter.device == cpu
    assert max_difference(maps(aligner), tiny_reference) <= TOLERANCE
    assert pipe.unet.attn_processors == own  # the capture processors went in on hooked modules and out again
    assert "not supported" not in capfd.readouterr().err  # diffusers' warning on .to() of an offloaded module


def test_sequentially_offloaded_pipeline_is_wrapped_without_moving_it(monkeypatch):
    """GPU placement: its weights wait on the meta device until a hook brings them to the execution
    device. The aligner must take that device from the hooks (pipe.device says meta) and move nothing.
    (Running it with the CPU as execution device fails inside accelerate 1.15 with transformers 5
    for diffusers' own pipeline call too, so the maps are GPU-verified only: docs/performance.md.)"""
    pipe = tiny_sd()
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.device.type == "meta"
    never_moved(pipe, monkeypatch)
    aligner = Aligner.from_pipeline(pipe, **FAST)
    assert aligner.adapter.device == torch.device("cpu")
    assert aligner.adapter.vae_device == torch.device("cpu")
    assert next(pipe.unet.parameters()).device.type == "meta"  # not moved, not cast


def test_accelerate_dispatch_with_a_cpu_and_disk_map(tiny_reference, tmp_path):
    """accelerate's dispatch of the denoiser with part of it offloaded to a disk folder."""
    from accelerate import dispatch_model

    pipe = tiny_sd()
    device_map = {name: "cpu" for name, _ in pipe.unet.named_children()}
    device_map["down_blocks"] = device_map["up_blocks"] = "disk"
    dispatch_model(pipe.unet, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert any(tmp_path.iterdir())  # the disk part really is on disk
    aligner = Aligner.from_pipeline(pipe, **FAST)
    assert max_difference(maps(aligner), tiny_reference) <= TOLERANCE


@needs_testbed
@pytest.mark.parametrize(
    "where",
    [
        Placement("group-offload"),
        Placement("group-offload", offload_type="leaf_level"),
        Placement("model-offload"),
        pytest.param("disk", marks=disk_release),
    ],
    ids=["group-block", "group-leaf", "model-offload", "group-disk"],
)
def test_from_pretrained_placements_give_the_device_maps(where, tmp_path, testbed_reference):
    if where == "disk":
        where = Placement("group-offload", offload_folder=str(tmp_path / "offload"))
    aligner = Aligner.from_pretrained(str(TESTBED), device="cpu", placement=where, **FAST)
    assert placing.is_placed(aligner.adapter.pipe)
    assert max_difference(maps(aligner), testbed_reference) <= TOLERANCE
    if where.offload_folder:
        (own,) = (tmp_path / "offload").iterdir()  # this load's own folder: never another load's files
        assert sorted(p.name for p in own.iterdir()) == ["text_encoder", "unet", "vae"]
        assert list((own / "unet").glob("*.safetensors"))
        del aligner
        gc.collect()
        assert not own.exists()  # removed with the pipeline


@pytest.fixture(scope="module")
def testbed_reference():
    return maps(Aligner.from_pretrained(str(TESTBED), device="cpu", **FAST))


@needs_testbed
def test_float8_storage_changes_the_maps_by_a_measured_amount(testbed_reference):
    """float8_e4m3fn storage of the denoiser, float32 compute: weights really stored in 1 byte, and
    the maps move by a small amount (measured on this model: docs/performance.md)."""
    aligner = Aligner.from_pretrained(
        str(TESTBED), device="cpu", placement=Placement(storage_dtype="float8_e4m3fn"), **FAST
    )
    weights = list(aligner.adapter.pipe.unet.parameters())
    in_float8 = sum(p.numel() for p in weights if p.dtype == torch.float8_e4m3fn)
    assert in_float8 / sum(p.numel() for p in weights) > 0.99  # diffusers keeps norms / conv_in in float32
    difference = max_difference(maps(aligner), testbed_reference)
    assert 0.0 < difference < 0.15, difference  # measured 0.075 (mean 0.005-0.015)


def test_balanced_loads_with_a_device_map_and_is_not_moved(monkeypatch):
    """GPU placement: diffusers gets device_map="balanced" (and max_memory in accelerate's form) at
    load time; the pipeline it returns carries a device map and is never moved afterwards."""
    from diffusers import DiffusionPipeline

    seen = {}
    pipe = tiny_sd()

    def fake_load(source, **kwargs):
        seen.update(kwargs)
        pipe.hf_device_map = {"unet": 0, "text_encoder": 1, "vae": 1}  # what diffusers records
        return pipe

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(fake_load))
    never_moved(pipe, monkeypatch)
    where = Placement("balanced", max_memory={0: "20GB", "cpu": "64GB"})
    Aligner.from_pretrained("some/model", device="cpu", placement=where, **FAST)
    assert seen["device_map"] == "balanced"
    assert seen["max_memory"] == {0: 20 * 10**9, "cpu": 64 * 10**9}


@pytest.mark.parametrize("kind", ["model-offload", "sequential-offload"])
def test_offload_placements_call_diffusers_with_the_execution_device(kind, monkeypatch, tmp_path):
    pipe = tiny_sd()
    calls = []
    method = {
        "model-offload": "enable_model_cpu_offload",
        "sequential-offload": "enable_sequential_cpu_offload",
    }[kind]
    original = getattr(pipe, method)
    monkeypatch.setattr(pipe, method, lambda **kw: calls.append(kw) or original(**kw))
    from elbo_t2ialign.core.adapters import place_pipeline

    place_pipeline(pipe, Placement(kind), torch.device("cpu"), torch.float32)
    assert calls == [{"device": torch.device("cpu")}]
    never_moved(pipe, monkeypatch)
    aligner = Aligner.from_pipeline(pipe, **FAST)
    assert aligner.adapter.device == torch.device("cpu")


def test_release_a_placement_needs_is_named(monkeypatch):
    monkeypatch.setattr(placing, "diffusers_version", lambda: "0.33.1")
    with pytest.raises(PlacementError, match=r"needs diffusers >= 0\.35\.0; this environment has 0\.33\.1"):
        placing.group_offload(tiny_sd(), torch.device("cpu"), "block_level", "some/folder")
    with pytest.raises(PlacementError, match=r"needs diffusers >= 0\.34\.0"):
        placing.quantization_config({"backend": "torchao"}, torch.float32)


def test_missing_quantization_package_says_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(placing, "diffusers_version", lambda: "0.42.1")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(
        PlacementError, match=r'needs the bitsandbytes package.*pip install -e "\.\[bitsandbytes\]"'
    ):
        placing.quantization_config({"backend": "bitsandbytes_4bit", "components": ["unet"]}, torch.float16)


def test_bad_placement_settings_are_one_line():
    for bad, words in [
        ({"placement": "cloud"}, "model.placement must be one of"),
        (
            {"placement": "device", "offload_folder": "x"},
            "model.offload_folder is used by placement group-offload",
        ),
        ({"storage_dtype": "int3"}, "model.storage_dtype must be null or one of"),
        ({"max_memory": {"gpu0": "1GB"}}, "is not a device"),
        ({"max_memory": "lots"}, "not a memory size"),
        ({"quantization": {"backend": "gguf"}}, "model.quantization.backend must be one of"),
    ]:
        with pytest.raises(PlacementError, match=words) as info:
            Placement.from_mapping(bad)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------ the memory plan
@needs_testbed
def test_sizes_from_safetensors_headers_equal_the_loaded_modules():
    """Counted from the headers (nothing loaded) = the elements of the loaded modules."""
    from diffusers import DiffusionPipeline

    sizes = memory.sizes_from_folder(TESTBED)
    pipe = DiffusionPipeline.from_pretrained(str(TESTBED), safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        state = module.state_dict()
        floats = sum(t.numel() for t in state.values() if t.is_floating_point())
        assert sizes[name].floats == floats, name
        assert sizes[name].largest_tensor == max(t.numel() for t in state.values())
    assert set(sizes) == {"unet", "vae", "text_encoder"}


def hand_sizes():
    """Three components whose bytes are easy to add by hand."""
    unet = memory.ComponentSize("unet", floats=1000, largest_block=300, largest_tensor=100)
    text = memory.ComponentSize(
        "text_encoder", floats=500, other_bytes=8, largest_block=200, largest_tensor=50
    )
    vae = memory.ComponentSize("vae", floats=200, largest_block=100, largest_tensor=20)
    return {"unet": unet, "text_encoder": text, "vae": vae}


def test_plan_peaks_by_hand():
    cuda, half = torch.device("cuda:0"), torch.float16  # a plan needs no GPU: devices are names here
    budgets = {"cuda:0": 10**6, "cpu": 10**6}
    # float16 networks, float32 VAE: 1000*2 + (500*2 + 8) + 200*4 = 3808 bytes
    device = memory.make_plan(hand_sizes(), Placement(), cuda, half, 100, budgets)
    assert device.peaks == {"cuda:0": 3808 + 100}
    offload = memory.make_plan(hand_sizes(), Placement("model-offload"), cuda, half, 100, budgets)
    assert offload.peaks == {"cuda:0": 2000 + 100, "cpu": 3808}  # the largest component on the GPU
    block = memory.make_plan(hand_sizes(), Placement("group-offload"), cuda, half, 100, budgets)
    assert block.peaks == {"cuda:0": 600 + 100, "cpu": 3808}  # unet's largest block, 300 * 2
    disk = memory.make_plan(
        hand_sizes(),
        Placement("group-offload", offload_type="leaf_level", offload_folder="f"),
        cuda,
        half,
        100,
        budgets,
    )
    assert disk.peaks == {"cuda:0": 200 + 100, "cpu": 200}  # unet's largest tensor, 100 * 2
    fp8 = memory.make_plan(hand_sizes(), Placement(storage_dtype="float8_e4m3fn"), cuda, half, 0, budgets)
    assert fp8.peaks == {"cuda:0": 1000 + 1008 + 800}
    on_cpu = memory.make_plan(
        hand_sizes(), Placement("group-offload", offload_folder="f"), torch.device("cpu"), half, 5, budgets
    )
    assert on_cpu.peaks == {"cpu": 600 + 5}


def test_a_plan_that_cannot_fit_is_refused_naming_one_that_would():
    cuda, half = torch.device("cuda:0"), torch.float16
    budgets = {"cuda:0": 3000, "cpu": 10**6}
    with pytest.raises(
        PlacementError, match=r"placement device does not fit .*model\.placement=model-offload would fit"
    ):
        memory.check(hand_sizes(), Placement(), cuda, half, 100, budgets)
    chosen, plan = memory.check(hand_sizes(), Placement("auto"), cuda, half, 100, budgets)
    assert chosen.kind == "model-offload" and "least-offloaded" in chosen.reason
    assert plan.peaks["cuda:0"] == 2100
    # float16 fits nowhere (the CPU must hold 3808 bytes), float8 storage of the unet does (2808),
    # with the largest component, the float8 unet of 1000 bytes, on the GPU: the hint names both
    with pytest.raises(
        PlacementError, match=r"model\.placement=model-offload model\.storage_dtype=float8_e4m3fn would fit"
    ):
        memory.check(hand_sizes(), Placement(), cuda, half, 100, {"cuda:0": 1200, "cpu": 3000})


@needs_testbed
@disk_release
def test_plan_is_logged_auto_offloads_to_disk_and_max_memory_refuses_before_loading(
    monkeypatch, caplog, tmp_path
):
    """A cap between the disk offload's and the single device's estimated peak: auto chooses the
    disk, `device` is refused before anything is loaded, naming the setting that fits."""
    import logging

    from diffusers import DiffusionPipeline

    sizes = memory.sizes_from_folder(TESTBED)
    den, vae = memory._configs_from_folder(TESTBED)
    act = memory.activation_bytes(den, vae, 1, None)
    cpu, f32 = torch.device("cpu"), torch.float32
    budgets = {"cpu": 10**12}
    disk = Placement("group-offload", offload_folder=str(tmp_path / "off"))
    low = memory.make_plan(sizes, disk, cpu, f32, act, budgets).peaks["cpu"]
    high = memory.make_plan(sizes, Placement(), cpu, f32, act, budgets).peaks["cpu"]
    assert low < high
    cap = (low + high) // 2
    with caplog.at_level(logging.INFO, logger="elbo_t2ialign.core.memory"):
        aligner = Aligner.from_pretrained(
            str(TESTBED), device="cpu", placement=disk.but(kind="auto", max_memory=cap), batch_size=1, **FAST
        )
    assert "memory plan: placement group-offload (block_level, to" in caplog.text
    assert "auto: chose group-offload" in caplog.text and "unet" in caplog.text
    assert placing.is_placed(aligner.adapter.pipe)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(lambda *a, **k: 1 / 0))
    with pytest.raises(PlacementError, match=r"placement device does not fit \(cpu: .*would fit"):
        Aligner.from_pretrained(
            str(TESTBED), device="cpu", placement=Placement(max_memory=cap), batch_size=1, **FAST
        )


def test_placement_keys_change_no_run_fingerprint():
    from elbo_t2ialign.segmentation.config import result_fingerprint

    base = {"model": {"name": "m", "id": "x", "dtype": "auto"}, "dataset": {"name": "d"}, "elbo": {}}
    placed = json.loads(json.dumps(base))
    placed["model"].update(
        placement="group-offload", offload_folder="/tmp/x", max_memory="1GB", storage_dtype=None
    )
    assert result_fingerprint(base) == result_fingerprint(placed)
    placed["model"]["storage_dtype"] = "float8_e4m3fn"
    assert result_fingerprint(base) != result_fingerprint(placed)


# ------------------------------------------------------------------ through the runners
def _pixels(folder) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(folder)): np.asarray(Image.open(p), dtype=np.float64)
        for p in sorted(folder.rglob("*.png"))
    }


@disk_release
def test_generate_with_group_offload_to_disk_makes_the_device_images(tmp_path):
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.cli import config_dir, to_container
    from elbo_t2ialign.generation.runner import run

    def generate(out, *extra):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            overrides = ["model.id=tiny:sd", "model.name=tiny_sd", "prompts=demo", "steps=2", "num_prompts=1"]
            cfg = to_container(
                compose("generate", overrides=[*overrides, "progress=false", f"output_dir={out}", *extra])
            )
        run(cfg)
        return _pixels(out / "images")

    device = generate(tmp_path / "device")
    offloaded = generate(
        tmp_path / "offloaded",
        "model.placement=group-offload",
        "model.offload_type=leaf_level",
        f"model.offload_folder={tmp_path / 'weights'}",
    )
    assert device.keys() == offloaded.keys() and len(device) == 2
    assert max(float(np.abs(device[k] - offloaded[k]).max()) for k in device) == 0.0  # measured: identical
    gc.collect()
    assert (tmp_path / "weights").is_dir() and not list((tmp_path / "weights").rglob("*.safetensors"))
    log = (tmp_path / "offloaded" / "generate.log").read_text()
    assert "memory plan: placement group-offload (leaf_level, to" in log


@needs_testbed
@disk_release
def test_segment_with_group_offload_to_disk_writes_the_device_maps(tmp_path):
    from hydra import compose, initialize_config_dir

    from elbo_t2ialign.cli import hydra_config_dir, to_container
    from elbo_t2ialign.segmentation import run
    from elbo_t2ialign.testbed import world

    world.ensure_dataset(tmp_path / "datasets" / "shapes")

    def segment(out, *extra):
        overrides = [
            "model=shapes",
            "dataset=shapes",
            "elbo=shapes",
            "device=cpu",
            "num_images=2",
            "progress=false",
            f"datasets_dir={tmp_path / 'datasets'}",
            f"output_dir={out}",
            "elbo.elbo_timesteps=[101,501,901]",
            *extra,
        ]
        with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
            run(to_container(compose("segment", overrides=overrides)))
        return _pixels(out / "maps")

    device = segment(tmp_path / "device")
    offloaded = segment(
        tmp_path / "offloaded", "model.placement=group-offload", f"model.offload_folder={tmp_path / 'w'}"
    )
    assert device.keys() == offloaded.keys() and len(device) >= 4
    assert max(float(np.abs(device[k] - offloaded[k]).max()) for k in device) == 0.0  # measured: identical
    assert (
        "memory plan: placement group-offload (block_level, to"
        in (tmp_path / "offloaded" / "segment.log").read_text()
    )


@disk_release
def test_bench_placement_reports_it_and_keeps_the_maps(tmp_path):
    from elbo_t2ialign.devtools.bench import main

    plain = main(["--model", "tiny-sd", "--no-floor", "--maps-out", str(tmp_path / "device.npz")])
    disk = main(
        [
            "--model",
            "tiny-sd",
            "--no-floor",
            "--placement",
            "group-offload",
            "--offload-folder",
            str(tmp_path / "off"),
            "--maps-against",
            str(tmp_path / "device.npz"),
        ]
    )
    assert plain["placement"] == "device"
    assert disk["placement"].startswith("group-offload (block_level, to ")
    assert disk["max_abs_diff_vs"]["max_abs_diff"] == 0.0
    gc.collect()
    assert (tmp_path / "off").is_dir() and not list((tmp_path / "off").rglob("*.safetensors"))


def test_recorder_sums_live_on_the_stated_device():
    """Maps from a layer on another device are moved to the recorder's device before they are summed
    (meta stands in for a second device; the sums' values are checked on the CPU recorder)."""
    from elbo_t2ialign.core.capture import AttentionRecorder, LayerInfo

    layer = LayerInfo("a", "cross", 0, 2, "down")
    maps = {"cross": torch.arange(8, dtype=torch.float32).reshape(4, 2)}
    on_cpu = AttentionRecorder(torch.nn.Linear(1, 1), [layer], {"cross": {"a": 2.0}}, None, device="cpu")
    on_meta = AttentionRecorder(torch.nn.Linear(1, 1), [layer], {"cross": {"a": 2.0}}, None, device="meta")
    for recorder in (on_cpu, on_meta):
        recorder.add(layer, maps, batch=1)
        recorder.add(layer, maps, batch=1)
    assert on_meta.sums["cross"].device.type == "meta"
    assert torch.equal(on_cpu.sums["cross"], 4.0 * maps["cross"])  # weight 2, added twice


def test_every_model_config_names_the_placement_keys_with_defaults():
    import yaml

    configs = sorted((TESTBED.parents[2] / "configs" / "model").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        assert set(placing.MODEL_KEYS) <= set(cfg), path.name  # overridable from the command line
        assert Placement.from_mapping(cfg) == Placement(), path.name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_a_memory_plan_from_its_modules(family):
    """The plan reads every family's denoiser and VAE configs (patch sizes given as pairs, per-block
    widths) and counts each component's weights as the modules hold them."""
    pipe = tiny_pipeline(family)
    where = memory.plan_and_check(
        f"tiny:{family}", Placement.of("device"), torch.device("cpu"), torch.float32, 2, 32, pipe=pipe
    )
    assert where.kind == "device"
    sizes = memory.sizes_from_pipeline(pipe)
    for name, module in placing.modules(pipe).items():
        tensors = [*module.parameters(), *module.buffers()]
        assert sizes[name].floats == sum(t.numel() for t in tensors if t.is_floating_point()), name
        other = sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point())
        assert sizes[name].other_bytes == other, name
