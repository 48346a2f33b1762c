"""Throughput benchmark of the per-image segmentation path (`Aligner.heatmaps`).

Builds a random-weight pipeline with a real model's published architecture
(configs in `bench_configs/`, no weights, no network), runs N images of K
classes and prints one JSON line.

    python -m elbo_t2ialign.devtools.bench --model sd15 --resolution 256 --classes 2 --compare
    python -m elbo_t2ialign.devtools.bench --model sdxl --resolution 1024 --device cuda --dtype float16
    python -m elbo_t2ialign.devtools.bench --model tiny-sd --images 4 --processes 2

Modes:
- `optimized`: the project's path (batched forwards, capture only on weighted
  layers, running float32 sums, SDPA elsewhere);
- `reference`: the way the reference implementation runs: one network call
  per (class, timestep) pair and per collection step at batch 1, explicit
  softmax in every attention layer, every map of every step kept until the
  end. Same noise, same prompts: its heatmaps must equal the optimized ones.

`--compare` and `--processes` run every measurement in its own subprocess so
that one run's peak memory cannot hide another's.

Every run breaks its time down (VAE encode, prompts, noise, forward calls, loops,
aggregation, resize, host transfers, network); an optimized run then measures the
floor: its own network samples replayed without capture at `--floor-batches`
(see `bench_profile.py`). `--unsynced` times the images once more with no timer
synchronising the device. `--table FILE` prints the tables of a
`scripts/bench_gpu.sh` log.

Execution settings, each measured against a plain run of the same images (`--maps-out` there,
`--maps-against` here: the largest map difference): `--channels-last`, `--compile MODE`
(`ModelAdapter.speed_up`) and `--capture-precision model`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from elbo_t2ialign.core import placement as placing
from elbo_t2ialign.core.adapters import adapter_for, place_pipeline, resolve_dtype
from elbo_t2ialign.core.adapters.base import ModelAdapter
from elbo_t2ialign.core.aligner import Aligner
from elbo_t2ialign.core.capture import AttentionRecorder
from elbo_t2ialign.core.options import AlignOptions
from elbo_t2ialign.devtools.bench_profile import (
    PARTS,
    Breakdown,
    Floor,
    count_syncs,
    device_sync,
    flops_per_sample,
    format_tables,
    record_forwards,
)
from elbo_t2ialign.tiny.models import WORDS

CONFIG_DIR = Path(__file__).with_name("bench_configs")
FULL_MODELS = ("sd15", "sdxl", "sd3")
TINY_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-sd3")
CLASS_POOL = ["cat", "dog", "bird", "car", "person", "plant", "sofa", "table"]
EXPLICIT_MB = 1e12  # chunk bound so large that every captured layer runs one full softmax
ATTENTION_SHARPNESS = 16.0  # query scale of the random-weight benchmark models, see sharpen_attention
T5_NOTE = (
    "text_encoder_3=None: the SD3 pipeline feeds zeros for the T5 tokens (same sequence length and cost)"
)


# ------------------------------------------------------------------ models


def build_pipeline(model: str, device: torch.device, t5: bool = False) -> tuple[Any, list[str]]:
    """A random-weight pipeline with `model`'s architecture, built on `device` (float32)."""
    if model in TINY_MODELS:
        from elbo_t2ialign.tiny.models import BUILDERS

        pipe = BUILDERS[model.removeprefix("tiny-")]()
        sharpen_attention(pipe.unet if hasattr(pipe, "unet") else pipe.transformer, ATTENTION_SHARPNESS / 2)
        return pipe, []
    if model not in FULL_MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {FULL_MODELS + TINY_MODELS}")
    import diffusers

    from elbo_t2ialign.tiny.tokenizers import build_clip_tokenizer, build_word_tokenizer

    spec = json.loads((CONFIG_DIR / f"{model}.json").read_text())
    notes, parts = [], {}
    torch.manual_seed(0)
    # parameters are created and initialised directly on the device: random init of
    # billions of parameters is seconds on a GPU and minutes on a CPU
    with torch.device(device):
        for name in ("unet", "transformer"):
            if name in spec:
                cls = diffusers.UNet2DConditionModel if name == "unet" else diffusers.SD3Transformer2DModel
                parts[name] = cls.from_config(spec[name])
        parts["vae"] = diffusers.AutoencoderKL.from_config(spec["vae"])
        for i, name in enumerate(("text_encoder", "text_encoder_2")):
            if name in spec:
                tok = build_clip_tokenizer(WORDS)
                parts[name] = _text_model(spec[name], tok)
                parts["tokenizer" if i == 0 else "tokenizer_2"] = tok
        if "text_encoder_3" in spec:
            if t5:
                tok = build_word_tokenizer(WORDS, model_max_length=256)
                parts["text_encoder_3"], parts["tokenizer_3"] = _text_model(spec["text_encoder_3"], tok), tok
            else:
                parts["text_encoder_3"], parts["tokenizer_3"] = None, None
                notes.append(T5_NOTE)
    sharpen_attention(parts.get("unet") or parts["transformer"])
    sched = dict(spec["scheduler"])
    parts["scheduler"] = getattr(diffusers, sched.pop("class")).from_config(sched)
    pipe_cls = getattr(diffusers, spec["pipeline"])
    if pipe_cls is diffusers.StableDiffusionPipeline:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe_cls(**parts), notes


def sharpen_attention(denoiser: torch.nn.Module, factor: float = ATTENTION_SHARPNESS) -> None:
    """Scale every query projection so attention logits spread like a trained model's (std ~5).

    Default random init gives logits of standard deviation ~0.3: nearly uniform attention,
    for which the method's min-max normalisations amplify float rounding ~10^4 times and a
    parity check between two correct paths checks nothing. Speed is unaffected.
    """
    with torch.no_grad():
        for module in denoiser.modules():
            for name in ("to_q", "add_q_proj"):
                proj = getattr(module, name, None)
                if isinstance(proj, torch.nn.Linear):
                    proj.weight.mul_(factor)


def _text_model(cfg: dict[str, Any], tokenizer) -> torch.nn.Module:
    """A transformers text encoder from a config dict; special-token ids follow the offline tokenizer
    (its ids are all below the published vocab_size, so the embedding table keeps its real size)."""
    import transformers

    cfg = dict(cfg)
    cls = getattr(transformers, cfg.pop("class"))
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if cls.__name__.startswith("CLIP"):
        ids["bos_token_id"] = tokenizer.bos_token_id
        config = transformers.CLIPTextConfig(**cfg, **ids)
    else:
        config = transformers.T5Config(**cfg, **ids, decoder_start_token_id=tokenizer.pad_token_id)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} ids but the model's vocab_size is {config.vocab_size}"
        )
    return cls(config).eval()


# --------------------------------------------------------- reference mode


class KeepAllRecorder(AttentionRecorder):
    """Reference-style capture: every layer computes an explicit full softmax; with `keep`,
    every map of every step is stored and only summed by `aggregate()` at the end."""

    def __init__(self, adapter, weights: dict[str, dict[str, float]], keep: bool):
        super().__init__(
            adapter.denoiser,
            adapter.attention_layers(),
            weights,
            adapter.capture_processor,
            chunk_mb=EXPLICIT_MB,
            text_length=adapter.text_length,
        )
        self.keep = keep
        self.kept: list[tuple[Any, dict[str, torch.Tensor], int]] = []

    @property
    def captured(self) -> list[str]:
        return list(self.layers)

    def add(self, layer, maps, batch) -> None:
        if self.keep:
            self.kept.append((layer, maps, batch))

    def aggregate(self) -> None:
        for layer, maps, batch in self.kept:
            super().add(layer, maps, batch)


class ReferenceAligner(Aligner):
    """Aligner whose network work is done one sample at a time, reference-style."""

    def _elbo_losses(self, z0, conds, timesteps, noise, batch=1) -> list[float]:
        ad, losses = self.adapter, []
        with KeepAllRecorder(ad, {}, keep=False):
            for cond in conds:
                total = 0.0
                for j, t in enumerate(timesteps):
                    tt = torch.tensor([t], device=ad.device)
                    eps = noise[j : j + 1].to(ad.device)
                    pred = ad.predict(ad.schedule.add_noise(z0, eps, tt), tt, cond)
                    total += float(((ad.schedule.target(z0, eps, tt) - pred) ** 2).mean())
                losses.append(total)
        return losses

    def _collect(self, z0, prompts, noise, opts, weights, per_layer=False, check_length=True):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != 1 or per_layer:
            raise ValueError("reference mode collects one prompt; give classes that fit the context")
        ad = self.adapter
        cond = ad.encode_prompt(prompts[0], check_length=check_length)
        rec = KeepAllRecorder(ad, weights, keep=True)
        with rec:
            for j, t in enumerate(opts.collect_timesteps):
                tt = torch.tensor([t], device=ad.device)
                ad.predict(ad.schedule.add_noise(z0, noise[j : j + 1].to(ad.device), tt), tt, cond)
        rec.aggregate()
        return rec


# ------------------------------------------------------------ measurement


class NetworkTimer:
    """Wraps the adapter's network call: seconds inside it, calls and samples."""

    def __init__(self, adapter, device: torch.device):
        self.seconds, self.calls, self.samples = 0.0, 0, 0
        self.enabled = True  # False: calls go straight through, untimed and unsynchronised
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        inner = adapter._forward

        def timed(x, timestep, cond):
            if not self.enabled:
                return inner(x, timestep, cond)
            self._sync()
            start = time.perf_counter()
            out = inner(x, timestep, cond)
            self._sync()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.samples += x.shape[0]
            return out

        adapter._forward = timed

    def reset(self) -> None:
        self.seconds, self.calls, self.samples = 0.0, 0, 0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_image(index: int, resolution: int) -> Image.Image:
    """A smooth random RGB image: upsampled noise, so the VAE sees structure rather than static."""
    rng = np.random.RandomState(index)
    small = Image.fromarray((rng.rand(8, 8, 3) * 255).astype(np.uint8))
    return small.resize((resolution, resolution), Image.BILINEAR)


def image_classes(index: int, k: int) -> list[str]:
    """K class names per image, rotating through the pool so prompts change from image to image."""
    if not 1 <= k <= len(CLASS_POOL):
        raise ValueError(f"--classes must be between 1 and {len(CLASS_POOL)}, got {k}")
    return [CLASS_POOL[(index * k + j) % len(CLASS_POOL)] for j in range(k)]


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run this process's share of the images in one mode, return the fields."""
    from elbo_t2ialign.runfolder import parse_shard

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # sharp random attention underflows to subnormal floats, which CPUs process ~100x slower
    # (and which would slow the explicit-softmax reference mode most); flush them to zero
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    where = placing.Placement(
        args.placement, offload_type=args.offload_type, offload_folder=args.offload_folder
    )
    offloads = where.kind not in ("device", "balanced")
    # offloading placements start from weights in CPU memory, as a loaded pipeline does
    pipe, notes = build_pipeline(args.model, torch.device("cpu") if offloads else device, t5=args.t5)
    resolution = args.resolution if args.model not in TINY_MODELS else 32
    max_seq = 16 if args.model in TINY_MODELS else None
    if where != placing.Placement():
        place_pipeline(pipe, where, device, dtype)
    adapter = adapter_for(pipe, device, dtype, resolution, max_seq)
    adapter.speed_up(args.channels_last, args.compile, args.compile_backend)
    options = AlignOptions(batch_size=args.batch_size, capture_precision=args.capture_precision)
    if args.chunk_mb:
        options = options.replace(self_attention_chunk_mb=args.chunk_mb)
    aligner = (ReferenceAligner if args.mode == "reference" else Aligner)(adapter, options)
    timer = NetworkTimer(adapter, device)
    build_sec = time.perf_counter() - start

    shard = parse_shard(None)
    indices = [i for i in range(args.images) if shard.owns(i)]
    for w in range(args.warmup):  # untimed: kernel selection, lazy initialisation
        aligner.heatmaps(bench_image(10_000 + w, resolution), image_classes(w, args.classes), seed=w)
    timer.reset()
    _wait_for_peers()
    reset_peak_memory(device)
    maps: dict[str, np.ndarray] = {}
    with Breakdown(aligner, device) as breakdown:
        start = time.perf_counter()
        for i in indices:
            res = aligner.heatmaps(bench_image(i, resolution), image_classes(i, args.classes), seed=i)
            for name in res.heatmaps:
                maps[f"{i}/elbo/{name}"] = res.heatmaps[name]
                maps[f"{i}/baseline/{name}"] = res.baseline_heatmaps[name]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        run_sec = time.perf_counter() - start
    n = max(1, len(indices))
    if args.maps_out:
        np.savez(args.maps_out, **maps)
    settings = {
        "channels_last": args.channels_last,
        "compile": args.compile,
        "capture_precision": args.capture_precision,
    }
    result = {
        "model": args.model,
        "mode": args.mode,
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": resolution,
        "images": len(indices),
        "classes": args.classes,
        "threads": torch.get_num_threads(),
        "batch_size": aligner._fitted_batch,
        "shard": f"{shard.index}/{shard.count}",
        "sec_per_image": run_sec / n,
        "forward_samples_per_image": timer.samples / n,
        "network_calls_per_image": timer.calls / n,
        "network_sec_per_image": timer.seconds / n,
        "overhead_fraction": (run_sec - timer.seconds) / run_sec if run_sec > 0 else 0.0,
        "peak_mem_mb": round(peak_memory_mb(device), 1),
        "build_sec": round(build_sec, 2),
        "run_sec": run_sec,
        "notes": notes,
        "breakdown_sec_per_image": breakdown_per_image(breakdown.seconds, run_sec, n),
        "settings": settings,
        "placement": where.describe(),
    }
    if args.maps_against:
        result["max_abs_diff_vs"] = {
            "maps": args.maps_against,
            "max_abs_diff": max_abs_diff_maps(args.maps_against, maps),
        }
    if device.type == "cuda" and indices:
        result["syncs_per_image"] = syncs_per_image(
            aligner, timer, device, resolution, indices[0], args.classes
        )
    if args.unsynced and indices:
        result["sec_per_image_unsynced"] = time_unsynced(
            aligner, timer, device, resolution, indices, args.classes
        )
    if args.floor and args.mode == "optimized" and indices:
        result.update(measure_floor(args, aligner, timer, resolution, indices, result))
    return result


def time_unsynced(
    aligner: Aligner,
    timer: NetworkTimer,
    device: torch.device,
    resolution: int,
    indices: list[int],
    classes: int,
) -> float:
    """Seconds per image of the same images again, with neither the network timer nor the breakdown
    in the way: on a GPU nothing waits for the device between the steps (one synchronisation at the
    end), which is the throughput a segmentation run gets."""
    sync = device_sync(device)
    timer.enabled = False
    try:
        sync()
        start = time.perf_counter()
        for i in indices:
            aligner.heatmaps(bench_image(i, resolution), image_classes(i, classes), seed=i)
        sync()
        return (time.perf_counter() - start) / len(indices)
    finally:
        timer.enabled = True


def syncs_per_image(
    aligner: Aligner, timer: NetworkTimer, device: torch.device, resolution: int, index: int, classes: int
) -> int | str:
    """Synchronising CUDA operations in one more `heatmaps` call of image `index`, the network
    timer's own synchronisations left out; the error's text instead if counting fails (the run's
    other figures are kept)."""
    timer.enabled = False
    try:
        return count_syncs(
            lambda: aligner.heatmaps(
                bench_image(index, resolution), image_classes(index, classes), seed=index
            ),
            device,
        )
    except Exception as err:  # a diagnostic: never lose the measured figures over it
        return f"not counted: {type(err).__name__}: {err}"
    finally:
        timer.enabled = True


def breakdown_per_image(seconds: dict[str, float], run_sec: float, n: int) -> dict[str, float]:
    """Seconds per image of every part, and `unaccounted`: the wall time no part claims (the
    bench's own loop, the glue of `heatmaps` between its steps)."""
    out = {part: seconds[part] / n for part in PARTS}
    out["unaccounted"] = (run_sec - sum(seconds.values())) / n
    return out


def measure_floor(
    args: argparse.Namespace,
    aligner: Aligner,
    timer: NetworkTimer,
    resolution: int,
    indices: list[int],
    run: dict[str, Any],
) -> dict[str, Any]:
    """The network's own time for the network samples of one image (recorded from the first
    image's `heatmaps` call), replayed without capture at each of `--floor-batches`; the best
    batch gives `floor_sec_per_image`. Each replay stands for one image: `len(indices)` timed
    replays per batch after `--warmup` untimed ones."""
    device = torch.device(args.device)
    i = indices[0]
    samples = record_forwards(aligner, bench_image(i, resolution), image_classes(i, args.classes), seed=i)
    flops = flops_per_sample(aligner.adapter, samples) * run["forward_samples_per_image"]  # per image
    floor = Floor(aligner.adapter, samples, device)
    batches = args.floor_batches or [aligner._batch(aligner.options)]
    timer.reset()
    reset_peak_memory(device)
    by_batch = floor.sweep(batches, repeats=len(indices), warmup=args.warmup)
    fitted = [b for b, sec in by_batch.items() if sec is not None]
    if not fitted:
        raise RuntimeError(f"no floor batch size in {batches} fits in memory; pass smaller --floor-batches")
    best = min(fitted, key=lambda b: by_batch[b])
    replays = (args.warmup + len(indices)) * len(fitted)
    sec = by_batch[best]
    return {
        "floor_sec_per_image": sec,
        "floor_batch": best,
        "floor_sec_by_batch": {str(b): v for b, v in by_batch.items()},
        "floor_forward_samples_per_image": timer.samples / replays,
        "floor_processors": floor.processors(),
        "floor_peak_mem_mb": round(peak_memory_mb(device), 1),
        "sec_per_floor": run["sec_per_image"] / sec,
        "network_sec_per_floor": run["network_sec_per_image"] / sec,
        "network_tflop_per_image": flops / 1e12,
        "floor_tflops": flops / sec / 1e12,
        "network_tflops": flops / run["network_sec_per_image"] / 1e12,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def _wait_for_peers(timeout_s: float = 1800.0) -> None:
    """Concurrent shard processes start their timed work together (a file barrier)."""
    folder, world = os.environ.get("BENCH_BARRIER"), int(os.environ.get("WORLD_SIZE", "1"))
    if not folder or world <= 1:
        return
    Path(folder, f"ready{os.environ.get('RANK', '0')}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(folder).glob("ready*"))) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(list(Path(folder).glob('ready*')))} of {world} bench processes started"
            )
        time.sleep(0.05)


# ---------------------------------------------------------- orchestration


def _child_argv(args: argparse.Namespace, mode: str, maps_out: str | None, threads: int | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "elbo_t2ialign.devtools.bench",
        "--mode",
        mode,
        "--model",
        args.model,
        "--resolution",
        str(args.resolution),
        "--images",
        str(args.images),
        "--classes",
        str(args.classes),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--warmup",
        str(args.warmup),
    ]
    if args.chunk_mb:
        argv += ["--chunk-mb", str(args.chunk_mb)]
    if args.t5:
        argv.append("--t5")
    if args.unsynced:
        argv.append("--unsynced")
    if not args.floor:
        argv.append("--no-floor")
    if args.floor_batches:
        argv += ["--floor-batches", *map(str, args.floor_batches)]
    if args.channels_last:
        argv.append("--channels-last")
    if args.compile:
        argv += ["--compile", args.compile, "--compile-backend", args.compile_backend]
    if args.capture_precision != "float32":
        argv += ["--capture-precision", args.capture_precision]
    if maps_out:
        argv += ["--maps-out", maps_out]
    if args.placement != "device":
        argv += ["--placement", args.placement, "--offload-type", args.offload_type]
        if args.offload_folder:
            argv += ["--offload-folder", args.offload_folder]
    if threads:
        argv += ["--threads", str(threads)]
    return argv


def _run_children(argvs: list[list[str]], envs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Start the processes together, wait for all, return each one's last JSON line."""
    procs = [
        subprocess.Popen(a, env=e, stdout=subprocess.PIPE, text=True)
        for a, e in zip(argvs, envs, strict=True)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"bench subprocess {' '.join(proc.args)} failed with exit code {proc.returncode}"
            )
        results.append(json.loads(lines[-1]))
    return results


def _env(rank: int = 0, world: int = 1, barrier: str | None = None) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    env.pop("BENCH_BARRIER", None)
    if barrier:
        env["BENCH_BARRIER"] = barrier
    return env


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Both modes, alternating, each run in its own process; the median run of each mode is reported."""
    runs: dict[str, list[dict[str, Any]]] = {"optimized": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in runs:
                path = str(Path(tmp, f"{mode}{r}.npz"))
                runs[mode].append(_run_children([_child_argv(args, mode, path, args.threads)], [_env()])[0])
        diff = max_abs_diff(Path(tmp, "optimized0.npz"), Path(tmp, "reference0.npz"))
    best = {mode: _median_run(rs) for mode, rs in runs.items()}
    return {
        "model": args.model,
        "resolution": best["optimized"]["resolution"],
        "device": args.device,
        "dtype": best["optimized"]["dtype"],
        "images": args.images,
        "classes": args.classes,
        "optimized": best["optimized"],
        "reference": best["reference"],
        "speedup": best["reference"]["sec_per_image"] / best["optimized"]["sec_per_image"],
        "max_abs_diff": diff,
        "runs_sec_per_image": {m: [round(r["sec_per_image"], 3) for r in rs] for m, rs in runs.items()},
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["sec_per_image"] for r in runs]
    return runs[times.index(statistics.median_low(times))]


def max_abs_diff(a: Path, b: Path) -> float:
    with np.load(b) as y:
        return max_abs_diff_maps(a, {k: y[k] for k in y.files})


def max_abs_diff_maps(path: str | Path, maps: dict[str, np.ndarray]) -> float:
    """Largest difference between the maps saved in `path` (--maps-out) and `maps`."""
    with np.load(path) as x:
        if set(x.files) != set(maps):
            raise RuntimeError(
                f"the two runs produced different maps: {sorted(set(x.files) ^ set(maps))}; "
                "compare runs of the same model, images and classes"
            )
        return max((float(np.abs(x[k] - maps[k]).max()) for k in x.files), default=0.0)


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of 1 process vs `args.processes` shard processes running concurrently on one device
    (data parallelism as under `accelerate launch`: process i takes images i, i+n, ...)."""
    out: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "images": args.images,
        "classes": args.classes,
        "throughput": {},
    }
    cpu_threads = torch.get_num_threads() if args.device == "cpu" else None
    args = argparse.Namespace(**{**vars(args), "floor": False})  # a floor would overlap the peers' timed runs
    for n in sorted({1, args.processes}):
        # on a CPU the cores are split between the processes instead of oversubscribed
        threads = args.threads or (max(1, cpu_threads // n) if cpu_threads else None)
        with tempfile.TemporaryDirectory() as barrier:
            results = _run_children(
                [_child_argv(args, "optimized", None, threads)] * n,
                [_env(rank, n, barrier) for rank in range(n)],
            )
        wall = max(r["run_sec"] for r in results)
        out["throughput"][str(n)] = {
            "images_per_sec": sum(r["images"] for r in results) / wall,
            "peak_mem_mb_per_process": max(r["peak_mem_mb"] for r in results),
            "threads_per_process": results[0]["threads"],
            "sec_per_image": [r["sec_per_image"] for r in results],
        }
    one, many = out["throughput"]["1"], out["throughput"][str(args.processes)]
    out["scaling"] = many["images_per_sec"] / one["images_per_sec"]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m elbo_t2ialign.devtools.bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="sd15", choices=FULL_MODELS + TINY_MODELS)
    p.add_argument(
        "--resolution", type=int, default=256, help="image side in pixels (tiny models: always 32)"
    )
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="network dtype (the VAE stays float32)")
    p.add_argument("--mode", default="optimized", choices=("optimized", "reference"))
    p.add_argument("--compare", action="store_true", help="run both modes (each in a subprocess)")
    p.add_argument("--repeats", type=int, default=1, help="--compare: alternate the modes this many times")
    p.add_argument("--processes", type=int, default=1, help=">1: images/s of 1 vs this many shard processes")
    p.add_argument("--batch-size", type=int, default=AlignOptions.batch_size, help="network samples per call")
    p.add_argument(
        "--chunk-mb",
        type=float,
        default=None,
        help="bound on one chunk of explicit self-attention (default: the option's default)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed images first (default: 1 on CUDA, 0 on CPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--t5", action="store_true", help="SD3: build the 4.7B-parameter T5-XXL text encoder too")
    p.add_argument(
        "--unsynced",
        action="store_true",
        help="time the images a second time without the timers' synchronisations (sec_per_image_unsynced)",
    )
    p.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="optimized mode: skip the floor (the same network samples replayed without capture)",
    )
    p.add_argument(
        "--floor-batches",
        type=int,
        nargs="+",
        default=None,
        metavar="B",
        help="batch sizes the floor is measured at, the fastest reported (default: --batch-size)",
    )
    p.add_argument(
        "--table",
        default=None,
        metavar="JSONL",
        help="print the tables of a scripts/bench_gpu.sh log (one JSON record a line) and exit",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="the denoiser in channels-last layout (adapter.speed_up)"
    )
    p.add_argument(
        "--compile",
        default=None,
        choices=ModelAdapter.compile_modes,
        help="torch.compile the denoiser for the uncaptured forwards (adapter.speed_up); optimized mode only",
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (eager: CPU smoke tests)"
    )
    p.add_argument(
        "--capture-precision",
        default="float32",
        choices=("float32", "model"),
        help="precision of the captured attention's scores and softmax (the option capture_precision)",
    )
    p.add_argument(
        "--maps-against",
        default=None,
        metavar="NPZ",
        help="maps of an earlier run (--maps-out) of the same images: report the largest difference",
    )
    p.add_argument("--maps-out", default=None, help="save every heatmap to this .npz")
    p.add_argument(
        "--placement",
        default="device",
        choices=[k for k in placing.PLACEMENTS if k != "auto"],
        help="where the weights live and run (core/placement.py); offloading ones start from CPU memory",
    )
    p.add_argument(
        "--offload-type", default="block_level", choices=placing.OFFLOAD_TYPES, help="group-offload"
    )
    p.add_argument(
        "--offload-folder", default=None, help="group-offload: offload the weights to files in this folder"
    )
    args = p.parse_args(argv)
    if args.offload_folder and args.placement != "group-offload":
        p.error("--offload-folder is used by --placement group-offload only")
    if args.compile and (args.compare or args.mode == "reference"):
        p.error(
            "--compile applies to the optimized mode only (the reference mode's capture would "
            "retrace it); measure it against a plain run with --maps-out / --maps-against"
        )
    if args.maps_against and (args.compare or args.processes > 1):
        p.error("--maps-against compares one optimized run; leave out --compare and --processes")
    if args.maps_against and not Path(args.maps_against).is_file():
        p.error(f"--maps-against: no file {args.maps_against}; give the .npz an earlier --maps-out wrote")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(
            f"--device {args.device}: torch sees no CUDA device here; use --device cpu or run on a GPU machine"
        )
    if args.warmup is None:  # compiling happens on the first calls: keep it out of the timed images
        args.warmup = 1 if args.device.startswith("cuda") or args.compile else 0
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.table:
        if not Path(args.table).is_file():
            raise SystemExit(
                f"--table: no file {args.table}; give the JSONL log that scripts/bench_gpu.sh wrote"
            )
        records = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print(format_tables(records), flush=True)
        return {"records": records}
    if args.compare:
        result = compare(args)
    elif args.processes > 1:
        result = scaling(args)
    else:
        result = run_mode(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
