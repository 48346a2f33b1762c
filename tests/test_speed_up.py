"""How the denoiser runs. `ModelAdapter.speed_up`: the opt-in execution settings keep the maps, and a
compiled denoiser runs exactly the forwards made outside attention capture (the ELBO forwards), never
the captured ones. And nothing is copied from the host to the device in every network call (each
such copy waits for all queued device work): the meta device stands in for a GPU."""

import numpy as np
import pytest
import torch

from elbo_t2ialign import Aligner
from elbo_t2ialign.core.adapters.schedules import EDMSchedule, schedule_from_scheduler
from elbo_t2ialign.devtools.bench import bench_image, main, sharpen_attention
from elbo_t2ialign.devtools.bench_profile import SYNC_WARNING, count_syncs, crosses_devices
from elbo_t2ialign.devtools.tiny import BUILDERS

# 2 classes x 3 ELBO timesteps = 6 pairs: network calls of 4 and 2 samples; 2 collection timesteps
OPTS = {"elbo_timesteps": [100, 400, 700], "collect_timesteps": [20, 60], "batch_size": 4}
CLASSES = ["cat", "dog"]


def fresh_aligner(family: str) -> Aligner:
    """Its own pipeline (speed_up changes the denoiser, so the tests' shared cached pipelines stay
    out), attention sharpened as in the bench: with the near-uniform attention of random weights the
    min-max normalisations and the refinement amplify float rounding into 1e-3 map differences."""
    pipe = BUILDERS[family]()
    sharpen_attention(pipe.unet if hasattr(pipe, "unet") else pipe.transformer, 8.0)
    return Aligner.from_pipeline(pipe, device="cpu", resolution=32, max_sequence_length=16, **OPTS)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts compilations and runs."""

    def __init__(self):
        self.compiles, self.runs = 0, 0

    def __call__(self, graph, example_inputs):
        self.compiles += 1

        def run(*args):
            self.runs += 1
            return graph.forward(*args)

        return run


def maps_of(result) -> dict[str, np.ndarray]:
    return {
        f"{kind}/{n}": getattr(result, kind)[n] for kind in ("heatmaps", "baseline_heatmaps") for n in CLASSES
    }


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_compiled_denoiser_runs_the_elbo_forwards_only(family):
    torch._dynamo.reset()
    aligner = fresh_aligner(family)
    image = bench_image(0, 32)
    plain = aligner.heatmaps(image, CLASSES, seed=3)

    backend = CountingBackend()
    aligner.adapter.speed_up(compile_mode="default", compile_backend=backend)
    compiled = aligner.heatmaps(image, CLASSES, seed=3)
    # the ELBO calls (4 + 2 samples) went through the compiled module, one graph per batch size; the
    # collection call (under the recorder) did not: it would have been a third run and compilation
    assert (backend.compiles, backend.runs) == (2, 2)
    assert aligner.adapter._capturing == 0
    for key, m in maps_of(plain).items():
        np.testing.assert_allclose(maps_of(compiled)[key], m, atol=1e-6, err_msg=key)
    for n in CLASSES:
        assert compiled.losses[n] == pytest.approx(plain.losses[n], rel=1e-6)

    # another image: the recorder put the original processors back, so nothing is recompiled
    aligner.heatmaps(bench_image(1, 32), ["bird", "car"], seed=4)
    assert (backend.compiles, backend.runs) == (2, 4)


def test_a_failing_captured_pass_gives_the_compiled_module_back():
    adapter = fresh_aligner("sd").adapter
    adapter.speed_up(compile_mode="default", compile_backend=CountingBackend())
    assert adapter.net is adapter._compiled
    with pytest.raises(RuntimeError, match="boom"), adapter.recorder({"cross": {}}):
        assert adapter.net is adapter.denoiser
        raise RuntimeError("boom")
    assert adapter.net is adapter._compiled and adapter._capturing == 0


def test_channels_last_keeps_the_maps():
    aligner = fresh_aligner("sd")
    image = bench_image(2, 32)
    plain = aligner.heatmaps(image, CLASSES, seed=5)
    aligner.adapter.speed_up(channels_last=True)
    convs = [m.weight for m in aligner.adapter.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # the layout really changed
    after = aligner.heatmaps(image, CLASSES, seed=5)
    for n in CLASSES:  # the attention itself differs by float rounding only
        np.testing.assert_allclose(after.cross[n], plain.cross[n], atol=1e-5, err_msg=n)
    for key, m in maps_of(plain).items():  # refined and min-max normalised: 7e-5 measured
        np.testing.assert_allclose(maps_of(after)[key], m, atol=3e-4, err_msg=key)


def test_unknown_compile_mode_is_refused():
    adapter = fresh_aligner("sd").adapter
    with pytest.raises(ValueError, match="compile_mode must be one of .*'default'.*got 'fast'"):
        adapter.speed_up(compile_mode="fast")
    assert adapter._compiled is None


def test_bench_reports_the_settings_and_the_difference_to_a_plain_run(tmp_path):
    torch._dynamo.reset()
    plain = tmp_path / "plain.npz"
    common = ["--model", "tiny-sd", "--classes", "2", "--images", "2", "--floor-batches", "8"]
    base = main([*common, "--maps-out", str(plain)])
    assert base["settings"] == {"channels_last": False, "compile": None, "capture_precision": "float32"}
    fast = main(
        [*common, "--channels-last", "--compile", "default", "--compile-backend", "eager"]
        + ["--maps-against", str(plain), "--maps-out", str(tmp_path / "fast.npz")]
    )
    assert fast["settings"] == {"channels_last": True, "compile": "default", "capture_precision": "float32"}
    with np.load(plain) as a, np.load(tmp_path / "fast.npz") as b:  # the reported figure, by hand
        assert len(a.files) == 8 and sorted(a.files) == sorted(b.files)
        by_hand = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    assert fast["max_abs_diff_vs"]["max_abs_diff"] == by_hand
    assert by_hand < 1e-3  # channels-last rounding through the normalisations (2.7e-4 measured)
    assert fast["floor_sec_per_image"] > 0 and fast["floor_forward_samples_per_image"] == 50


def test_bench_refuses_compile_in_the_reference_mode(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "tiny-sd", "--compare", "--compile", "default"])
    assert "--compile applies to the optimized mode only" in capsys.readouterr().err


@pytest.fixture
def crossings(monkeypatch):
    """Shapes of the tensors that `Tensor.to` moves to another device type while the test runs."""
    moved, to = [], torch.Tensor.to

    def counted(tensor, *args, **kwargs):
        if crosses_devices(tensor, "to", args, kwargs):
            moved.append(tuple(tensor.shape))
        return to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted)
    return moved


def schedules():
    from diffusers import DDPMScheduler, EDMDPMSolverMultistepScheduler

    return {
        "epsilon": schedule_from_scheduler(BUILDERS["sd"]().scheduler),
        "v_prediction": schedule_from_scheduler(DDPMScheduler(prediction_type="v_prediction")),
        "flow": schedule_from_scheduler(BUILDERS["sd3"]().scheduler, image_seq_len=64, timestep_scale=1.0),
        "edm": EDMSchedule(EDMDPMSolverMultistepScheduler()),
    }


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow", "edm"])
def test_schedules_copy_their_table_to_the_device_once(kind, crossings):
    schedule = schedules()[kind]
    z0, eps, pred = (torch.zeros(2, 4, 8, 8, device="meta") for _ in range(3))
    for _ in range(3):  # three network calls' worth of schedule maths
        t = torch.tensor([10, 500], device="meta")
        schedule.add_noise(z0, eps, t)
        schedule.model_input(z0, t)
        schedule.model_timestep(t)
        schedule.target(z0, eps, t)
        schedule.to_target(pred, z0, t)
    assert crossings == [(1000,)]  # the per-timestep table, once


def test_flux_position_ids_are_made_once_per_shape_and_device(crossings):
    adapter = fresh_aligner("flux").adapter
    like = torch.zeros(1, device="meta", dtype=torch.float16)
    first = adapter._position_ids(8, 6, 16, like)
    assert adapter._position_ids(8, 6, 16, like) is first
    assert crossings == [(16, 3), (12, 3)]  # text ids, image ids: on the first call only
    text, grid = adapter._position_ids(8, 6, 16, torch.zeros(1))  # host copy, to read the values
    assert text.shape == (16, 3) and not text.any()
    # token k of the packed (8/2 x 6/2) grid sits at row k // 3, column k % 3
    assert grid.tolist() == [[0.0, k // 3, k % 3] for k in range(12)]


def test_count_syncs_counts_the_sync_warnings_and_puts_the_mode_back(monkeypatch):
    """torch's sync debug mode needs CUDA; stand-ins for its two functions check the counting: the
    mode is "warn" while `run` runs, only the sync warnings count, the old mode comes back after an
    error too. Off CUDA nothing is counted."""
    import warnings

    modes = [0]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def run():
        assert modes[-1] == "warn"
        for _ in range(5):
            warnings.warn(SYNC_WARNING, UserWarning, stacklevel=1)  # the same line each time: all count
        warnings.warn("something else", UserWarning, stacklevel=1)

    assert count_syncs(run, "cuda") == 5 and modes == [0, "warn", 0]
    with pytest.raises(ZeroDivisionError):
        count_syncs(lambda: 1 / 0, torch.device("cuda:0"))
    assert modes[-1] == 0
    assert count_syncs(run, "cpu") is None and modes[-1] == 0
